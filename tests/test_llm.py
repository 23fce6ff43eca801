"""The llm example on the CPU: a seeded Llama checkpoint, split into 2 pipeline stages, each a real Triton
Python-backend model on its own real tritonserver shard (`cpctl up`), driven token by token over HTTP with
binary tensors. The reference is transformers' own `LlamaForCausalLM.generate` on the same checkpoint: the
pipeline must give exactly its greedy tokens, for several sequences stepping at once.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from safetensors import safe_open
from transformers import LlamaForCausalLM
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from controlplane.gateway.pipeline_stream import StepGate
from controlplane.gateway.workers import partition_spec
from controlplane.llm.client import PipelineClient, PipelineError
from controlplane.llm.pipeline import (
    END,
    START,
    decode,
    encode,
    stage_model_names,
    step_request_body,
    step_response_tensor,
)
from controlplane.spec import SpecError, hash_api_key, parse_spec

from .conftest import ROOT, RunningStack, stack_of

STAGE_DIR = ROOT / "examples" / "models" / "llm_stage"
sys.path.insert(0, str(STAGE_DIR / "1"))
from stage import PipelineStage, StageError, StepInput, parse_stage_name, stage_layers  # noqa: E402

MAX_SEQUENCES = 8
DEMO_KEY = "cp-demo-key"
SPEC = """
cluster: {cluster}
model_repository: {repository}
node_pools:
  - {{name: local, provider: existing, instance_type: this-machine}}
models:
  - {{name: llm_1of2, path: llm_stage, memory_mb: 64, max_batch: 64}}
  - {{name: llm_2of2, path: llm_stage, memory_mb: 64, max_batch: 64}}
shards:
  - {{name: llm-stage1, models: [llm_1of2]}}
  - {{name: llm-stage2, models: [llm_2of2]}}
priority_classes:
  - {{name: critical, level: 300, default_deadline_ms: 30000, share: 0.5}}
  - {{name: standard, level: 200, default_deadline_ms: 30000, share: 0.5}}
pipelines:
  - {{name: llm, stages: [llm_1of2, llm_2of2], max_sequences: {max_sequences}, max_tokens: 400}}
  - {{name: llm_single, stages: [llm_1of2, llm_2of2], max_sequences: 2, max_tokens: 400,
     reserved_for_top_class: 1}}
  - {{name: llm_gated, stages: [llm_1of2, llm_2of2], max_sequences: 5, max_tokens: 400, max_steps_per_stage: 1}}
  - {{name: llm_urgent, stages: [llm_1of2, llm_2of2], max_sequences: 5, max_tokens: 400, urgent_steps_per_stage: 0}}
  - {{name: llm_batched, stages: [llm_1of2, llm_2of2], max_sequences: 5, max_tokens: 400, one_batch_per_stage: true}}
  - {{name: llm_one_stage, stages: [llm_1of2, llm_2of2], max_sequences: 5, max_tokens: 400, urgent_steps_per_stage: 0,
     one_batch_per_stage: true, one_stage_at_a_time: true}}
tenants:
  - {{name: anonymous, default_class: standard, rate: 1000, burst: 1000}}
  - {{name: demo, api_key_sha256: {demo_key}, default_class: standard, allowed_classes: [critical, standard],
     rate: 1000, burst: 1000}}
# Pipeline semantics only: the gateway's own overload manager would act on how loaded the test machine is (a CI
# run got a 429 "overload" for a standard stream after a critical one); test_overload.py tests it deterministically.
gateway: {{allow_anonymous: true, anonymous_tenant: anonymous, workers: 1, overload: {{enabled: false}}}}
"""


def make_checkpoint(out: Path, seed: int = 0) -> Path:
    """The example's generator, run as its user runs it."""
    subprocess.run([sys.executable, str(ROOT / "examples" / "llm" / "make_checkpoint.py"), "--config", "tiny",
                    "--out", str(out), "--seed", str(seed)], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llm-tiny"))


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(checkpoint).eval()


def greedy(model: LlamaForCausalLM, prompt: list[int], tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def served(checkpoint: Path, run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    repository = tmp_path_factory.mktemp("llm-models")
    shutil.copytree(STAGE_DIR, repository / "llm_stage")
    config = repository / "llm_stage" / "config.pbtxt"
    text = config.read_text().replace('string_value: "checkpoint"', f'string_value: "{checkpoint}"')
    config.write_text(text.replace('string_value: "64" } }', f'string_value: "{MAX_SEQUENCES}" }} }}'))
    spec = SPEC.format(cluster="llm", repository=repository, max_sequences=MAX_SEQUENCES - 2,
                       demo_key=hash_api_key(DEMO_KEY))
    with stack_of(spec, run_dir, "llm") as running:
        yield running


def stage_urls(stack: RunningStack) -> list[str]:
    shards = sorted(stack.state()["shards"], key=lambda s: s["name"])
    return [s["url"].removeprefix("http://") for s in shards]


def model_stats(stack: RunningStack, stage: int, model: str) -> dict:
    with urllib.request.urlopen(f"http://{stage_urls(stack)[stage]}/v2/models/{model}/stats", timeout=10) as r:
        return json.loads(r.read())["model_stats"][0]


# --- the checkpoint and the split --------------------------------------------------------------------------
def test_checkpoint_is_a_directory_transformers_loads_and_the_seed_decides_it(
        checkpoint: Path, reference: LlamaForCausalLM, tmp_path: Path) -> None:
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert reference.config.num_hidden_layers == 4 and reference.config.num_key_value_heads == 2
    again, other = make_checkpoint(tmp_path / "again"), make_checkpoint(tmp_path / "other", seed=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = [safe_open(d / "model.safetensors", framework="pt").get_tensor(name) for d in (checkpoint, again, other)]
    assert torch.equal(tensors[0], tensors[1])
    assert not torch.equal(tensors[0], tensors[2])


def test_generator_names_an_unknown_config() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "llm" / "make_checkpoint.py"), "--config",
                           "no-such", "--out", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no config 'no-such'" in done.stderr and "Traceback" not in done.stderr


def test_stages_split_the_layers_contiguously_and_evenly() -> None:
    assert [list(stage_layers(32, k, 4)) for k in range(4)] == [list(range(8 * k, 8 * k + 8)) for k in range(4)]
    split = [stage_layers(10, k, 4) for k in range(4)]
    assert [len(r) for r in split] == [3, 3, 2, 2]
    assert [i for r in split for i in r] == list(range(10))
    with pytest.raises(StageError, match="impossible"):
        stage_layers(2, 0, 4)


def test_a_stage_knows_its_place_from_its_model_name() -> None:
    assert parse_stage_name("llm_2of4") == (1, 4)
    assert stage_model_names("llm", 2) == ["llm_1of2", "llm_2of2"]
    with pytest.raises(StageError, match="does not end in _<stage>of<stages>"):
        parse_stage_name("llm")


def test_a_stage_loads_only_its_own_layers(checkpoint: Path) -> None:
    first, last = PipelineStage(checkpoint, 0, 2), PipelineStage(checkpoint, 1, 2)
    assert list(first.layer_ids) == [0, 1] and list(last.layer_ids) == [2, 3]
    assert hasattr(first, "embed") and not hasattr(first, "head")
    assert hasattr(last, "head") and not hasattr(last, "embed")
    stored = safe_open(checkpoint / "model.safetensors", framework="pt").get_tensor("model.layers.3.mlp.up_proj.weight")
    assert torch.equal(last.layers[1].mlp.up_proj.weight, stored)


def test_in_process_stages_batch_sequences_of_different_lengths_exactly(
        checkpoint: Path, reference: LlamaForCausalLM) -> None:
    """Decode steps of sequences at different lengths attend in one batched call, each masked to its own length;
    the second round reuses the KV pool rows the first left behind (longer sequences' stale keys beyond each
    new sequence's length must stay masked)."""
    stages = [PipelineStage(checkpoint, k, 2) for k in range(2)]
    prompts = [encode("hi"), encode("a longer prompt"), encode("x"), encode("y" * 124)]  # the last grows the pool
    for round_prompts in (prompts, prompts[::-1]):
        inputs = [torch.tensor(p) for p in round_prompts]
        got: list[list[int]] = [[] for _ in round_prompts]
        for step in range(6):
            batch = [StepInput(i, step == 0, step == 5, x) for i, x in enumerate(inputs)]
            for stage in stages:
                outputs = stage.step(batch)
                batch = [StepInput(b.sequence_id, b.start, b.end, out) for b, out in zip(batch, outputs, strict=True)]
            for i, item in enumerate(batch):
                got[i].append(int(item.tokens[0]))
                inputs[i] = item.tokens
        assert got == [greedy(reference, p, 6) for p in round_prompts]
        assert all(not stage.caches for stage in stages)  # every sequence's last step freed its caches
    assert all(len(stage.pool.free_rows) == stage.max_sequences for stage in stages)


def test_a_prompt_sent_in_two_pieces_gives_the_same_tokens(checkpoint: Path, reference: LlamaForCausalLM) -> None:
    """The second piece attends to the cached first one through a mask (the path decode steps and fresh prompts
    skip)."""
    stages = [PipelineStage(checkpoint, k, 2) for k in range(2)]
    prompt = encode("a prompt in two pieces")
    pieces = [torch.tensor(prompt[:7]), torch.tensor(prompt[7:])]
    got = []
    for step in range(5):
        item = StepInput(9, step == 0, step == 4, pieces[step] if step < 2 else torch.tensor([got[-1]]))
        for stage in stages:
            (out,) = stage.step([item])
            item = StepInput(9, item.start, item.end, out)
        if step >= 1:  # the first piece's answer is not a continuation of the whole prompt
            got.append(int(item.tokens[0]))
    assert got == greedy(reference, prompt, 4)


def test_a_stage_refuses_unknown_sequences_and_a_full_cache(checkpoint: Path) -> None:
    stage = PipelineStage(checkpoint, 0, 2, max_sequences=2)
    one_token = torch.tensor([5])
    results = stage.step([StepInput(1, True, False, one_token), StepInput(2, True, False, one_token),
                          StepInput(3, True, False, one_token), StepInput(9, False, False, one_token)])
    assert [isinstance(r, torch.Tensor) for r in results] == [True, True, False, False]
    assert "KV cache full" in str(results[2]) and "sequence 9 is unknown" in str(results[3])
    stage.step([StepInput(1, False, True, torch.zeros(0, dtype=torch.int64))])  # a release
    assert set(stage.caches) == {2}


def test_a_stage_refuses_a_sequence_past_the_positions_its_cache_was_sized_for(checkpoint: Path) -> None:
    stage = PipelineStage(checkpoint, 0, 2, max_positions=8)
    assert stage.max_positions == 8 and PipelineStage(checkpoint, 0, 2).max_positions == 512  # tiny's maximum
    (too_long,) = stage.step([StepInput(1, True, False, torch.arange(9))])
    assert "would exceed 8 positions" in str(too_long)


def test_idle_sequences_are_evicted(checkpoint: Path) -> None:
    stage = PipelineStage(checkpoint, 0, 2, idle_timeout_s=10)
    stage.step([StepInput(1, True, False, torch.tensor([5]))])
    now = stage.caches[1].last_used
    assert stage.evict_idle(now + 5) == []
    assert stage.evict_idle(now + 11) == [1] and not stage.caches


# --- served: real tritonservers, one per stage ----------------------------------------------------------------
def test_served_pipeline_gives_transformers_greedy_tokens(served: RunningStack, reference: LlamaForCausalLM) -> None:
    client = PipelineClient(stage_urls(served))
    prompt = encode("hello pipeline")
    assert list(client.generate(prompt, 10, stop_at_eos=False)) == greedy(reference, prompt, 10)
    client.close()


def test_concurrent_sequences_are_batched_at_every_stage(served: RunningStack, reference: LlamaForCausalLM) -> None:
    prompts = [encode(text) for text in ("one", "two words", "three words here", "4", "five", "six sixes")]
    got: dict[int, list[int]] = {}
    before = [model_stats(served, k, name) for k, name in enumerate(stage_model_names("llm", 2))]

    def run(index: int) -> None:
        client = PipelineClient(stage_urls(served))
        got[index] = list(client.generate(prompts[index], 12, priority=1 + index % 2, stop_at_eos=False))
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [got.get(i) for i in range(len(prompts))] == [greedy(reference, p, 12) for p in prompts]
    for k, name in enumerate(stage_model_names("llm", 2)):
        after = model_stats(served, k, name)
        steps = after["inference_count"] - before[k]["inference_count"]
        batches = after["execution_count"] - before[k]["execution_count"]
        assert steps == len(prompts) * 12
        assert batches < steps, f"stage {name}: {steps} steps in {batches} batches: never batched"


def test_an_early_stop_releases_the_caches(served: RunningStack) -> None:
    client = PipelineClient(stage_urls(served))
    for _ in range(MAX_SEQUENCES + 2):  # more sequences than a stage holds: each must have been released
        tokens = client.generate(encode("stop early"), 50, stop_at_eos=False)
        assert next(tokens) >= 0
        tokens.close()
    assert len(list(client.generate(encode("still room"), 3, stop_at_eos=False))) == 3
    client.close()


def test_a_stage_answers_bad_steps_with_a_clear_error(served: RunningStack) -> None:
    client = PipelineClient(stage_urls(served))
    with pytest.raises(PipelineError, match="sequence 77 is unknown"):
        client.step(77, 0, np.array([5], np.int64))
    second_stage = httpclient.InferenceServerClient(stage_urls(served)[1])
    tensors = []
    for name, array in (("sequence_id", np.array([[78]], np.uint64)), ("flags", np.array([[START | END]], np.int32)),
                        ("hidden", np.zeros((1, 2, 7), np.float32))):
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensors.append(tensor.set_data_from_numpy(array))
    with pytest.raises(InferenceServerException, match="must be \\[1, T, 64\\]"):
        second_stage.infer("llm_2of2", tensors)
    second_stage.close()
    with pytest.raises(PipelineError, match="the prompt is empty"):
        next(client.generate([], 3))
    client.close()


def test_text_round_trips_through_the_byte_ids() -> None:
    assert decode(encode("héllo")) == "héllo"
    assert decode([1, 2, 0, 5000]) == ""
    assert END != START


# --- the 7B example's placement ---------------------------------------------------------------------------------
def test_planner_puts_each_7b_stage_on_a_mig_slice_of_its_own() -> None:
    done = subprocess.run([sys.executable, "-m", "controlplane.cli", "gpu", "plan", "-f",
                           str(ROOT / "examples" / "llm" / "cluster.yaml"), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    (gpu,) = json.loads(done.stdout)["pools"][0]["gpus"]
    assert gpu["mig_enabled"]
    placed = {r["shard"]: (i["profile"], r["models"], r["need_mib"], i["capacity_mib"])
              for i in gpu["instances"] for r in i["replicas"]}
    assert {shard: p[:2] for shard, p in placed.items()} == {
        f"llm-stage{k}": ("1g.18gb", [f"llm_{k}of4"]) for k in range(1, 5)}
    assert all(need <= capacity for _, _, need, capacity in placed.values())
    assert len({i["start"] for i in gpu["instances"] if i["replicas"]}) == 4  # four distinct slices


# --- through the gateway: the gateway drives the token loop ------------------------------------------------------
def post(stack: RunningStack, path: str, body: object, headers: dict | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(stack.address, timeout=120)
    connection.request("POST", path, body=json.dumps(body), headers=headers or {})
    return connection.getresponse()


def events(response: http.client.HTTPResponse) -> list[dict]:
    """The server-sent events of a whole stream."""
    return [json.loads(line[len(b"data: "):]) for line in response.read().split(b"\n") if line.startswith(b"data: ")]


def test_gateway_streams_the_pipelines_greedy_tokens(served: RunningStack, reference: LlamaForCausalLM) -> None:
    response = post(served, "/v2/models/llm/generate_stream", {"text_input": "through the gateway", "max_tokens": 8})
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    got = events(response)
    assert [e["token_id"] for e in got] == greedy(reference, encode("through the gateway"), 8)
    assert all(e["model_name"] == "llm" for e in got)


def test_gateway_generate_answers_the_whole_continuation(served: RunningStack, reference: LlamaForCausalLM) -> None:
    response = post(served, "/v2/models/llm/generate", {"text_input": "whole", "max_tokens": 5})
    assert response.status == 200
    answer = json.loads(response.read())
    assert answer["token_ids"] == greedy(reference, encode("whole"), 5)
    assert answer["text_output"] == decode(answer["token_ids"])
    with urllib.request.urlopen(f"http://{served.address}/metrics", timeout=10) as metrics:
        text = metrics.read().decode()
    assert 'cp_requests_total{class="standard",outcome="completed",tenant="anonymous"}' in text


@pytest.mark.parametrize(("body", "problem"), [({"max_tokens": 3}, "text_input"),
                                               ({"text_input": "x", "max_tokens": 0}, "max_tokens"),
                                               ({"text_input": "x", "max_tokens": 401}, "from 1 to 400"),
                                               ([1, 2], "JSON object")])
def test_gateway_answers_a_bad_generate_body_with_400(served: RunningStack, body: object, problem: str) -> None:
    response = post(served, "/v2/models/llm/generate_stream", body)
    assert response.status == 400
    assert problem in json.loads(response.read())["error"]


def test_a_pipeline_is_not_an_infer_model(served: RunningStack) -> None:
    response = post(served, "/v2/models/llm/infer", {"inputs": []})
    assert response.status == 405
    assert "pipeline" in json.loads(response.read())["error"]


def test_a_full_pipeline_sheds_before_the_first_token_and_keeps_a_place_for_critical(served: RunningStack) -> None:
    steps_before = model_stats(served, 0, "llm_1of2")["inference_count"]
    connection = http.client.HTTPConnection(served.address, timeout=120)
    connection.request("POST", "/v2/models/llm_single/generate_stream",
                       body=json.dumps({"text_input": "hold a place", "max_tokens": 400}))
    holding = connection.getresponse()
    assert holding.status == 200
    assert holding.readline().startswith(b"data: ") or holding.readline().startswith(b"data: ")  # a token came
    refused = post(served, "/v2/models/llm_single/generate_stream", {"text_input": "me too", "max_tokens": 3})
    assert refused.status == 429 and refused.getheader("retry-after") == "1"
    assert "the most class 'standard' may have" in json.loads(refused.read())["error"]
    critical = post(served, "/v2/models/llm_single/generate_stream", {"text_input": "urgent", "max_tokens": 3},
                    {"authorization": f"Bearer {DEMO_KEY}", "x-priority": "critical"})
    assert critical.status == 200 and len(events(critical)) == 3  # the reserved place
    connection.close()  # the client leaves: the gateway stops the sequence and releases its place
    for _ in range(100):  # bounded: the gateway sees the closed connection within a few steps
        again = post(served, "/v2/models/llm_single/generate", {"text_input": "my turn", "max_tokens": 1})
        again.read()
        if again.status == 200:
            break
        time.sleep(0.1)
    assert again.status == 200, "the place of a client that left was never released"
    steps = model_stats(served, 0, "llm_1of2")["inference_count"] - steps_before
    assert steps < 400, f"{steps} steps at stage 1: the sequence of the client that left was not stopped"


def shard_metric(stack: RunningStack, name: str) -> dict[str, float]:
    """A per-shard gauge of the gateway's /metrics, by shard."""
    with urllib.request.urlopen(f"http://{stack.address}/metrics", timeout=10) as metrics:
        lines = metrics.read().decode().splitlines()
    found = {}
    for line in lines:
        if line.startswith(name + '{shard="'):
            shard, value = line[len(name) + 8:].split('"} ')
            found[shard] = float(value)
    return found


def test_pipeline_steps_are_counted_on_their_stage_shards_like_requests(served: RunningStack) -> None:
    before = shard_metric(served, "cp_shard_served")
    response = post(served, "/v2/models/llm/generate", {"text_input": "count my steps", "max_tokens": 6})
    assert response.status == 200
    assert len(json.loads(response.read())["token_ids"]) == 6  # no early end of text: no release step either
    after = shard_metric(served, "cp_shard_served")
    assert {shard: after[shard] - before.get(shard, 0) for shard in after} == {"llm-stage1-0": 6, "llm-stage2-0": 6}
    assert shard_metric(served, "cp_shard_in_flight") == {"llm-stage1-0": 0, "llm-stage2-0": 0}


def test_clients_leaving_mid_stream_never_eject_a_stage(served: RunningStack) -> None:
    """A flood's clients leaving at once cancel their steps in flight: the client's doing, not the stage's failure
    (counted as failures they ejected the healthy first stage, and new sequences got 503 for a while)."""
    ejections = shard_metric(served, "cp_shard_ejections")
    for _ in range(3):
        streams = []
        for index in range(MAX_SEQUENCES - 2):  # every place of `llm`
            connection = http.client.HTTPConnection(served.address, timeout=120)
            connection.request("POST", "/v2/models/llm/generate_stream",
                               body=json.dumps({"text_input": f"leaving {index}", "max_tokens": 400}))
            response = connection.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")  # under way
            streams.append(connection)
        for connection in streams:  # all leave at once, steps in flight at both stages
            connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()
        for _ in range(100):  # bounded: the gateway sees the closed connections within a few steps
            again = post(served, "/v2/models/llm/generate", {"text_input": "after them", "max_tokens": 1})
            again.read()
            if again.status == 200:
                break
            assert again.status == 429, f"a new sequence got {again.status}, not a place freed by the leavers"
            time.sleep(0.05)
    assert shard_metric(served, "cp_shard_ejections") == ejections


def test_critical_steps_go_first_at_a_full_stage(served: RunningStack) -> None:
    """`llm_gated` lets one step at a time into each stage: standard sequences already streaming, a critical one
    that comes last still ends first, because at every stage its step takes the next place."""
    finished: list[str] = []
    streaming = threading.Barrier(5, timeout=60)

    def standard(index: int) -> None:
        response = post(served, "/v2/models/llm_gated/generate_stream",
                        {"text_input": f"standard {index}", "max_tokens": 40})
        assert response.status == 200
        response.readline()  # its first token: it is under way
        streaming.wait()
        got = [json.loads(line[len(b"data: "):]) for line in response.read().split(b"\n")
               if line.startswith(b"data: ")]
        assert len(got) == 39 and "error" not in got[-1]
        finished.append("standard")

    threads = [threading.Thread(target=standard, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    streaming.wait()
    critical = post(served, "/v2/models/llm_gated/generate", {"text_input": "urgent", "max_tokens": 40},
                    {"authorization": f"Bearer {DEMO_KEY}", "x-priority": "critical"})
    assert critical.status == 200 and len(json.loads(critical.read())["token_ids"]) == 40
    finished.append("critical")
    for thread in threads:
        thread.join(timeout=120)
    assert finished[0] == "critical", f"finishing order {finished}: critical steps waited behind standard ones"


def pipeline_steps(stack: RunningStack, metric: str, pipeline: str) -> dict[str, float]:
    """A per-class counter of the gateway's /metrics for one pipeline (cp_pipeline_steps*), by class."""
    with urllib.request.urlopen(f"http://{stack.address}/metrics", timeout=10) as metrics:
        lines = metrics.read().decode().splitlines()
    found = {}
    for line in lines:
        if line.startswith(metric + "_total{") and f'pipeline="{pipeline}"' in line:
            found[line.split('class="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return found


def critical_sequences_are_exact(stack: RunningStack, reference: LlamaForCausalLM, pipeline: str,
                                 prompts: tuple[str, ...], tokens: int) -> None:
    """Critical sequences, one after another: each answered 200 with exactly its greedy tokens."""
    for prompt in prompts:
        critical = post(stack, f"/v2/models/{pipeline}/generate", {"text_input": prompt, "max_tokens": tokens},
                        {"authorization": f"Bearer {DEMO_KEY}", "x-priority": "critical"})
        assert critical.status == 200
        assert json.loads(critical.read())["token_ids"] == greedy(reference, encode(prompt), tokens)


def test_other_classes_pause_while_a_critical_sequence_waits_for_its_first_token(
        served: RunningStack, reference: LlamaForCausalLM) -> None:
    """`llm_urgent` (urgent_steps_per_stage 0): amid 4 standard streams, critical sequences get exactly their greedy
    tokens and none of their steps waits at the gate, standard steps wait while a critical one starts, and every
    standard stream still ends whole (a pause, never a cut)."""
    held_before = pipeline_steps(served, "cp_pipeline_steps_held", "llm_urgent")
    streaming, lengths = threading.Barrier(5, timeout=60), []

    def standard(index: int) -> None:
        response = post(served, "/v2/models/llm_urgent/generate_stream",
                        {"text_input": f"standard {index}", "max_tokens": 60})
        assert response.status == 200
        response.readline()  # its first token: it is under way
        streaming.wait()
        lengths.append(1 + sum(1 for e in events(response) if "token_id" in e))

    threads = [threading.Thread(target=standard, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    streaming.wait()
    critical_sequences_are_exact(served, reference, "llm_urgent", ("urgent one", "urgent two", "urgent three"), 3)
    for thread in threads:
        thread.join(timeout=120)
    held = pipeline_steps(served, "cp_pipeline_steps_held", "llm_urgent")
    assert held.get("critical", 0) == held_before.get("critical", 0)
    assert held["standard"] > held_before.get("standard", 0), "no standard step waited while critical ones started"
    assert lengths == [60] * 4, f"standard streams of {lengths} tokens: a pause must never cut a stream"


def test_batches_formed_at_the_gateway_keep_every_sequence_exact(served: RunningStack,
                                                                  reference: LlamaForCausalLM) -> None:
    """`llm_batched` (one_batch_per_stage): steps wait at the gateway while their stage runs a batch and go in
    together; 4 concurrent sequences still get exactly their greedy tokens."""
    held_before = pipeline_steps(served, "cp_pipeline_steps_held", "llm_batched").get("standard", 0)
    prompts, answers = [f"batched {index}" * (index + 1) for index in range(4)], {}

    def generate(prompt: str) -> None:
        response = post(served, "/v2/models/llm_batched/generate", {"text_input": prompt, "max_tokens": 12})
        answers[prompt] = (response.status, json.loads(response.read()).get("token_ids"))

    threads = [threading.Thread(target=generate, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == {prompt: (200, greedy(reference, encode(prompt), 12)) for prompt in prompts}
    held = pipeline_steps(served, "cp_pipeline_steps_held", "llm_batched")["standard"] - held_before
    assert held > 0, "no step waited for its stage's batch: the gateway formed no batch"


def test_one_stage_at_a_time_beside_critical_sequences_keeps_every_stream_exact_and_whole(
        served: RunningStack, reference: LlamaForCausalLM) -> None:
    """`llm_one_stage` (the example's gate: pause, one batch per stage, one stage at a time): amid 3 standard
    streams, critical sequences get exactly their greedy tokens and never wait at the gate; the standard streams'
    steps wait their turn and every one of them still ends whole, with exactly its greedy tokens."""
    held_before = pipeline_steps(served, "cp_pipeline_steps_held", "llm_one_stage")
    prompts, streaming, answers = [f"flood {index}" for index in range(3)], threading.Barrier(4, timeout=60), {}

    def standard(prompt: str) -> None:
        response = post(served, "/v2/models/llm_one_stage/generate_stream", {"text_input": prompt, "max_tokens": 40})
        assert response.status == 200
        first = json.loads(response.readline()[len(b"data: "):])["token_id"]
        streaming.wait()
        answers[prompt] = [first] + [e["token_id"] for e in events(response) if "token_id" in e]

    threads = [threading.Thread(target=standard, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    streaming.wait()
    critical_sequences_are_exact(served, reference, "llm_one_stage", ("urgent one", "urgent two"), 6)
    for thread in threads:
        thread.join(timeout=120)
    assert answers == {prompt: greedy(reference, encode(prompt), 40) for prompt in prompts}
    held = pipeline_steps(served, "cp_pipeline_steps_held", "llm_one_stage")
    assert held.get("critical", 0) == held_before.get("critical", 0)
    assert held["standard"] > held_before.get("standard", 0), "no standard step waited its turn"


def test_step_gate_gives_freed_places_in_class_order_and_never_holds_the_top_class() -> None:
    async def scenario() -> list[str]:
        gate, replica, order = StepGate(1), object(), []

        async def step(name: str, priority: int) -> None:
            await gate.enter(replica, priority, top=priority == 1)
            order.append(name)

        await step("running", 2)  # holds the one place
        waiting = {name: asyncio.create_task(step(name, priority))
                   for name, priority in (("sheddable", 3), ("gone", 2), ("standard", 2))}
        await asyncio.sleep(0)
        await step("critical", 1)  # the stage is full, yet the top class goes straight in
        waiting["gone"].cancel()  # its client left while it waited
        await asyncio.sleep(0)
        for top in (False, True, False, False):  # running and critical leave, then whoever got their places
            gate.leave(replica, top)
            await asyncio.sleep(0)
        await asyncio.gather(waiting["standard"], waiting["sheddable"])
        assert gate.in_flight == {} and gate.waiting == {}  # nothing kept for an idle replica
        return order

    assert asyncio.run(scenario()) == ["running", "critical", "standard", "sheddable"]


def test_step_gate_holds_other_classes_to_the_urgent_bound_while_a_critical_sequence_starts() -> None:
    async def scenario() -> None:
        gate, replica = StepGate(4, urgent_limit=1), object()
        assert not await gate.enter(replica, 2, top=False)  # no critical sequence starting: the limit (4) holds
        gate.top_starting()  # a critical sequence waits for its first token
        held = asyncio.create_task(gate.enter(replica, 2, top=False))
        await asyncio.sleep(0)
        assert not held.done() and gate.in_flight[replica] == 1  # 1 in flight already: the urgent bound is full
        assert not await gate.enter(replica, 1, top=True)  # the critical step itself goes straight in
        gate.top_started()  # it has its first token: the held step goes in
        assert await held is True and gate.in_flight[replica] == 3

    asyncio.run(scenario())


def test_step_gate_with_one_batch_sends_the_next_batch_only_when_the_stage_is_empty() -> None:
    async def scenario() -> None:
        gate, replica = StepGate(0, one_batch=True), object()
        assert not await gate.enter(replica, 2, top=False)  # an idle stage: it goes in
        waiting = [asyncio.create_task(gate.enter(replica, 2, top=False)) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(task.done() for task in waiting)  # a batch is running: the next one forms here
        assert not await gate.enter(replica, 1, top=True)  # a critical step goes straight in, behind that batch only
        gate.leave(replica, top=False)
        await asyncio.sleep(0)
        assert not any(task.done() for task in waiting)  # the critical step still runs
        gate.leave(replica, top=True)
        assert await asyncio.gather(*waiting) == [True] * 3 and gate.in_flight[replica] == 3  # all at once

    asyncio.run(scenario())


def test_step_gate_with_one_stage_runs_the_other_classes_one_batch_at_a_time_beside_a_critical_sequence() -> None:
    async def scenario() -> None:
        gate, first, second, third = StepGate(0, one_batch=True, one_stage=True), "stage1", "stage2", "stage3"
        assert not await gate.enter(first, 2, top=False)
        assert not await gate.enter(second, 2, top=False)  # no critical sequence: stages run side by side as before
        gate.leave(first, top=False)
        gate.leave(second, top=False)
        gate.top_starting()
        gate.top_started()  # a critical sequence streams: its presence, not its start, makes it one stage at a time
        assert not await gate.enter(first, 2, top=False)  # nothing of theirs runs: a batch goes in
        at_third = asyncio.create_task(gate.enter(third, 2, top=False))  # the oldest held step
        await asyncio.sleep(0)
        at_second = asyncio.create_task(gate.enter(second, 2, top=False))
        await asyncio.sleep(0)
        assert not at_third.done() and not at_second.done()  # a batch of theirs runs at the first stage
        assert not await gate.enter(third, 1, top=True)  # a critical step never waits here
        gate.leave(third, top=True)

        async def next_stage() -> bool:  # the first stage's batch ends, and its step asks for the second at once
            gate.leave(first, top=False)
            return await gate.enter(second, 2, top=False)

        moved = asyncio.create_task(next_stage())
        for _ in range(3):
            await asyncio.sleep(0)
        # the largest batch goes next (2 at the second stage, though the third's step waited longest), whole
        assert at_second.done() and moved.done() and not at_third.done()
        assert gate.in_flight[second] == 2 and not gate.in_flight.get(third) and gate.others_in_flight == 2
        gate.leave(second, top=False)
        await asyncio.sleep(0)
        assert not at_third.done()  # half the batch is still running
        gate.leave(second, top=False)
        assert await at_third is True  # then the third stage's
        gone = asyncio.create_task(gate.enter(first, 2, top=False))  # its client leaves while it waits
        left = asyncio.create_task(gate.enter(second, 2, top=False))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        gate.leave(third, top=False)
        for _ in range(2):
            await asyncio.sleep(0)
        assert await left is True  # the one live step is the batch, though a gone one waited longer
        gate.leave(second, top=False)
        gate.top_ended()
        assert gate.others_in_flight == 0 and gate.in_flight == {} and not any(gate.waiting.values())

    asyncio.run(scenario())


def test_a_stream_ends_at_its_own_deadline_with_a_last_event(served: RunningStack) -> None:
    # The deadline is a third of what the whole stream takes on this machine now (greedy: the same tokens), so it
    # passes mid-stream however fast the machine is (a fixed 1.5 s let a quiet CI run finish all 400 tokens).
    started = time.monotonic()
    whole = post(served, "/v2/models/llm/generate", {"text_input": "long", "max_tokens": 400})
    assert whole.status == 200, whole.read()
    tokens = len(json.loads(whole.read())["token_ids"])
    deadline_ms = max(100, int((time.monotonic() - started) * 1000 / 3))
    response = post(served, "/v2/models/llm/generate_stream", {"text_input": "long", "max_tokens": 400},
                    {"x-deadline-ms": str(deadline_ms)})
    assert response.status == 200, response.read()
    got = events(response)
    assert got[-1]["error"] == "deadline", (got[-1], tokens, deadline_ms)
    assert got[-1]["tokens"] == len(got) - 1 and 0 < len(got) - 1 < tokens


def test_spec_pipelines_name_existing_stage_models_and_no_model_twice() -> None:
    text = SPEC.format(cluster="bad", repository="/tmp", max_sequences=4, demo_key=hash_api_key(DEMO_KEY))
    text = text.replace("llm_2of2], max_sequences: 2", "llm_9of9], max_sequences: 2")
    text = text.replace("{name: llm, stages", "{name: llm_1of2, stages")
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.yaml")
    message = "\n".join(info.value.lines)
    assert "pipelines[0].name" in message and "also a model's name" in message
    assert "pipelines[1].stages[1]" in message and "llm_9of9" in message
    too_many = SPEC.format(cluster="bad", repository="/tmp", max_sequences=4, demo_key=hash_api_key(DEMO_KEY))
    with pytest.raises(SpecError) as info:
        parse_spec(too_many.replace("reserved_for_top_class: 1", "reserved_for_top_class: 2"), "bad.yaml")
    assert "must be below max_sequences" in "\n".join(info.value.lines)


def test_gateway_workers_split_a_pipelines_places() -> None:
    spec = parse_spec(SPEC.format(cluster="split", repository="/tmp", max_sequences=7, demo_key=hash_api_key(DEMO_KEY)))
    parts = [partition_spec(spec, i, 3) for i in range(3)]
    assert [p.pipelines[0].max_sequences for p in parts] == [3, 2, 2]  # llm: 7 places
    single = [(p.pipelines[1].max_sequences, p.pipelines[1].reserved_for_top_class) for p in parts]
    assert single == [(1, 0), (1, 0), (0, 0)]  # llm_single: 2 places, 1 reserved: a worker keeps one for anyone
    steps = [[pipeline.max_steps_per_stage for pipeline in p.pipelines] for p in parts]
    assert steps == [[0, 0, 1, 0, 0, 0]] * 3  # unbounded stays unbounded; llm_gated's 1 step: each worker may send one
    urgent = [[pipeline.urgent_steps_per_stage for pipeline in p.pipelines] for p in parts]
    assert urgent == [[None, None, None, 0, None, 0]] * 3  # off stays off, a pause stays a pause
    assert [[pipeline.one_stage_at_a_time for pipeline in p.pipelines] for p in parts] == [[False] * 5 + [True]] * 3


@pytest.mark.parametrize(("stage", "model", "input_name", "empty", "output_name"),
                         [(0, "llm_1of2", "input_ids", np.zeros((0,), np.int64), "hidden_out"),
                          (1, "llm_2of2", "hidden", np.zeros((0, 0), np.float32), "next_token")])
def test_a_release_step_answer_is_read_as_an_empty_tensor(served: RunningStack, stage: int, model: str,
                                                          input_name: str, empty: np.ndarray, output_name: str
                                                          ) -> None:
    """What the gateway sends when a sequence ends early (end of text): the stage's answer carries an empty
    tensor, which Triton writes with no data at all; the gateway must read it (seen on the H200 run)."""
    body, header_length = step_request_body(12345, END, input_name, empty, output_name)
    connection = http.client.HTTPConnection(stage_urls(served)[stage], timeout=30)
    connection.request("POST", f"/v2/models/{model}/infer", body=body,
                       headers={"inference-header-content-length": str(header_length)})
    answer = connection.getresponse()
    payload, length = answer.read(), answer.getheader("inference-header-content-length")
    connection.close()
    assert answer.status == 200, payload
    assert step_response_tensor(payload, int(length) if length is not None else None).size == 0


def test_a_step_body_carries_the_priority_and_raw_tensor_bytes() -> None:
    hidden = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, header_length = step_request_body(42, START, "hidden", hidden, "hidden_out", priority=1)
    header = json.loads(body[:header_length])
    assert header["parameters"] == {"priority": 1}
    assert [(i["name"], i["shape"], i["datatype"]) for i in header["inputs"]] == [
        ("sequence_id", [1, 1], "UINT64"), ("flags", [1, 1], "INT32"), ("hidden", [1, 2, 3], "FP32")]
    assert body[header_length:] == np.array([42], np.uint64).tobytes() + np.array([START], np.int32).tobytes() \
        + hidden.tobytes()
    answer = json.dumps({"outputs": [{"name": "next_token", "datatype": "INT64", "shape": [1, 1],
                                      "parameters": {"binary_data_size": 8}}]}).encode()
    assert step_response_tensor(answer + np.array([7], np.int64).tobytes(), len(answer)).tolist() == [[7]]
    as_json = json.dumps({"outputs": [{"name": "next_token", "datatype": "INT64", "shape": [1, 1], "data": [9]}]})
    assert step_response_tensor(as_json.encode(), None).tolist() == [[9]]
