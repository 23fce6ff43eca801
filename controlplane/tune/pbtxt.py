"""A Triton model config (its JSON form, as GET /v2/models/M/config gives it) written as protobuf text."""

from __future__ import annotations

import re

ENUM = re.compile(r"^[A-Z][A-Z0-9_]+$")  # TYPE_FP32, KIND_GPU, REJECT: protobuf enums are written bare


def to_pbtxt(config: dict) -> str:
    return "".join(_field(key, value, 0) for key, value in config.items())


def _field(key: str, value, depth: int) -> str:
    pad = "  " * depth
    if isinstance(value, dict):
        if key == "parameters" and all(isinstance(v, dict) and "string_value" in v for v in value.values()):
            return "".join(f'{pad}parameters {{ key: "{k}" value: {{ string_value: '
                           f'{_scalar(v["string_value"], True)} }} }}\n' for k, v in value.items())
        return f"{pad}{key} {{\n" + "".join(_field(k, v, depth + 1) for k, v in value.items()) + f"{pad}}}\n"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "".join(f"{pad}{key} {{\n" + "".join(_field(k, v, depth + 1) for k, v in item.items()) + f"{pad}}}\n"
                           for item in value)
        return f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]\n" if value else ""
    return f"{pad}{key}: {_scalar(value)}\n"


def _scalar(value, always_quote: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if not always_quote and ENUM.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
