"""Validate the Kubernetes objects an offline run of the infra program would create, with the schemas of
kubernetes-validate in strict mode (unknown fields are errors).

Not Kubernetes objects, so not validated here: Helm releases (a Pulumi resource; the charts render their
own objects) and providers. Custom resources (NicClusterPolicy) have no schema offline: they come back as
warnings, listed by kind, never silently passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.infra.offline import ProgramRun, Recorded, unwrap_secrets

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest versions the manifests are meant for
NOT_OBJECTS = {"kubernetes:helm.sh/v3:Release"}


@dataclass(frozen=True)
class Validation:
    checked: list[str]  # kind/name of every object validated
    errors: list[str]
    warnings: list[str]  # custom resources without an offline schema


def manifest(resource: Recorded) -> dict[str, Any]:
    """The object as the API server would receive it (the recorded inputs are already camelCase)."""
    return unwrap_secrets(dict(resource.inputs))


def kubernetes_objects(run: ProgramRun) -> list[Recorded]:
    return [r for r in run.resources if r.type.startswith("kubernetes:") and r.type not in NOT_OBJECTS]


def validate_run(run: ProgramRun, versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> Validation:
    import kubernetes_validate

    checked: list[str] = []
    errors: list[str] = []
    warnings: list[str] = []
    for resource in kubernetes_objects(run):
        obj = manifest(resource)
        label = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                warnings.append(f"{label}: no schema for {obj.get('apiVersion')} (custom resource)")
                break
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{label} (Kubernetes {version}): {exc.message} at {'/'.join(map(str, exc.path))}")
        checked.append(label)
    return Validation(checked, errors, sorted(set(warnings)))
