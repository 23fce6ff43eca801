"""End to end: a standard Triton client, unchanged, talks to real Triton shards through the gateway."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import socket
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, RunningStack

RISK_WEIGHTS = ROOT / "examples" / "models" / "risk" / "1" / "weights.npz"


def risk_reference(features: np.ndarray) -> np.ndarray:
    """The risk model's score computed here, from the same shipped weights."""
    weights = np.load(RISK_WEIGHTS)
    h = features
    for i in range(2):
        h = np.maximum(h @ weights[f"w{i}"] + weights[f"b{i}"], 0)
    return 1 / (1 + np.exp(-(h @ weights["w2"] + weights["b2"])))


@pytest.fixture
def client(stack: RunningStack):
    c = httpclient.InferenceServerClient(stack.address, connection_timeout=10, network_timeout=30)
    yield c
    c.close()


def post(stack: RunningStack, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(stack.address, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_risk_scores_match_the_model_through_the_gateway(client, binary: bool) -> None:
    features = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32)
    tensor = httpclient.InferInput("features", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("score", binary_data=binary)]
    result = client.infer("risk", [tensor], outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("score"), risk_reference(features), rtol=1e-5, atol=1e-6)


def test_work_model_echoes_binary_input_and_takes_a_request_parameter(client) -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer("work", [tensor], parameters={"work_ms": 1}, request_compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def test_metadata_config_and_readiness_through_the_gateway(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("risk") and client.is_model_ready("risk", model_version="1")
    metadata = client.get_model_metadata("risk", model_version="1")
    assert metadata["inputs"][0]["name"] == "features" and metadata["outputs"][0]["name"] == "score"
    config = client.get_model_config("work")
    assert config["max_batch_size"] == 64 and config["dynamic_batching"] is not None
    assert client.get_server_metadata()["name"] == "controlplane-gateway"


def test_unknown_model_is_404_for_tritonclient(client) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404" and "unknown model 'nope'" in info.value.message()


def test_generate_stream_passes_events_through_as_they_are_produced(stack: RunningStack) -> None:
    conn = http.client.HTTPConnection(stack.address, timeout=30)
    conn.request("POST", "/v2/models/textgen/generate_stream",
                 body=json.dumps({"text_input": "alpha beta gamma", "max_tokens": 6}))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events, arrivals = [], []
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:])["text_output"])
            arrivals.append(time.monotonic())
    conn.close()
    assert events == ["gamma ", "beta ", "alpha ", "gamma ", "beta ", "alpha "]
    # The model waits 20 ms before each token: events relayed one by one arrive spread out, not in one lump.
    assert arrivals[-1] - arrivals[0] > 0.05


def test_generate_passes_through_for_a_single_response_model(stack: RunningStack) -> None:
    status, _, body = post(stack, "/v2/models/work/generate", json.dumps({"x": [1.5, 2.5]}).encode())
    assert status == 200 and body["y"] == [1.5, 2.5]


def infer_body(inputs: list) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


FEATURES_OK = {"name": "features", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}
BINARY_HEADER = infer_body([{"name": "features", "datatype": "FP32", "shape": [1, 16],
                             "parameters": {"binary_data_size": 60}}])
BOTH_HEADER = infer_body([{**FEATURES_OK, "parameters": {"binary_data_size": 64}}])
BAD_REQUESTS = {
    "unknown model": ("/v2/models/nope/infer", infer_body([FEATURES_OK]), {}, 404, "unknown model"),
    "malformed json": ("/v2/models/risk/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    "inputs not a list": ("/v2/models/risk/infer", b'{"inputs": {"a": 1}}', {}, 400, "'inputs' must be"),
    "huge shape": ("/v2/models/risk/infer", infer_body([{**FEATURES_OK, "shape": [1099511627776, 16], "data": [1]}]),
                   {}, 400, "shape holds"),
    "shape/data mismatch": ("/v2/models/risk/infer", infer_body([{**FEATURES_OK, "data": [1.0, 2.0]}]), {}, 400,
                            "'data' has 2"),
    "strings as numbers": ("/v2/models/risk/infer", infer_body([{**FEATURES_OK, "data": ["1"] * 16}]), {}, 400,
                           "not FP32"),
    "wrong datatype": ("/v2/models/risk/infer", infer_body([{**FEATURES_OK, "datatype": "INT64"}]), {}, 400,
                       "expects 'FP32'"),
    "wrong rank": ("/v2/models/risk/infer", infer_body([{**FEATURES_OK, "shape": [16]}]), {}, 400,
                   "the model expects [-1, 16]"),
    "unknown input": ("/v2/models/risk/infer", infer_body([{**FEATURES_OK, "name": "amount"}]), {}, 400,
                      "unknown input 'amount'"),
    "binary size mismatch": ("/v2/models/risk/infer", BINARY_HEADER + b"\0" * 60,
                             {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400,
                             "shape needs 64 bytes of FP32, binary_data_size is 60"),
    "data and binary both": ("/v2/models/risk/infer", BOTH_HEADER + b"\0" * 64,
                             {"Inference-Header-Content-Length": str(len(BOTH_HEADER))}, 400, "only one of"),
    "header length past the body": ("/v2/models/risk/infer", infer_body([FEATURES_OK]),
                                    {"Inference-Header-Content-Length": "999999"}, 400, "outside the body"),
    "nested generate input": ("/v2/models/work/generate", b'{"x": [[1, 2]]}', {}, 400, "flat list"),
    "bad gzip": ("/v2/models/risk/infer", b"not gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_a_json_error_and_never_reach_triton(stack: RunningStack, case) -> None:
    path, body, headers, expected_status, message = case
    pids_before = stack.shard_pids()
    status, response_headers, error = post(stack, path, body, headers)
    assert status == expected_status
    assert response_headers["content-type"] == "application/json" and message in error["error"]
    assert stack.shard_pids() == pids_before  # no shard crashed or restarted


def test_wrong_method_and_unknown_route(stack: RunningStack) -> None:
    conn = http.client.HTTPConnection(stack.address, timeout=10)
    conn.request("GET", "/v2/models/risk/infer")
    response = conn.getresponse()
    assert response.status == 405 and "takes POST" in json.loads(response.read())["error"]
    conn.request("GET", "/v3/anything")
    response = conn.getresponse()
    assert response.status == 404 and "no route" in json.loads(response.read())["error"]
    conn.close()


def test_gzip_request_body_is_checked_then_forwarded(stack: RunningStack) -> None:
    body = gzip.compress(infer_body([FEATURES_OK]))
    status, _, result = post(stack, "/v2/models/risk/infer", body, {"Content-Encoding": "gzip"})
    assert status == 200 and 0 <= result["outputs"][0]["data"][0] <= 1


def raw_exchange(stack: RunningStack, payload: bytes) -> bytes:
    """Send raw bytes, return everything the gateway answers until it closes or goes quiet."""
    host, port = stack.address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        sock.settimeout(2)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_oversized_body_gets_413_before_it_is_read(stack: RunningStack) -> None:
    head = b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    answer = raw_exchange(stack, head + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"exceeds the limit" in answer


def test_oversized_headers_get_431(stack: RunningStack) -> None:
    answer = raw_exchange(stack, b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_garbage_gets_400_json(stack: RunningStack) -> None:
    answer = raw_exchange(stack, b"\x16\x03\x01 this is not http\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"error":"malformed HTTP request' in answer


def test_pipelined_requests_are_answered_in_order(stack: RunningStack) -> None:
    body = infer_body([FEATURES_OK])
    infer = b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    answer = raw_exchange(stack, b"GET /v2/models/nope HTTP/1.1\r\nHost: x\r\n\r\n" + infer
                          + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"404", b"200", b"200"]
    assert b'"name":"score"' in answer
