"""Checks of a KServe v2 inference request before it may reach Triton.

Triton itself must not see malformed requests: on the build we run, a JSON header claiming a huge shape
aborts the whole server, and malformed JSON, shape/data mismatches or strings-as-numbers come back as 500.
So the gateway parses the JSON inference header (only the header: binary tensor data stays bytes) and checks
names, datatypes and shapes against the model's metadata and against the bytes actually present.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import orjson

ELEMENT_SIZE = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 0,
}
INTEGER_TYPES = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}
MAX_RANK = 16


class BadRequest(ValueError):
    """A client error; the message names the problem and goes back to the client as JSON."""


class NeedsWholeBody(Exception):
    """A body still arriving cannot be checked yet: a BYTES input's elements must be read (check it once whole)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a variable dimension


@dataclass(frozen=True)
class ModelSignature:
    """What a model accepts, from Triton's model metadata and configuration."""

    inputs: dict[str, TensorSpec]
    outputs: frozenset[str]
    batching: bool = False  # the first dimension is the batch
    priority_levels: int = 0  # Triton dynamic-batching priority levels (0: the model ignores priority)
    timeout_override: bool = False  # the queue policy lets a request shorten its timeout

    @classmethod
    def from_triton(cls, metadata: dict, config: dict) -> ModelSignature:
        inputs = {
            t["name"]: TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
            for t in metadata.get("inputs", [])
        }
        batcher = config.get("dynamic_batching") or {}
        policy = batcher.get("default_queue_policy") or {}
        return cls(inputs, frozenset(t["name"] for t in metadata.get("outputs", [])),
                   batching=int(config.get("max_batch_size") or 0) > 0,
                   priority_levels=int(batcher.get("priority_levels") or 0),
                   timeout_override=bool(policy.get("allow_timeout_override")))


class InferHeader:
    """A checked inference request: its parsed JSON header and where the binary tensor data starts. (A plain
    class: compiled, a dataclass's generated __init__ would run as Python code, once per request.)"""

    def __init__(self, header: dict, binary_offset: int | None, cost: float) -> None:
        self.header = header
        self.binary_offset = binary_offset  # None: a JSON-only body
        self.cost = cost  # batch size (1 for a model without batching)

    def with_parameters(self, body: bytes, parameters: dict) -> tuple[bytes, int | None]:
        """The body with request parameters added to its header; binary data is reused, not re-encoded."""
        merged = {**(self.header.get("parameters") or {}), **parameters}
        header_bytes = orjson.dumps({**self.header, "parameters": merged})
        if self.binary_offset is None:
            return header_bytes, None
        return header_bytes + memoryview(body)[self.binary_offset:], len(header_bytes)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The decoded body of a gzip/deflate request, refusing to inflate past `limit` bytes."""
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding '{encoding}' (use gzip or deflate)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequest(f"body is not valid {encoding} data") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise BadRequest(f"decompressed body exceeds the limit of {limit} bytes")
    return data


def check_infer_request(body: bytes, header_length: int | None, signature: ModelSignature,
                        arriving: int = -1) -> InferHeader:
    """Validate an infer body (JSON, or JSON header + binary tensors); return the parsed header. `arriving`: the
    body is only its JSON header and this many bytes of binary data are still arriving (they are checked by
    their sizes; a BYTES input raises NeedsWholeBody)."""
    if header_length is None:
        header_bytes, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    binary_size = len(binary) if arriving < 0 else arriving
    header = json_object(header_bytes, "inference header", "a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list")

    offset = 0
    cost = 1.0
    seen: set[str] = set()
    for i, tensor in enumerate(inputs):
        # Messages are built only on failure: this loop runs for every request.
        if type(tensor) is not dict:
            raise BadRequest(f"inputs[{i}] must be an object")
        name = tensor.get("name")
        if type(name) is not str:
            raise BadRequest(f"inputs[{i}].name must be a string")
        expected = signature.inputs.get(name)
        if expected is None:
            raise BadRequest(f"unknown input '{name}' (the model takes: {', '.join(sorted(signature.inputs))})")
        if name in seen:
            raise BadRequest(f"input '{name}' is given twice")
        seen.add(name)
        datatype = tensor.get("datatype")
        if datatype != expected.datatype:
            raise BadRequest(f"input '{name}' has datatype {datatype!r}, the model expects {expected.datatype!r}")
        shape = tensor.get("shape")
        count = _check_shape(name, shape, expected.shape)
        if signature.batching and i == 0:
            cost = float(max(1, shape[0]))
        parameters = tensor.get("parameters")
        size = None
        if parameters is not None:
            if type(parameters) is not dict:
                raise BadRequest(f"input '{name}'.parameters must be an object")
            size = parameters.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise BadRequest(f"input '{name}' may give only one of 'data' and parameters.binary_data_size")
            if type(size) is not int or size < 0:
                raise BadRequest(f"input '{name}'.parameters.binary_data_size must be a non-negative integer")
            if offset + size > binary_size:
                raise BadRequest(f"input '{name}' claims {size} bytes of binary data but only "
                                 f"{binary_size - offset} are left in the body")
            if arriving < 0:
                _check_binary(f"input '{name}'", datatype, count, binary[offset:offset + size])
            elif ELEMENT_SIZE[datatype] == 0:
                raise NeedsWholeBody(name)
            else:
                _check_binary_size(f"input '{name}'", datatype, count, size)
            offset += size
        elif "data" in tensor:
            _check_json_data(name, datatype, count, tensor["data"])
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if offset != binary_size:
        raise BadRequest(f"the body has {binary_size - offset} bytes of binary data that no input claims")
    # Missing inputs are left to Triton: metadata does not say which are optional, and Triton answers 400.
    _check_outputs(header.get("outputs"), signature)
    if "parameters" in header and not isinstance(header["parameters"], dict):
        raise BadRequest("'parameters' must be an object")
    return InferHeader(header, header_length, cost)


def json_object(data: bytes | memoryview, what: str, shape: str) -> dict:
    """`data` parsed as a JSON object, or BadRequest naming `what` and the `shape` it must have."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"{what} must be {shape}")
    return document


def check_generate_request(body: bytes, signature: ModelSignature) -> dict:
    """Validate a /generate body: a JSON object whose model-input keys hold a scalar or a flat list.

    Triton's generate extension maps each key to the input of that name; others are request parameters.
    It answers nested lists and wrong types with 500, so they are refused here with 400.
    """
    payload = json_object(body, "body", "a JSON object of input names to values")
    for name, value in payload.items():
        expected = signature.inputs.get(name)
        if expected is None:
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, list | dict) for v in values):
            raise BadRequest(f"input '{name}' must be a scalar or a flat list of {expected.datatype}")
        _check_json_data(name, expected.datatype, len(values), values)
    return payload


def _check_shape(name: str, shape: object, expected: tuple[int, ...]) -> int:
    if type(shape) is not list or len(shape) > MAX_RANK or len(shape) != len(expected):
        _shape_error(name, shape, expected)
    count = 1
    for dimension, wanted in zip(shape, expected):  # noqa: B905 - lengths checked above
        if type(dimension) is not int or dimension < 0 or (wanted != -1 and dimension != wanted):
            _shape_error(name, shape, expected)
        count *= dimension
    return count


def _shape_error(name: str, shape: object, expected: tuple[int, ...]) -> None:
    where = f"input '{name}'"
    if not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) for d in shape):
        raise BadRequest(f"{where}.shape must be a list of integers")
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise BadRequest(f"{where}.shape {shape} is not a valid shape")
    raise BadRequest(f"{where} has shape {shape}, the model expects {list(expected)} (-1: any size)")


def _check_binary_size(where: str, datatype: str, count: int, size: int) -> None:
    if size != count * ELEMENT_SIZE[datatype]:
        raise BadRequest(f"{where}: shape needs {count * ELEMENT_SIZE[datatype]} bytes of {datatype}, "
                         f"binary_data_size is {size}")


def _check_binary(where: str, datatype: str, count: int, data: memoryview) -> None:
    if ELEMENT_SIZE[datatype]:
        _check_binary_size(where, datatype, count, len(data))
        return
    # BYTES: each element is a 4-byte little-endian length followed by that many bytes.
    position = 0
    for _ in range(count):
        if position + 4 > len(data):
            raise BadRequest(f"{where}: BYTES data ends before its {count} elements")
        (length,) = struct.unpack_from("<I", data, position)
        position += 4 + length
    if position != len(data):
        raise BadRequest(f"{where}: BYTES data does not match its shape of {count} elements")


def _flatten(data: object, out: list) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


NUMBER_TYPES = {int, float}  # exact types: bool, a subclass of int, is not a number here


def _check_json_data(name: str, datatype: str, count: int, data: object) -> None:
    """The values of a JSON tensor: as many as the shape holds, of the datatype (a flat list is the common,
    fast case; nested lists are flattened)."""
    if type(data) is list and not any(type(v) is list for v in data):
        flat = data
    else:
        flat = []
        _flatten(data, flat)
    if len(flat) != count:
        raise BadRequest(f"input '{name}': shape holds {count} elements, 'data' has {len(flat)}")
    types = set(map(type, flat))
    if datatype == "BYTES":
        valid = types <= {str}
    elif datatype == "BOOL":
        valid = types <= {bool}
    elif datatype in INTEGER_TYPES:
        valid = types <= {int}
    else:
        valid = types <= NUMBER_TYPES
    if not valid:
        raise BadRequest(f"input '{name}': 'data' holds values that are not {datatype}")


def _check_outputs(outputs: object, signature: ModelSignature) -> None:
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    for i, tensor in enumerate(outputs):
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if not isinstance(name, str):
            raise BadRequest(f"outputs[{i}] must be an object with a string 'name'")
        if name not in signature.outputs:
            raise BadRequest(f"unknown output '{name}' (the model gives: {', '.join(sorted(signature.outputs))})")
