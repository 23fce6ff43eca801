"""The numeric example models under numpy 2: a real tritonserver whose Python-backend stub runs in a venv
with numpy 2 (the project pins numpy<2, so that venv is made here, from the package index pip is set up
with), serving risk, risk_lite and work; their outputs must equal what numpy 1 computes in this process.

textgen (BYTES in and out) and vision's JPEG input are not here: BYTES tensors have no DLPack form, and this
Triton build's stub fails on them under numpy 2 (README, the example models). The fix used on the GPU machine is
tested here instead: bench/device/stub_env.sh makes the stubs an environment of the numpy 2 Python with a numpy
1.26 wheel ahead of it, named by CPCTL_STUB_PYTHON; a BYTES model then answers, where under numpy 2 it fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from controlplane.procs import ManagedProcess
from controlplane.shards.triton import TritonInstall, TritonNotFound, start_ready, stub_python

from .conftest import ROOT

NUMPY_2 = "numpy==2.2.6"
MODELS = ROOT / "examples" / "models"
FEATURES = np.linspace(-2, 2, 5 * 16, dtype=np.float32).reshape(5, 16)


@pytest.fixture(scope="module")
def numpy2_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("numpy2") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    NUMPY_2], check=True, timeout=300)
    version = subprocess.run([venv / "bin" / "python", "-c", "import numpy; print(numpy.__version__)"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert version.startswith("2.")
    return venv / "bin"


def serve(models: Path, names: list[str], env: dict[str, str], log: Path) -> tuple[ManagedProcess, str]:
    """A tritonserver on `models`, ready (bounded wait), and its address."""
    server, port = start_ready(models, names, log, env)
    return server, f"127.0.0.1:{port}"


BYTES_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, "blob").as_numpy()
            lengths = np.array([[len(row[0])] for row in items], dtype=np.int64)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("length", lengths)]))
        return responses
"""
BYTES_CONFIG = """
name: "byte_lengths"
backend: "python"
max_batch_size: 8
input [ { name: "blob", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "length", data_type: TYPE_INT64, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def bytes_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one Python model that reads a BYTES input: what the stub misreads under numpy 2."""
    repository = tmp_path_factory.mktemp("bytes-models")
    (repository / "byte_lengths" / "1").mkdir(parents=True)
    (repository / "byte_lengths" / "1" / "model.py").write_text(BYTES_MODEL)
    (repository / "byte_lengths" / "config.pbtxt").write_text(BYTES_CONFIG)
    return repository


@pytest.fixture(scope="module")
def stub_env_python(numpy2_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/device/stub_env.sh run on the numpy 2 venv's Python, with numpy 1.26 from the package index."""
    wheels = tmp_path_factory.mktemp("numpy1-wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "numpy==1.26.4", "-d", str(wheels)], check=True, timeout=300)
    (wheel,) = wheels.glob("numpy-1.26.4-*.whl")
    made = subprocess.run(["bash", str(ROOT / "bench" / "device" / "stub_env.sh"), str(numpy2_python / "python"),
                           str(wheel), str(tmp_path_factory.mktemp("stub-env") / "env")],
                          capture_output=True, text=True, check=True, timeout=300)
    return Path(made.stdout.strip())


def lengths_served(models: Path, env: dict[str, str], log: Path, items: list[bytes]) -> np.ndarray:
    server, address = serve(models, ["byte_lengths"], env, log)
    try:
        tensor = httpclient.InferInput("blob", [len(items), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[item] for item in items], dtype=object))
        client = httpclient.InferenceServerClient(address, network_timeout=30)
        return client.infer("byte_lengths", [tensor]).as_numpy("length").ravel()
    finally:
        server.stop()


ITEMS = [b"", b"jpeg", b"x" * 1000]


def test_bytes_inputs_fail_under_numpy_2(bytes_model: Path, numpy2_python: Path, tmp_path: Path) -> None:
    env = TritonInstall.find().env(None)
    env["PATH"] = f"{numpy2_python}:{env['PATH']}"
    with pytest.raises(Exception):  # noqa: B017 (the stub crashes or answers garbage: any failure is the point)
        lengths = lengths_served(bytes_model, env, tmp_path / "numpy2.log", ITEMS)
        assert lengths.tolist() == [len(item) for item in ITEMS]


def test_bytes_inputs_work_with_the_stub_env_on_a_numpy_2_python(bytes_model: Path, stub_env_python: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CPCTL_STUB_PYTHON", str(stub_env_python))
    env = TritonInstall.find().env(None)
    assert env["PATH"].startswith(f"{stub_env_python.parent}:")
    lengths = lengths_served(bytes_model, env, tmp_path / "stub-env.log", ITEMS)
    assert lengths.tolist() == [len(item) for item in ITEMS]


def test_a_stub_python_that_is_not_an_interpreter_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CPCTL_STUB_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(TritonNotFound, match="CPCTL_STUB_PYTHON=.*not an executable Python interpreter"):
        stub_python()


@pytest.fixture(scope="module")
def numpy2_server(numpy2_python: Path, tmp_path_factory: pytest.TempPathFactory):
    env = TritonInstall.find().env(None)
    env["PATH"] = f"{numpy2_python}:{env['PATH']}"  # the stub's python3, and so its numpy, is the numpy 2 venv's
    server, address = serve(MODELS, ["risk", "risk_lite", "work"], env,
                            tmp_path_factory.mktemp("numpy2-log") / "tritonserver.log")
    try:
        yield httpclient.InferenceServerClient(address, network_timeout=30)
    finally:
        server.stop()


def infer(client: httpclient.InferenceServerClient, model: str, name: str, output: str) -> np.ndarray:
    tensor = httpclient.InferInput(name, list(FEATURES.shape), "FP32")
    tensor.set_data_from_numpy(FEATURES)
    return client.infer(model, [tensor]).as_numpy(output)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_risk_scores_under_numpy_2_as_under_numpy_1(numpy2_server) -> None:
    weights = np.load(MODELS / "risk" / "1" / "weights.npz")
    hidden = FEATURES
    for i in range(2):
        hidden = np.maximum(hidden @ weights[f"w{i}"] + weights[f"b{i}"], 0)
    expected = sigmoid(hidden @ weights["w2"] + weights["b2"])
    np.testing.assert_allclose(infer(numpy2_server, "risk", "features", "score"), expected, rtol=1e-5)


def test_risk_lite_scores_under_numpy_2_as_under_numpy_1(numpy2_server) -> None:
    weights = np.load(MODELS / "risk_lite" / "1" / "weights.npz")
    expected = sigmoid(FEATURES @ weights["w"] + weights["b"])
    np.testing.assert_allclose(infer(numpy2_server, "risk_lite", "features", "score"), expected, rtol=1e-5)


def test_work_echoes_its_input_under_numpy_2(numpy2_server) -> None:
    tensor = httpclient.InferInput("x", list(FEATURES.shape), "FP32")
    tensor.set_data_from_numpy(FEATURES)
    echoed = numpy2_server.infer("work", [tensor], parameters={"work_ms": 0}).as_numpy("y")
    np.testing.assert_array_equal(echoed, FEATURES)
