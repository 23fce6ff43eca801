"""Layout validation is a placement search: examples, error messages, and properties against brute force."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.gpu.catalog import GPU_MODELS, GpuModel, MigProfile, gpu_model
from controlplane.gpu.layout import LayoutError, fits, place, resolve_layout

H100 = gpu_model("H100-80GB")


def test_4g_plus_3g_fits_on_h100_in_slots_0_and_4() -> None:
    assert [(p.profile.name, p.start) for p in place(H100, ["3g.40gb", "4g.40gb"])] == [
        ("4g.40gb", 0),
        ("3g.40gb", 4),
    ]


def test_4g_plus_4g_does_not_fit_though_memory_slices_add_up_to_8() -> None:
    with pytest.raises(LayoutError, match="2 x 4g.40gb requested, at most 1 per GPU"):
        place(H100, ["4g.40gb", "4g.40gb"])


def test_too_many_compute_or_memory_slices_say_so() -> None:
    with pytest.raises(LayoutError, match="needs 8 compute slices, a GPU has 7"):
        place(H100, ["3g.40gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb"])
    with pytest.raises(LayoutError, match="needs 9 memory slices, a GPU has 8"):
        place(H100, ["1g.20gb", "1g.20gb", "1g.20gb", "1g.20gb", "1g.10gb"])


def test_unknown_profile_names_the_models_profiles() -> None:
    with pytest.raises(LayoutError, match="H100-80GB has no MIG profile '1g.5gb'"):
        place(H100, ["1g.5gb"])


def test_a_placement_conflict_names_the_profile_left_without_a_start() -> None:
    # A made-up GPU where two 2-slot profiles may only start at slot 0: slices add up, placements do not.
    narrow = MigProfile("2g.x", 1, 2, 2, 1, 1, (0,), 2)
    wide = MigProfile("1g.x", 2, 1, 1, 1, 1, (0, 1, 2, 3, 4, 5, 6), 7)
    model = GpuModel("test", (), 1, 1, (narrow, wide), ())
    with pytest.raises(LayoutError, match=r"no free start for 2g.x \(it may start only at slot 0, covering 2\)"):
        place(model, ["2g.x", "2g.x"])
    assert fits(model, ["2g.x", "1g.x", "1g.x"])


def test_seven_1g_use_slots_0_to_6_and_slot_7_stays_memory_only() -> None:
    assert sorted(p.start for p in place(H100, ["1g.10gb"] * 7)) == list(range(7))
    assert not fits(H100, ["4g.40gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb"])


def test_resolve_layout_rejects_unknown_names_and_bad_lists() -> None:
    assert resolve_layout(H100, "all-balanced", None) == ("1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb")
    assert resolve_layout(H100, "all-disabled", None) is None
    with pytest.raises(LayoutError, match="'all-1g.18gb' is not a named MIG layout of H100-80GB"):
        resolve_layout(H100, "all-1g.18gb", None)
    with pytest.raises(LayoutError, match="at most 1 per GPU"):
        resolve_layout(H100, None, ["7g.80gb", "7g.80gb"])


def _brute_force_fits(model: GpuModel, names: list[str]) -> bool:
    """The oracle: try every assignment of allowed starts; no pruning, no slice arithmetic."""
    profiles = [model.profile(n) for n in names]
    if any(profiles.count(p) > p.max_instances for p in set(profiles)):
        return False
    for starts in itertools.product(*(p.starts for p in profiles)):
        used: set[int] = set()
        ok = True
        for profile, start in zip(profiles, starts, strict=True):
            slots = set(range(start, start + profile.size))
            if used & slots:
                ok = False
                break
            used |= slots
        if ok:
            return True
    return False


@st.composite
def layouts(draw: st.DrawFn) -> tuple[GpuModel, list[str]]:
    model = draw(st.sampled_from(sorted(GPU_MODELS.values(), key=lambda m: m.name)))
    names = draw(st.lists(st.sampled_from([p.name for p in model.profiles]), min_size=1, max_size=6))
    return model, names


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_validation_agrees_with_brute_force_on_random_layouts(case: tuple[GpuModel, list[str]]) -> None:
    model, names = case
    assert fits(model, names) == _brute_force_fits(model, names)


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_accepted_layouts_have_valid_non_overlapping_placements(case: tuple[GpuModel, list[str]]) -> None:
    model, names = case
    try:
        placements = place(model, names)
    except LayoutError as exc:
        assert model.name in str(exc)  # every rejection says which GPU and why
        return
    assert sorted(p.profile.name for p in placements) == sorted(names)
    covered: set[int] = set()
    for p in placements:
        assert p.start in p.profile.starts
        assert not covered & set(p.slots)
        covered |= set(p.slots)
    assert sum(p.profile.compute_slices for p in placements) <= 7
