"""The token loop of a decoder split into pipeline stages, each a Triton model on its own shard.

One sequence's step walks the stages in order: stage 1 takes the new token ids, every later stage the
previous stage's activations, the last answers the greedy next token, which is the next step's input.
Activations travel as raw little-endian FP32 in the KServe v2 binary tensor extension over HTTP (a JSON
header, then the bytes), never as JSON numbers; `bench/llm_transport.py` measures both.

Each stage keeps the KV cache of the sequence under its `sequence_id`: the first step carries the START flag
(a fresh cache), the last the END flag (freed after it); a loop that stops early (end of text) sends an empty
END step, a release. Steps of many sequences meet in each stage's dynamic batcher, which batches them
(continuous batching) and takes higher-priority steps first: `priority` is Triton's (1 is the highest).

This module needs numpy only (the gateway imports it; the GPU machine has no tritonclient); the same loop as a
synchronous tritonclient client, for tests and benchmarks, is `controlplane/llm/client.py`.
"""

from __future__ import annotations

import json

import numpy as np

START, END = 1, 2
BOS, EOS = 1, 2
BYTE_OFFSET = 3  # ids 0..2 are pad, BOS, EOS; 3..258 are the bytes 0..255


def encode(text: str) -> list[int]:
    """The prompt's ids: BOS, then one id per UTF-8 byte (the example's checkpoints have no trained tokenizer)."""
    return [BOS, *(byte + BYTE_OFFSET for byte in text.encode())]


def decode(ids: list[int]) -> str:
    """Text of byte ids; ids outside the byte range (specials, a 32000-word vocabulary's rest) are dropped."""
    return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256).decode(errors="replace")


def stage_model_names(model: str, stages: int) -> list[str]:
    """`llm`, 2 -> [llm_1of2, llm_2of2]: the Triton names of the stages (the stage model reads its place there)."""
    return [f"{model}_{k}of{stages}" for k in range(1, stages + 1)]


# --- one step as raw HTTP bytes (the gateway's pooled upstream connections) -----------------------------------
TRITON_DATATYPES = {np.dtype(np.uint64): "UINT64", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
                     np.dtype(np.float32): "FP32"}
_NUMPY_DATATYPES = {name: dtype for dtype, name in TRITON_DATATYPES.items()}


def step_request_body(sequence_id: int, flags: int, input_name: str, data: np.ndarray, output_name: str,
                      priority: int = 0, timeout_us: int = 0) -> tuple[bytes, int]:
    """A KServe v2 binary-tensor infer body of one step, and its JSON header's length (the
    Inference-Header-Content-Length header)."""
    arrays = [("sequence_id", np.array([[sequence_id]], np.uint64)), ("flags", np.array([[flags]], np.int32)),
              (input_name, np.ascontiguousarray(data[None]))]
    parameters: dict[str, int] = {"priority": priority} if priority else {}
    if timeout_us:
        parameters["timeout"] = timeout_us
    header = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": TRITON_DATATYPES[array.dtype],
                          "parameters": {"binary_data_size": array.nbytes}} for name, array in arrays],
              "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
              "parameters": parameters}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b"".join(array.tobytes() for _, array in arrays), len(encoded)


def step_response_tensor(body: bytes, header_length: int | None) -> np.ndarray:
    """The one output tensor of a step's response (binary, or JSON `data` when the server chose it)."""
    header = json.loads(body[:header_length] if header_length is not None else body)
    (output,) = header["outputs"]
    dtype = _NUMPY_DATATYPES[output["datatype"]]
    if header_length is None:  # an empty tensor (a release's answer) comes with no data at all
        return np.asarray(output.get("data", []), dtype).reshape(output["shape"])
    size = output["parameters"]["binary_data_size"]
    return np.frombuffer(body[header_length:header_length + size], dtype).reshape(output["shape"])
