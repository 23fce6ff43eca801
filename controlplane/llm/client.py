"""The pipeline's token loop as a synchronous tritonclient client (tests, benchmarks): the loop of
`controlplane/llm/pipeline.py`, step by step through each stage's shard.

tritonclient's HTTP clients are not thread-safe: one `PipelineClient` per thread.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from controlplane.llm.pipeline import END, EOS, START, TRITON_DATATYPES, stage_model_names


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
        tensor = httpclient.InferInput(tensor_name, list(array.shape), TRITON_DATATYPES[array.dtype])
        tensor.set_data_from_numpy(array, binary_data=True)
        tensors.append(tensor)
    return tensors
