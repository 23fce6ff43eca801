"""The spec: the example is valid; bad specs fail with file, line, field path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli import app
from controlplane.spec import SpecError, hash_api_key, load_spec, parse_spec

from .conftest import EXAMPLE_SPEC

VALID = EXAMPLE_SPEC.read_text()


def errors_of(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "cluster.yaml")
    return info.value.lines


def line_of(fragment: str, text: str = VALID) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_example_spec_is_valid_and_resolves_its_model_repository() -> None:
    spec = load_spec(EXAMPLE_SPEC)
    assert [c.name for c in spec.priority_classes] == ["critical", "standard", "sheddable"]
    assert Path(spec.model_repository) == (EXAMPLE_SPEC.parent / "../models").resolve()
    assert spec.tenants[0].api_key_sha256 == hash_api_key("cp-demo-key")
    assert spec.shards[0].replicas == 2 and spec.shards[0].standby == 1


def test_unknown_field_is_named_with_its_line() -> None:
    text = VALID.replace("    max_batch: 64\n", "    max_bacth: 64\n", 1)
    [error] = errors_of(text)
    assert error.startswith(f"cluster.yaml:{line_of('max_bacth', text)}: models[0].max_bacth: unknown field")


def test_wrong_type_says_what_was_expected() -> None:
    text = VALID.replace("level: 200", "level: high")
    [error] = errors_of(text)
    assert error.startswith(f"cluster.yaml:{line_of('level: high', text)}: priority_classes[1].level:")
    assert "valid integer" in error and "'high'" in error


def test_dangling_model_reference_names_the_shard_entry() -> None:
    text = VALID.replace("models: [risk, risk_lite, work, textgen]", "models: [risk, risk_lite, wrok, textgen]")
    [error] = errors_of(text)
    assert error.startswith(f"cluster.yaml:{line_of('wrok', text)}: shards[0].models[2]: unknown model 'wrok'")
    assert "risk, risk_lite, textgen, work" in error


def test_duplicate_model_names_are_refused() -> None:
    text = VALID.replace("- name: textgen", "- name: work", 1)
    errors = errors_of(text)
    assert any("models[3].name: duplicate name 'work'" in e for e in errors)


def test_duplicate_yaml_keys_are_refused_not_silently_overwritten() -> None:
    text = VALID.replace("    max_batch: 64\n", "    max_batch: 64\n    max_batch: 8\n", 1)
    [error] = errors_of(text)
    assert "duplicate key 'max_batch'" in error and error.startswith("cluster.yaml:")


def test_equal_priority_levels_are_ambiguous() -> None:
    text = VALID.replace("level: 200", "level: 300")
    assert any("priority_classes[1].level: level 300 is also used by class 'critical'" in e for e in errors_of(text))


def test_tenant_class_references_are_checked() -> None:
    text = VALID.replace("default_class: standard", "default_class: gold")
    assert any("tenants[0].default_class: unknown class 'gold'" in e for e in errors_of(text))


def test_missing_required_field_and_bad_yaml() -> None:
    text = VALID.replace("    path: risk\n", "", 1)
    assert any("models[0].path: required field is missing" in e for e in errors_of(text))
    [error] = errors_of("cluster: [unclosed\n")
    assert error.startswith("cluster.yaml:") and "not valid YAML" in error


def test_cpctl_validate_reports_problems_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.yaml"
    bad.write_text(VALID.replace("rate: 5000", "rate: -1").replace("model_repository: ../models",
                                                                    "model_repository: /srv/models"))
    result = CliRunner().invoke(app, ["validate", "-f", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:{line_of('rate: -1', bad.read_text())}: tenants[0].rate" in result.output.replace("\n", "")
    ok = CliRunner().invoke(app, ["validate", "-f", str(EXAMPLE_SPEC)])
    assert ok.exit_code == 0 and "cluster 'local-demo'" in ok.output
