"""Large binary bodies are forwarded while they arrive (server.StreamedBody), through real Triton shards.

A body of STREAM_BODY_BYTES or more with a binary inference header is checked, queued and sent on as soon as its
JSON header is in; its tensor bytes follow piece by piece. These tests send such bodies to the example stack's
`work` model, which echoes `x` as `y`: what comes back is exactly what the shard received.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import numpy as np
import tritonclient.http as httpclient

from controlplane.bench.tensors import infer_body, read_outputs
from controlplane.gateway.server import STREAM_BODY_BYTES, StreamedBody

from .conftest import RunningStack

KEY = "Bearer cp-demo-key"


def large_x(rows: int = 4, seed: int = 0) -> np.ndarray:
    """FP32 rows that make a body of about 2 MiB, past the streaming threshold, under the stack's 8 MiB limit."""
    values = np.random.default_rng(seed).standard_normal((rows, STREAM_BODY_BYTES // (2 * rows))).astype(np.float32)
    assert values.nbytes > STREAM_BODY_BYTES
    return values


def assert_work_echoes(client: httpclient.InferenceServerClient, x: np.ndarray) -> None:
    """`work` answers its input: sent as a binary tensor, `y` comes back equal to `x`."""
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    np.testing.assert_array_equal(client.infer("work", [tensor], headers={"Authorization": KEY}).as_numpy("y"), x)


def request_head(body_length: int, header_length: int, model: str = "work") -> bytes:
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: gateway\r\nAuthorization: {KEY}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}\r\n"
            f"Content-Length: {body_length}\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (what the gateway sends for /infer), read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed inside a response body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def echoed(body: bytes, headers: dict[str, str]) -> np.ndarray:
    header_length = headers.get("inference-header-content-length")
    return read_outputs(body, int(header_length) if header_length else None)["y"]


def shard_gauge(stack: RunningStack, name: str) -> float:
    """A per-shard gauge of the gateway's /metrics, summed over its shards and workers."""
    with urllib.request.urlopen(f"http://{stack.address}/metrics", timeout=10) as metrics:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.read().decode().splitlines()
                   if line.startswith(name + "{"))


def wait_for_a_request_in_flight(stack: RunningStack) -> float:
    """The gateway's requests in flight at its shards, once there is one (or the last reading after 10 s)."""
    deadline = time.monotonic() + 10
    while not (in_flight := shard_gauge(stack, "cp_shard_in_flight")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return in_flight


def wait_for_no_request_in_flight(stack: RunningStack) -> float:
    """The gateway's requests in flight at its shards, once they are back to 0 (or the last reading after 10 s)."""
    deadline = time.monotonic() + 10
    while (in_flight := shard_gauge(stack, "cp_shard_in_flight")) and time.monotonic() < deadline:
        time.sleep(0.1)
    return in_flight


def test_streamed_body_keeps_its_header_and_pieces_apart() -> None:
    streamed = StreamedBody(header_length=10, length=30)
    assert not streamed.feed(b"0123")  # the header is not in yet
    assert streamed.feed(b"456789abcdef")  # it completes here; the rest is binary data
    written = []
    assert streamed.attach(written.append) == [b"abcdef"]
    streamed.feed(b"ghijklmnopqrst")
    assert (streamed.head(), written, streamed.length) == (b"0123456789", [b"ghijklmnopqrst"], 20)
    assert streamed.whole() == b"0123456789abcdefghijklmnopqrst"
    streamed.drop()
    streamed.feed(b"late")
    assert streamed.pieces == [] and written == [b"ghijklmnopqrst"]


def test_large_binary_bodies_reach_the_shard_intact_with_a_standard_client(stack: RunningStack) -> None:
    client = httpclient.InferenceServerClient(stack.address, network_timeout=30)
    try:
        for seed in range(3):  # one keep-alive connection, one request after another
            x = large_x(seed=seed)
            tensor = httpclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            result = client.infer("work", [tensor], headers={"Authorization": KEY},
                                  outputs=[httpclient.InferRequestedOutput("y", binary_data=True)])
            np.testing.assert_array_equal(result.as_numpy("y"), x)
        small = np.ones((1, 4), np.float32)
        tensor = httpclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(small)
        np.testing.assert_array_equal(client.infer("work", [tensor], headers={"Authorization": KEY}).as_numpy("y"),
                                      small)
    finally:
        client.close()


def test_a_slow_client_body_is_forwarded_as_it_trickles_in(stack: RunningStack) -> None:
    x = large_x(seed=7)
    request = infer_body({"x": x}, ["y"])
    header_length = int(request.headers["Inference-Header-Content-Length"])
    host, port = stack.address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request_head(len(request.body), header_length))
        piece = len(request.body) // 16 + 1
        for start in range(0, len(request.body), piece):  # 16 pieces, 20 ms apart: ~0.3 s of sending
            sock.sendall(request.body[start:start + piece])
            if start == 8 * piece:  # half of it sent: already at the shard, not waiting for the rest
                assert wait_for_a_request_in_flight(stack) == 1
            time.sleep(0.02)
        status, headers, body = read_response(sock)
        assert status == 200, body[:300]
        np.testing.assert_array_equal(echoed(body, headers).reshape(x.shape), x)
        # The same connection goes on with a small request afterwards.
        small = infer_body({"x": np.arange(4, dtype=np.float32).reshape(1, 4)}, ["y"])
        small_header = int(small.headers["Inference-Header-Content-Length"])
        sock.sendall(request_head(len(small.body), small_header) + small.body)
        status, headers, body = read_response(sock)
        assert status == 200 and echoed(body, headers).tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_a_client_that_leaves_mid_body_leaves_nothing_in_flight(stack: RunningStack) -> None:
    request = infer_body({"x": large_x(seed=3)}, ["y"])
    header_length = int(request.headers["Inference-Header-Content-Length"])
    host, port = stack.address.split(":")
    for _ in range(4):  # several times: each one's shard slot and upstream connection must be given back
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(request_head(len(request.body), header_length) + request.body[:len(request.body) // 2])
            assert wait_for_a_request_in_flight(stack) == 1  # forwarded: the header and half the tensor
    assert wait_for_no_request_in_flight(stack) == 0
    # The shards' connections that carried half a body are never reused: the next requests are answered right.
    client = httpclient.InferenceServerClient(stack.address, network_timeout=30)
    try:
        for seed in range(4):
            assert_work_echoes(client, large_x(seed=seed + 10))
    finally:
        client.close()


def test_a_body_over_the_limit_gets_413_and_is_never_forwarded(stack: RunningStack) -> None:
    limit = 8 * 1024 * 1024  # examples/local/cluster.yaml: gateway.limits.max_body_bytes
    served_before = shard_gauge(stack, "cp_shard_served")
    host, port = stack.address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request_head(limit + 1, 200) + b" " * 200)
        status, headers, body = read_response(sock)
    assert status == 413 and headers["content-type"] == "application/json"
    assert "exceeds the limit of 8388608 bytes" in json.loads(body)["error"]
    assert shard_gauge(stack, "cp_shard_served") == served_before


def test_a_streamed_body_whose_header_lies_is_refused_before_the_shard(stack: RunningStack) -> None:
    x = large_x(seed=5)
    request = infer_body({"x": x}, ["y"])
    header = json.loads(request.body[:int(request.headers["Inference-Header-Content-Length"])])
    header["inputs"][0]["shape"] = [x.shape[0], x.shape[1] // 2]  # half the bytes the body carries
    lying = json.dumps(header).encode()
    body = lying + x.tobytes()
    served_before = shard_gauge(stack, "cp_shard_served")
    host, port = stack.address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request_head(len(body), len(lying)) + body)
        status, _, answer = read_response(sock)
    assert status == 400 and "bytes of FP32" in json.loads(answer)["error"]
    assert shard_gauge(stack, "cp_shard_served") == served_before


def test_a_streamed_bytes_input_is_checked_once_whole(stack: RunningStack) -> None:
    """BYTES elements can only be checked with their bytes: such a body waits until it is all in."""
    broken = (5).to_bytes(4, "little") + b"x" * (STREAM_BODY_BYTES + 100)  # claims 5 bytes, carries far more
    header = json.dumps({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(broken)}}]}).encode()
    host, port = stack.address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request_head(len(header) + len(broken), len(header), model="textgen") + header + broken)
        status, _, answer = read_response(sock)
    assert status == 400 and "BYTES data does not match its shape" in json.loads(answer)["error"]
