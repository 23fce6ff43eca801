"""Run the Pulumi program of infra/ offline, under Pulumi's own mocks, and record what it would create.

Nothing leaves the machine: no engine, no state, no cloud calls. The program runs exactly as `pulumi up`
would run it, but every resource registration is answered by `OfflineMocks`, which records the inputs and
returns them as outputs plus the few outputs the program reads back (ids, names, addresses, AMI ids).
Addresses and ids are placeholders, so what this shows is what would be CREATED, not what exists.

Used by `cpctl infra preview` and by the infra tests. Pulumi mocks keep process-global state, so runs are
serialised and one run must finish before the next starts.
"""

from __future__ import annotations

import asyncio
import json
import runpy
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.resources import ResourceMissing, project_file

PROJECT = "controlplane"
SECRET_PLACEHOLDER = "offline-secret-placeholder"

_LOCK = threading.Lock()


class InfraUnavailable(RuntimeError):
    """The Pulumi SDKs or the infra/ program are not installed here; the message says how to get them."""


def program_dir() -> Path:
    """infra/, the Pulumi program (`main: infra/` of Pulumi.yaml), from the wheel or the checkout."""
    try:
        program = project_file("infra/__main__.py").parent
        project_file("Pulumi.yaml")
    except ResourceMissing as exc:
        raise InfraUnavailable(str(exc)) from None
    return program


@dataclass(frozen=True)
class Recorded:
    """One resource the program registered: its type token, name and inputs (camelCase, as sent)."""

    type: str
    name: str
    inputs: dict[str, Any]


@dataclass
class ProgramRun:
    resources: list[Recorded]
    calls: list[tuple[str, dict[str, Any]]]
    outputs: dict[str, Any]
    secret_keys: list[str] = field(default_factory=list)

    def of_type(self, type_token: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == type_token]


def placeholder_address(name: str) -> str:
    return f"<address of {name} after pulumi up>"


def stack_file(stack: str) -> Path:
    """Where a stack's config lives (`stackConfigDir: infra/stacks`); it may not exist (default settings)."""
    return program_dir() / "stacks" / f"Pulumi.{stack}.yaml"


def stack_config(stack: str, spec_file: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """The stack file's config as Pulumi passes it to a program (namespaced keys, JSON for objects), and the
    keys of its secrets, which become placeholders: their ciphertext can only be read by the Pulumi CLI."""
    path = stack_file(stack)
    raw: dict[str, Any] = {}
    if path.exists():
        raw = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    config: dict[str, str] = {}
    secrets: list[str] = []
    for key, value in raw.items():
        full = key if ":" in key else f"{PROJECT}:{key}"
        if isinstance(value, dict) and set(value) == {"secure"}:
            secrets.append(full)
            config[full] = SECRET_PLACEHOLDER
        elif isinstance(value, dict | list):
            config[full] = json.dumps(value)
        elif isinstance(value, bool):
            config[full] = str(value).lower()
        else:
            config[full] = str(value)
    if spec_file is not None:
        config[f"{PROJECT}:spec"] = str(Path(spec_file).resolve())
    return config, secrets


# How Pulumi marks a secret value on the wire (and in the inputs mocks receive).
SECRET_SIGNATURE = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIGNATURE[0]) == SECRET_SIGNATURE[1]


def unwrap_secrets(value: Any) -> Any:
    """The value as the cloud API would receive it: secrets replaced by what they hold."""
    if is_secret(value):
        return unwrap_secrets(value.get("value"))
    if isinstance(value, dict):
        return {k: unwrap_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap_secrets(v) for v in value]
    return value


def redact_secrets(value: Any) -> Any:
    """The value for display: every secret replaced by a marker."""
    if is_secret(value):
        return "[secret]"
    if isinstance(value, dict):
        return {k: redact_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """Mock inputs arrive with every number as a float (protobuf Struct); give whole numbers back as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _make_mocks(address_of: Callable[[str], str]) -> Any:
    import pulumi

    class OfflineMocks(pulumi.runtime.Mocks):
        """Records registrations; answers the outputs the program reads back, and refuses unknown calls
        (an unmocked call would come back empty and silently drop whatever depends on it)."""

        def __init__(self) -> None:
            self.resources: list[Recorded] = []
            self.calls: list[tuple[str, dict[str, Any]]] = []

        def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
            inputs = _plain(dict(args.inputs))
            self.resources.append(Recorded(args.typ, args.name, inputs))
            outputs = dict(inputs)
            outputs.setdefault("name", args.name)
            if args.typ == "aws:ec2/instance:Instance" and inputs.get("associatePublicIpAddress"):
                outputs["publicIp"] = placeholder_address(args.name)  # a bastion
            elif args.typ == "aws:ec2/instance:Instance":
                outputs["privateIp"] = address_of(args.name)
            elif args.typ == "azure-native:network:PublicIPAddress":
                outputs["ipAddress"] = placeholder_address(args.name)
            elif args.typ == "aws:ec2/launchTemplate:LaunchTemplate":
                outputs["latestVersion"] = 1
            return f"{args.name}-offline-id", outputs

        def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
            self.calls.append((args.token, _plain(dict(args.args))))
            if args.token == "aws:ec2/getAmi:getAmi":
                return {"id": "ami-offline-lookup", "name": "offline AMI lookup", "architecture": "x86_64"}
            raise NotImplementedError(f"no offline answer for {args.token}; add one to OfflineMocks.call")

    return OfflineMocks()


def run_program(config: dict[str, str], stack: str = "offline",
                address_of: Callable[[str], str] = placeholder_address) -> ProgramRun:
    """Run infra/__main__.py with `config` under mocks; every resource it registers, and its outputs."""
    try:
        import pulumi
        import pulumi.runtime.settings as runtime_settings
    except ImportError:
        raise InfraUnavailable("the Pulumi SDKs are not installed: pip install -e '.[infra]'") from None
    folder = program_dir()
    if str(folder.parent) not in sys.path:  # the program's modules import as `infra.*`
        sys.path.insert(0, str(folder.parent))

    with _LOCK:
        # Pulumi's runtime uses the thread's current event loop; an earlier asyncio.run() in this process
        # (the gateway, the bench) leaves none set.
        try:
            asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            asyncio.set_event_loop(asyncio.new_event_loop())
        mocks = _make_mocks(address_of)
        runtime_settings.ROOT.set(None)  # a fresh Stack per run, so no exports of an earlier run linger
        pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False)
        pulumi.runtime.set_all_config(config)
        root = runtime_settings.get_root_resource()

        @pulumi.runtime.test
        def program() -> pulumi.Output[Any]:
            # As Pulumi's Python host runs `main: infra/`: the directory, with infra/ first on sys.path.
            runpy.run_path(str(folder), run_name="__main__")
            # Awaiting the exports makes the run wait for every output they depend on.
            return pulumi.Output.from_input(dict(root.outputs))

        program()
        outputs = _resolved(root.outputs)
    return ProgramRun(mocks.resources, mocks.calls, outputs)


def _resolved(outputs: dict[str, Any]) -> dict[str, Any]:
    """The exported values, resolved (the run above has completed every output already)."""
    import pulumi
    from pulumi.runtime.sync_await import _sync_await

    return {name: _sync_await(pulumi.Output.from_input(value).future()) for name, value in outputs.items()}
