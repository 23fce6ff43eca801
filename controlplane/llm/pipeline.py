"""The token loop of a decoder split into pipeline stages, each a Triton model on its own shard.

One sequence's step walks the stages in order: stage 1 takes the new token ids, every later stage the
previous stage's activations, the last answers the greedy next token, which is the next step's input.
Activations travel as raw little-endian FP32 in the KServe v2 binary tensor extension over HTTP (a JSON
header, then the bytes), never as JSON numbers; `bench/llm_transport.py` measures both.

Each stage keeps the KV cache of the sequence under its `sequence_id`: the first step carries the START flag
(a fresh cache), the last the END flag (freed after it); a loop that stops early (end of text) sends an empty
END step, a release. Steps of many sequences meet in each stage's dynamic batcher, which batches them
(continuous batching) and takes higher-priority steps first: `priority` is Triton's (1 is the highest).

tritonclient's HTTP clients are not thread-safe: one `PipelineClient` per thread.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

try:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except ImportError:  # the GPU machine has none: the gateway imports this module for the step encoding alone
    httpclient = InferenceServerException = None  # PipelineClient (benchmarks, tests) needs tritonclient

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


class PipelineError(RuntimeError):
    """A stage refused or failed a step (its message says which stage and why)."""


@dataclass(frozen=True)
class Stage:
    client: httpclient.InferenceServerClient
    model: str


class PipelineClient:
    """Drives sequences through the stages at `stage_urls` (host:port of each stage's shard, in order)."""

    def __init__(self, stage_urls: list[str], model: str = "llm", timeout_s: float = 60.0) -> None:
        names = stage_model_names(model, len(stage_urls))
        self.stages = [Stage(httpclient.InferenceServerClient(url, network_timeout=timeout_s), name)
                       for url, name in zip(stage_urls, names, strict=True)]

    def close(self) -> None:
        for stage in self.stages:
            stage.client.close()

    def generate(self, prompt_ids: list[int], max_tokens: int, priority: int = 0,
                 stop_at_eos: bool = True) -> Iterator[int]:
        """The greedy continuation of `prompt_ids`, token by token, at most `max_tokens` of them."""
        if not prompt_ids:
            raise PipelineError("the prompt is empty")
        sequence_id = secrets.randbits(63) or 1
        step_input = np.asarray(prompt_ids, dtype=np.int64)
        released = False
        try:
            for step in range(max_tokens):
                last = step == max_tokens - 1
                flags = (START if step == 0 else 0) | (END if last else 0)
                token = self.step(sequence_id, flags, step_input, priority)
                released = last
                yield token
                if stop_at_eos and token == EOS:
                    break
                step_input = np.asarray([token], dtype=np.int64)
        finally:
            if not released and max_tokens > 0:
                self.release(sequence_id, priority)

    def step(self, sequence_id: int, flags: int, token_ids: np.ndarray, priority: int = 0) -> int:
        """One step of one sequence through every stage; the next token."""
        carried = token_ids
        for index, stage in enumerate(self.stages):
            first, last = index == 0, index == len(self.stages) - 1
            inputs = _step_tensors(sequence_id, flags, "input_ids" if first else "hidden", carried)
            output = "next_token" if last else "hidden_out"
            try:
                result = stage.client.infer(stage.model, inputs, priority=priority,
                                            outputs=[httpclient.InferRequestedOutput(output, binary_data=True)])
            except InferenceServerException as error:
                raise PipelineError(f"stage {stage.model}: {error.message()}") from None
            carried = result.as_numpy(output)[0]
        return int(carried[0])

    def release(self, sequence_id: int, priority: int = 0) -> None:
        """Free the sequence's caches at every stage (a loop that ended before its END step)."""
        for index, stage in enumerate(self.stages):
            empty = np.zeros((0,), np.int64) if index == 0 else np.zeros((0, 0), np.float32)
            name = "input_ids" if index == 0 else "hidden"
            output = "next_token" if index == len(self.stages) - 1 else "hidden_out"
            # the stage evicts idle caches by itself: a release that fails is not worth an error
            with contextlib.suppress(InferenceServerException):
                stage.client.infer(stage.model, _step_tensors(sequence_id, END, name, empty), priority=priority,
                                   outputs=[httpclient.InferRequestedOutput(output, binary_data=True)])


def _step_tensors(sequence_id: int, flags: int, name: str, data: np.ndarray) -> list[httpclient.InferInput]:
    tensors = []
    for tensor_name, array in (("sequence_id", np.array([[sequence_id]], np.uint64)),
                               ("flags", np.array([[flags]], np.int32)), (name, data[None])):
        tensor = httpclient.InferInput(tensor_name, list(array.shape), _datatype(array))
        tensor.set_data_from_numpy(array, binary_data=True)
        tensors.append(tensor)
    return tensors


def _datatype(array: np.ndarray) -> str:
    return {np.dtype(np.uint64): "UINT64", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
            np.dtype(np.float32): "FP32"}[array.dtype]


# --- the same step as raw HTTP bytes (the gateway's pooled upstream connections, no tritonclient) -------------
_TRITON_DATATYPES = {np.dtype(np.uint64): "UINT64", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
                     np.dtype(np.float32): "FP32"}
_NUMPY_DATATYPES = {name: dtype for dtype, name in _TRITON_DATATYPES.items()}


def step_request_body(sequence_id: int, flags: int, input_name: str, data: np.ndarray, output_name: str,
                      priority: int = 0, timeout_us: int = 0) -> tuple[bytes, int]:
    """A KServe v2 binary-tensor infer body of one step, and its JSON header's length (the
    Inference-Header-Content-Length header)."""
    arrays = [("sequence_id", np.array([[sequence_id]], np.uint64)), ("flags", np.array([[flags]], np.int32)),
              (input_name, np.ascontiguousarray(data[None]))]
    parameters: dict[str, int] = {"priority": priority} if priority else {}
    if timeout_us:
        parameters["timeout"] = timeout_us
    header = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": _TRITON_DATATYPES[array.dtype],
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
    if header_length is None:
        return np.asarray(output["data"], dtype).reshape(output["shape"])
    size = output["parameters"]["binary_data_size"]
    return np.frombuffer(body[header_length:header_length + size], dtype).reshape(output["shape"])
