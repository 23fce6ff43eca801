"""The `vision` and `risk` examples served by real tritonserver shards behind the gateway, on the CPU.

The examples' own model.py and resnet.py run; only the configs' architecture and image size are made small
(`resnet-tiny`, 64 px) so that the CPU of CI serves them quickly. ResNet-50 itself runs on the GPU machine
(bench/gpu.py), where torchvision's resnet50 state dict was seen to load into resnet.py's network and give
the same outputs.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, RunningStack, stack_of

VISION = ROOT / "examples" / "models" / "vision" / "1"
sys.path.insert(0, str(VISION))
from resnet import FixedBatches, classifier, prepare, preprocess, resize_uint8, resnet, sample_images  # noqa: E402

SIZE = 64
SPEC = """
cluster: {cluster}
model_repository: {repository}
node_pools:
  - {{name: local, provider: existing, instance_type: this-machine}}
models:
  - {{name: vision, path: vision, memory_mb: 64, max_batch: 256, cheaper_variant: vision_fp16}}
  - {{name: vision_fp16, path: vision_fp16, memory_mb: 64, max_batch: 256, smaller_batch_variant: vision_fp16_b16}}
  - {{name: vision_fp16_b16, path: vision_fp16_b16, memory_mb: 64, max_batch: 16}}
  - {{name: vision_bf16, path: vision_bf16, memory_mb: 64, max_batch: 256}}
  - {{name: risk, path: risk, memory_mb: 64, max_batch: 64, cheaper_variant: risk_fp16}}
  - {{name: risk_fp16, path: risk_fp16, memory_mb: 64, max_batch: 64}}
shards:
  - {{name: main, models: [vision, vision_fp16, vision_fp16_b16, vision_bf16, risk, risk_fp16]}}
priority_classes:
  - {{name: standard, level: 200, default_deadline_ms: 30000, share: 1.0}}
tenants:
  - {{name: anonymous, default_class: standard, rate: 1000, burst: 1000}}
gateway: {{allow_anonymous: true, anonymous_tenant: anonymous, workers: 1}}
"""


def small_repository(target: Path) -> Path:
    """The examples' model directories (links resolved), the vision ones with the tiny network at 64 px."""
    for name in ("vision", "vision_fp16", "vision_fp16_b16", "vision_bf16", "risk", "risk_fp16"):
        shutil.copytree(ROOT / "examples" / "models" / name, target / name)
        config = target / name / "config.pbtxt"
        text = config.read_text().replace('string_value: "resnet50"', 'string_value: "resnet-tiny"')
        config.write_text(text.replace('string_value: "224"', f'string_value: "{SIZE}"'))
    return target


@pytest.fixture(scope="module")
def served(run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    repository = small_repository(tmp_path_factory.mktemp("vision-models"))
    with stack_of(SPEC.format(cluster="vision", repository=repository), run_dir, "vision") as running:
        yield running


def client(stack: RunningStack) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(stack.address, network_timeout=60)


def classify(stack: RunningStack, model: str, name: str, data, datatype: str) -> dict[str, np.ndarray]:
    tensor = httpclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    outputs = [httpclient.InferRequestedOutput("top1"), httpclient.InferRequestedOutput("logits")]
    result = client(stack).infer(model, [tensor], outputs=outputs)
    return {"top1": result.as_numpy("top1"), "logits": result.as_numpy("logits")}


def jpeg(image: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="JPEG", quality=90)
    return encoded.getvalue()


def test_served_pixels_give_the_networks_own_outputs(served: RunningStack) -> None:
    images = sample_images(6, SIZE, seed=3)
    expected = resnet("resnet-tiny")(preprocess(images, SIZE, torch.float32)).detach().numpy()
    got = classify(served, "vision", "pixels", images.numpy(), "UINT8")
    assert got["logits"].shape == (6, 1000)
    np.testing.assert_allclose(got["logits"], expected, rtol=1e-4, atol=1e-4)
    assert got["top1"].ravel().tolist() == expected.argmax(1).tolist()
    assert len(set(expected.argmax(1).tolist())) > 1  # seeded images do not all land in one class


def test_pixels_of_any_size_are_resized_on_the_device(served: RunningStack) -> None:
    """Resized to uint8 at the network's size first (one shape for the fixed-size graphs and kernels)."""
    images = sample_images(2, 96, seed=4)
    resized = resize_uint8(images, SIZE)
    assert resized.shape == (2, SIZE, SIZE, 3) and resized.dtype == torch.uint8
    expected = resnet("resnet-tiny")(preprocess(resized, SIZE, torch.float32)).detach().numpy()
    got = classify(served, "vision", "pixels", images.numpy(), "UINT8")
    np.testing.assert_allclose(got["logits"], expected, rtol=1e-4, atol=1e-4)


def test_jpeg_bytes_classify_as_their_decoded_pixels(served: RunningStack) -> None:
    images = sample_images(3, SIZE, seed=5).numpy()
    encoded = [jpeg(image) for image in images]
    decoded = np.stack([np.array(Image.open(io.BytesIO(e)).convert("RGB")) for e in encoded])
    from_jpeg = classify(served, "vision", "jpeg", np.array([[e] for e in encoded], dtype=np.object_), "BYTES")
    from_pixels = classify(served, "vision", "pixels", decoded, "UINT8")
    np.testing.assert_allclose(from_jpeg["logits"], from_pixels["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model", "precision", "tolerance"), [("vision_fp16", "fp16", 2e-2),
                                                                ("vision_bf16", "bf16", 8e-2)])
def test_reduced_precision_variants_stay_close_to_fp32(served: RunningStack, model: str, precision: str,
                                                       tolerance: float) -> None:
    images = sample_images(16, SIZE, seed=6).numpy()
    reference = classify(served, "vision", "pixels", images, "UINT8")["logits"]
    variant = classify(served, model, "pixels", images, "UINT8")["logits"]
    assert np.abs(variant - reference).max() / np.abs(reference).max() <= tolerance
    assert np.mean(variant.argmax(1) == reference.argmax(1)) >= 0.9


def test_the_smaller_batch_variant_classifies_like_its_model_and_refuses_bigger_batches(served: RunningStack) -> None:
    """The ladder's "batch 32 -> 16" step: vision_fp16_b16 is vision_fp16 with batches of at most 16."""
    images = sample_images(16, SIZE, seed=21).numpy()
    small = classify(served, "vision_fp16_b16", "pixels", images, "UINT8")
    full = classify(served, "vision_fp16", "pixels", images, "UINT8")
    assert np.array_equal(small["top1"], full["top1"])
    np.testing.assert_allclose(small["logits"], full["logits"], rtol=0, atol=1e-3)
    with pytest.raises(InferenceServerException, match="batch"):
        classify(served, "vision_fp16_b16", "pixels", sample_images(17, SIZE, seed=22).numpy(), "UINT8")


def test_a_request_without_images_is_a_clear_client_error(served: RunningStack) -> None:
    features = httpclient.InferInput("features", [1, 16], "FP32")  # risk's input, sent to vision
    features.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client(served).infer("vision", [features])
    assert raised.value.status() == "400"
    assert "features" in str(raised.value)


def test_an_undecodable_jpeg_fails_only_its_own_request(served: RunningStack) -> None:
    with pytest.raises(InferenceServerException) as raised:
        classify(served, "vision", "jpeg", np.array([[b"not a jpeg"]], dtype=np.object_), "BYTES")
    assert raised.value.status() == "400"
    assert "`jpeg` holds an image that cannot be decoded" in str(raised.value)
    good = classify(served, "vision", "pixels", sample_images(1, SIZE).numpy(), "UINT8")
    assert good["top1"].shape == (1, 1)


def test_risk_fp16_scores_like_risk(served: RunningStack) -> None:
    features = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    scores = {}
    for model in ("risk", "risk_fp16"):
        tensor = httpclient.InferInput("features", [32, 16], "FP32")
        tensor.set_data_from_numpy(features)
        scores[model] = client(served).infer(model, [tensor]).as_numpy("score")
    assert scores["risk"].shape == (32, 1) and scores["risk"].dtype == np.float32
    assert scores["risk"].std() > 0  # the scores depend on the features
    np.testing.assert_allclose(scores["risk_fp16"], scores["risk"], atol=5e-3)


def test_the_network_is_torchvisions_resnet50_layout() -> None:
    """Parameter names and shapes of torchvision's resnet50 (what its state dicts hold), spot-checked."""
    shapes = {name: tuple(p.shape) for name, p in resnet("resnet50").state_dict().items()}
    assert len(shapes) == 320  # with BatchNorm running statistics and num_batches_tracked
    assert len([n for n in shapes if n.endswith(".weight")]) == 107  # 53 convolutions, 53 BatchNorms, fc
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer3.5.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["layer4.2.bn3.running_var"] == (2048,)
    assert shapes["fc.weight"] == (1000, 2048)
    assert sum(p.numel() for p in resnet("resnet50").parameters()) == 25_557_032


def test_compiled_fixed_batches_pad_to_the_next_size_and_match_eager() -> None:
    """torch.compile's path (the GPU's, compiled here on the CPU): a batch of 3 runs as the compiled size 4,
    padded, and gives the eager outputs; a batch past the largest size runs eagerly."""
    step = classifier(prepare(resnet("resnet-tiny"), torch.device("cpu"), "fp32"), SIZE, torch.float32)
    compiled = FixedBatches(step, [4], SIZE, torch.device("cpu"), "compile")
    with torch.inference_mode():
        for count in (3, 4, 6):
            images = sample_images(count, SIZE, seed=count)
            got, expected = compiled(images), step(images)
            assert got.shape == (count, 1000)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="graph or compile"):
        FixedBatches(step, [4], SIZE, torch.device("cpu"), "jit")


def test_fp16_network_runs_channels_last() -> None:
    model = prepare(resnet("resnet-tiny"), torch.device("cpu"), "bf16")
    assert model.conv1.weight.dtype == torch.bfloat16
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_gpu_example_spec_serves_these_models_on_gpu_0() -> None:
    from controlplane.spec import load_spec

    spec = load_spec(ROOT / "examples" / "gpu" / "h200.yaml")
    (shard,) = spec.shards
    assert shard.gpu == 0 and shard.pinned_memory_mb > 0 and shard.cuda_memory_pool_mb > 0
    variants = {m.name: m.cheaper_variant for m in spec.models}
    assert variants["vision"] == "vision_fp16" and variants["risk"] == "risk_fp16"
    for model in spec.models:
        config = (ROOT / "examples" / "models" / model.path / "config.pbtxt").read_text()
        assert f'name: "{model.name}"' in config
        assert "KIND_" not in config  # no instance kind: Triton puts the instances on the GPU when there is one


def test_a_briefly_trained_network_predicts_many_classes_and_bf16_agrees_with_fp32() -> None:
    """examples/models/vision/train.py, as the GPU benchmark uses it for its precision comparison (there:
    ResNet-50 at 224 px for ~20 s on the GPU), here tiny at 32 px on the CPU."""
    sys.path.insert(0, str(VISION.parent))
    from train import CLASSES, labelled_images, train

    model, report = train("resnet-tiny", 32, "cpu", seconds=120, max_steps=40, batch=32)
    assert report["steps"] == 40 and report["held_out_accuracy"] >= 0.9
    images, labels = labelled_images(256, 32, seed=12345)  # the fixed comparison set
    with torch.inference_mode():
        fp32 = model(preprocess(images, 32, torch.float32)).argmax(1)
        bf16 = model.to(torch.bfloat16)(preprocess(images, 32, torch.bfloat16)).argmax(1)
    assert len(set(fp32.tolist())) >= CLASSES - 2  # confident and varied, unlike the seeded init's few classes
    assert (fp32 == labels).float().mean() >= 0.9
    assert (bf16 == fp32).float().mean() >= 0.99
