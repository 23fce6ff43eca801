"""MIG layouts: whether a set of profiles fits on one GPU, found by a real placement search.

A layout is the multiset of MIG profiles created on one GPU. It fits when every instance can be given one
of its profile's allowed start slots with no two instances sharing a memory slot, the compute slices add
up to at most 7, and no profile exceeds its instance limit (the `+me` profiles allow one). A slice sum is
not enough: on an H100 4g.40gb + 3g.40gb fits (slots 0-3 and 4-7) but 4g.40gb + 4g.40gb does not (4g
can only start at slot 0), though both use 8 memory slices.

The mig-parted named layouts (`all-disabled`, `all-enabled`, `all-1g.10gb`, `all-1g.10gb.me`,
`all-balanced`, ...) are derived per GPU model: `all-PROFILE` is as many instances of that profile as fit,
as in the GPU Operator's default mig-parted config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.gpu.catalog import COMPUTE_SLICES, MEMORY_SLOTS, GpuModel, MigProfile


class LayoutError(ValueError):
    """A layout that cannot be created on a GPU; the message says why."""


@dataclass(frozen=True)
class Placement:
    """One GPU instance of a layout: its profile and the first memory slot it covers."""

    profile: MigProfile
    start: int

    @property
    def slots(self) -> range:
        return range(self.start, self.start + self.profile.size)

    @property
    def mask(self) -> int:
        return ((1 << self.profile.size) - 1) << self.start

    def __str__(self) -> str:
        return f"{self.profile.name}@{self.start}"


def describe(profiles: Sequence[str]) -> str:
    """'4g.40gb + 2 x 1g.10gb': a layout as people write it."""
    counts = Counter(profiles)
    return " + ".join(name if n == 1 else f"{n} x {name}" for name, n in counts.items()) or "(no instances)"


def resolve_profiles(model: GpuModel, names: Sequence[str]) -> list[MigProfile]:
    """The catalog profiles for names; LayoutError naming the unknown one and the model's profiles."""
    try:
        return [model.profile(name) for name in names]
    except KeyError as exc:
        raise LayoutError(exc.args[0]) from None


def place(model: GpuModel, names: Sequence[str]) -> list[Placement]:
    """Placements for the profiles `names` on one GPU of `model`, largest first; LayoutError saying why not.

    Backtracking over start slots, most constrained profile first; identical profiles take increasing starts
    so permutations of the same assignment are not searched twice. At most 8 instances fit on a GPU, so the
    search is tiny.
    """
    profiles = resolve_profiles(model, names)
    what = f"{describe(names)} on {model.name}"
    for profile, n in Counter(profiles).items():
        if n > profile.max_instances:
            raise LayoutError(f"{what}: {n} x {profile.name} requested, at most {profile.max_instances} per GPU")
    compute = sum(p.compute_slices for p in profiles)
    if compute > COMPUTE_SLICES:
        raise LayoutError(f"{what}: needs {compute} compute slices, a GPU has {COMPUTE_SLICES}")
    memory = sum(p.memory_slices for p in profiles)
    if memory > MEMORY_SLOTS:
        raise LayoutError(f"{what}: needs {memory} memory slices, a GPU has {MEMORY_SLOTS}")

    order = sorted(profiles, key=lambda p: (-p.size, len(p.starts), p.profile_id))
    chosen: list[Placement] = []
    closest: list[Placement] = []

    def search(i: int, used: int) -> bool:
        nonlocal closest
        if i == len(order):
            return True
        profile = order[i]
        previous = chosen[-1] if chosen and chosen[-1].profile == profile else None
        for start in profile.starts:
            if previous is not None and start <= previous.start:
                continue
            placement = Placement(profile, start)
            if used & placement.mask:
                continue
            chosen.append(placement)
            if len(chosen) > len(closest):
                closest = list(chosen)
            if search(i + 1, used | placement.mask):
                return True
            chosen.pop()
        return False

    if search(0, 0):
        return chosen
    stuck = order[len(closest)]
    placed = ", ".join(str(p) for p in closest) or "nothing"
    raise LayoutError(
        f"{what}: no placement without overlap; the closest places {placed} and leaves no free start for "
        f"{stuck.name} (it may start only at slot {'/'.join(map(str, stuck.starts))}, covering {stuck.size})"
    )


def fits(model: GpuModel, names: Sequence[str]) -> bool:
    try:
        place(model, names)
    except LayoutError:
        return False
    return True


def max_instances(model: GpuModel, profile: MigProfile) -> int:
    """How many instances of one profile fit on a GPU alone (7 x 1g.10gb, 3 x 2g.20gb, 2 x 3g.40gb, ...)."""
    n = 0
    while fits(model, [profile.name] * (n + 1)):
        n += 1
    return n


def named_layouts(model: GpuModel) -> dict[str, tuple[str, ...] | None]:
    """The mig-parted named layouts of a GPU model; None means MIG disabled."""
    layouts: dict[str, tuple[str, ...] | None] = {"all-disabled": None, "all-enabled": ()}
    for profile in model.profiles:
        name = "all-" + profile.name.replace("+me", ".me")
        layouts[name] = (profile.name,) * max_instances(model, profile)
    layouts["all-balanced"] = model.balanced
    return layouts


def resolve_layout(model: GpuModel, layout: str | None, profiles: Sequence[str] | None) -> tuple[str, ...] | None:
    """The profiles of a pool's MIG layout (a named layout or an explicit list), validated; None: MIG off."""
    if layout is not None:
        layouts = named_layouts(model)
        if layout not in layouts:
            raise LayoutError(
                f"'{layout}' is not a named MIG layout of {model.name} (known: {', '.join(layouts)})"
            )
        resolved = layouts[layout]
    else:
        resolved = tuple(profiles or ())
    if resolved is not None:
        place(model, resolved)
    return resolved
