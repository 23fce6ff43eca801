"""Action `mig_plan`: read a host's MIG state, validate the wanted layout, and say which commands reach it.

It runs on the controller, so the layout is checked by controlplane's own validator (controlplane.gpu:
the GPU catalog and the placement search of `layout.place`), the same code `cpctl plan` uses. Nothing on
the host is changed here: the host only runs read-only `nvidia-smi` listings, in check mode too. Every
GPU's layout is validated before any command is returned, so an impossible layout fails the task before
a single existing instance is destroyed.

Arguments (all optional; per GPU, `gpus` wins over `profiles`, which wins over `layout`):
- `layout`: a mig-parted named layout for every GPU (`all-balanced`, `all-1g.10gb`, `all-disabled`, ...).
- `profiles`: explicit profiles for every GPU, e.g. `[3g.40gb, 2g.20gb, 1g.10gb, 1g.10gb]`.
- `gpus`: per GPU, `[{index: 0, profiles: [...]}, {index: 1, profiles: null}]` (null: MIG disabled), as
  `cpctl inventory` writes from the plan. GPUs not listed are left alone.
- `gpu_model`: the catalog model the inventory expects (e.g. H100-80GB); a different GPU fails the task.

Returns `gpus` (per GPU: model, MIG mode current and pending, `mode_change_pending` when a mode change waits
for a GPU reset or reboot, instances kept / destroyed / created), `commands` (argv lists, in
order: enable MIG, destroy what the layout does not keep, create what is missing) and `changes_needed`.
Instances already at their planned placement are kept, so running workloads on them are not disturbed.
In check mode the result is `changed` when commands are needed, with a diff when --diff is given.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

QUERY = "index,name,uuid,mig.mode.current,mig.mode.pending"
SEPARATOR = "@@cpctl-mig-plan@@"
NO_DRIVER = 127


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _VALID_ARGS = frozenset(("layout", "profiles", "gpus", "gpu_model"))

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        try:
            from controlplane.gpu.catalog import model_for_product
            from controlplane.gpu.discover import parse_lci, parse_lgi, parse_query_gpu
            from controlplane.gpu.layout import LayoutError, describe, place, resolve_layout
        except ImportError as exc:
            raise AnsibleActionFail(
                f"the mig role validates layouts with the controlplane package on the controller ({exc}); run "
                "Ansible from controlplane's environment (`cpctl provision`, or its venv's ansible-playbook)"
            ) from None
        args = self._task.args
        layout, profiles, per_gpu = args.get("layout") or None, args.get("profiles") or None, args.get("gpus")
        wanted_model = args.get("gpu_model") or None

        # One round trip, read-only: the GPU list, then GPU and compute instances.
        listing = self._low_level_execute_command(
            f"nvidia-smi --query-gpu={QUERY} --format=csv,noheader; rc=$?; echo {SEPARATOR}; "
            f"[ $rc -eq 0 ] && nvidia-smi mig -lgi; echo {SEPARATOR}; [ $rc -eq 0 ] && nvidia-smi mig -lci; exit $rc"
        )
        if listing["rc"] != 0:
            text = listing["stdout"].split(SEPARATOR)[0].strip() or listing["stderr"].strip()
            if self._task.check_mode:
                # A fresh host in check mode: the driver role would install nvidia-smi first.
                result.update(changed=False, driver_missing=True, changes_needed=False, commands=[], gpus=[],
                              msg=f"nvidia-smi does not run yet ({text[:200]}); MIG not evaluated in check mode")
                return result
            raise AnsibleActionFail(f"nvidia-smi failed (exit {listing['rc']}): {text[:300]}; install and load the "
                                    "driver first (role nvidia_driver, then a reboot)")
        query, lgi, lci = (listing["stdout"].split(SEPARATOR) + ["", ""])[:3]
        rows = parse_query_gpu(query, QUERY)
        instances, computes = parse_lgi(lgi), parse_lci(lci)
        wanted_by_index = {int(g["index"]): g.get("profiles") for g in per_gpu or []}
        unknown = sorted(set(wanted_by_index) - {int(r["index"]) for r in rows})
        if unknown:
            raise AnsibleActionFail(f"the inventory sets MIG layouts for GPU(s) {unknown}, which this host does not "
                                    f"have (it has {len(rows)} GPU(s)); nothing was changed")

        # Validate every GPU before returning any command.
        gpus, commands = [], []
        for row in rows:
            index = int(row["index"])
            if per_gpu is not None and index not in wanted_by_index:
                continue
            if per_gpu is None and layout is None and profiles is None:
                continue
            model = model_for_product(row["name"])
            if model is None:
                raise AnsibleActionFail(f"GPU {index} is a '{row['name']}', which controlplane's GPU catalog does "
                                        "not know: its MIG layouts cannot be validated; nothing was changed")
            if wanted_model is not None and model.name != wanted_model:
                raise AnsibleActionFail(f"GPU {index} is a '{row['name']}' ({model.name}) but the inventory expects "
                                        f"{wanted_model}; nothing was changed")
            try:
                if index in wanted_by_index:
                    wanted = wanted_by_index[index]
                    desired = None if wanted is None else resolve_layout(model, None, list(wanted))
                else:
                    desired = resolve_layout(model, None if profiles else layout, profiles)
            except LayoutError as exc:
                raise AnsibleActionFail(f"GPU {index}: invalid MIG layout: {exc}; nothing was changed") from None
            mig_on = row["mig.mode.current"].strip() == "Enabled"
            have = {f"{gi.profile}@{gi.start}": gi for gi in instances.get(index, [])}
            with_ci = {ci.gi_id for ci in computes.get(index, [])}
            steps: list[list[str]] = []
            i = str(index)
            if desired is None:
                want: dict[str, Any] = {}
            else:
                want = {f"{p.profile.name}@{p.start}": p for p in place(model, desired)}
                if not mig_on:
                    steps.append(["nvidia-smi", "-i", i, "-mig", "1"])
            # An instance without its compute instance is a half-finished earlier run: recreate it.
            keep = sorted(k for k in have if k in want and have[k].gi_id in with_ci)
            destroy = sorted(k for k in have if k not in keep)
            create = sorted((k for k in want if k not in keep), key=lambda k: (-want[k].profile.size, want[k].start))
            for key in destroy:
                gi = str(have[key].gi_id)
                if have[key].gi_id in with_ci:
                    steps.append(["nvidia-smi", "mig", "-i", i, "-gi", gi, "-dci"])
                steps.append(["nvidia-smi", "mig", "-i", i, "-gi", gi, "-dgi"])
            if create:
                pairs = ",".join(f"{want[k].profile.profile_id}:{want[k].start}" for k in create)
                steps.append(["nvidia-smi", "mig", "-i", i, "-cgi", pairs, "-C"])
            if desired is None and mig_on:
                steps.append(["nvidia-smi", "-i", i, "-mig", "0"])
            pending = row["mig.mode.pending"].strip()
            gpus.append({
                "index": index, "name": row["name"], "model": model.name, "mig_current": mig_on,
                "mig_pending": pending == "Enabled", "mode_change_pending": (pending == "Enabled") != mig_on,
                "layout": None if desired is None else describe(desired),
                "keep": keep, "destroy": destroy, "create": create, "commands": steps,
            })
            commands += steps

        result.update(gpus=gpus, commands=commands, changes_needed=bool(commands), driver_missing=False)
        result["changed"] = bool(commands) and bool(self._task.check_mode)
        if self._task.diff and commands:
            result["diff"] = {
                "before": "".join(f"GPU {g['index']}: {', '.join(g['keep'] + g['destroy']) or 'no instances'}"
                                  f" (MIG {'on' if g['mig_current'] else 'off'})\n" for g in gpus),
                "after": "".join(f"GPU {g['index']}: {', '.join(g['keep'] + g['create']) or 'no instances'}"
                                 f" (MIG {'off' if g['layout'] is None else 'on'})\n" for g in gpus),
                "before_header": "current MIG layout", "after_header": "planned MIG layout",
            }
        return result
