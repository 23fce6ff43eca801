"""KServe v2 inference bodies with the binary tensor extension, built and read without tritonclient.

The GPU machine has no tritonclient; the benchmark and `cpctl convert`'s verification send tensors as raw
bytes after a JSON header (`Inference-Header-Content-Length`), the way Triton's own clients do.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

DATATYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
             "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class InferBody:
    body: bytes
    headers: dict[str, str]


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    raise ValueError(f"no KServe datatype for numpy dtype {array.dtype}")


def bytes_tensor(items: list[bytes]) -> bytes:
    """BYTES tensor data: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def infer_body(inputs: dict[str, np.ndarray | list[bytes]], outputs: list[str]) -> InferBody:
    """A binary request: numpy arrays as their datatype; a list of bytes as BYTES of shape [N, 1]."""
    header_inputs, payloads = [], []
    for name, value in inputs.items():
        if isinstance(value, list):
            data, shape, datatype = bytes_tensor(value), [len(value), 1], "BYTES"
        else:
            data, shape, datatype = np.ascontiguousarray(value).tobytes(), list(value.shape), datatype_of(value)
        header_inputs.append({"name": name, "shape": shape, "datatype": datatype,
                              "parameters": {"binary_data_size": len(data)}})
        payloads.append(data)
    header = json.dumps({"inputs": header_inputs,
                         "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs]}).encode()
    return InferBody(header + b"".join(payloads), {"Inference-Header-Content-Length": str(len(header)),
                                                   "Content-Type": "application/octet-stream"})


def read_outputs(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    """The outputs of a response, binary or JSON, as numpy arrays by name."""
    header = json.loads(body[:header_length] if header_length else body)
    offset = header_length or 0
    found = {}
    for output in header["outputs"]:
        dtype = DATATYPES[output["datatype"]]
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            found[output["name"]] = np.asarray(output["data"], dtype=dtype).reshape(output["shape"])
        else:
            found[output["name"]] = np.frombuffer(body[offset:offset + size], dtype=dtype).reshape(output["shape"])
            offset += size
    return found
