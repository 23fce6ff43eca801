"""Action `mig_plan`: read a host's MIG state and say which commands give it the wanted layout.

A thin caller of controlplane's MIG reconcile (`controlplane.gpu.reconcile`), the same function behind
`cpctl mig diff|steps`: for the same change both print the same commands. It runs on the controller and
imports the controlplane package from the controller's Python (run Ansible from controlplane's
environment: `cpctl provision`, or its venv's ansible-playbook); the host needs only nvidia-smi. Nothing on
the host is changed here: the host only runs read-only `nvidia-smi` listings, in check mode too. Every GPU
is checked before any command is returned, so an impossible layout fails the task before a single
existing instance is destroyed.

Arguments (all optional; per GPU, `gpus` wins over `profiles`, which wins over `layout`):
- `layout`: a mig-parted named layout for every GPU (`all-balanced`, `all-1g.10gb`, `all-disabled`, ...).
- `profiles`: explicit profiles for every GPU, e.g. `[3g.40gb, 2g.20gb, 1g.10gb, 1g.10gb]`.
- `gpus`: per GPU, `[{index: 0, profiles: [...]}, {index: 1, profiles: null}]` (null: MIG disabled), as
  `cpctl inventory` writes from the plan. GPUs not listed are left alone.
- `gpu_model`: the catalog model the inventory expects (e.g. H100-80GB); a different GPU fails the task.

Returns `gpus` (per GPU: model, MIG mode change, current and pending MIG mode, `mode_change_pending` when a
mode change waits for a GPU reset or reboot, instances kept / destroyed / created, commands), `commands`
(argv lists, in order) and `changes_needed`. Instances already at their planned placement are kept, so
running workloads on them are not disturbed. In check mode the result is `changed` when commands are needed,
with a diff when --diff is given.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _VALID_ARGS = frozenset(("layout", "profiles", "gpus", "gpu_model"))

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        try:
            from controlplane.gpu.layout import describe
            from controlplane.gpu.nvidia_smi import MIG_STATE_SCRIPT, MIG_STATE_SEPARATOR, parse_mig_state
            from controlplane.gpu.reconcile import reconcile_node
        except ImportError as exc:
            raise AnsibleActionFail(
                f"the mig role validates layouts with the controlplane package on the controller ({exc}); run "
                "Ansible from controlplane's environment (`cpctl provision`, or its venv's ansible-playbook)"
            ) from None

        listing = self._low_level_execute_command(MIG_STATE_SCRIPT)
        if listing["rc"] != 0:
            text = listing["stdout"].split(MIG_STATE_SEPARATOR)[0].strip() or listing["stderr"].strip()
            if self._task.check_mode:
                # A fresh host in check mode: the driver role would install nvidia-smi first.
                result.update(changed=False, driver_missing=True, changes_needed=False, commands=[], gpus=[],
                              msg=f"nvidia-smi does not run yet ({text[:200]}); MIG not evaluated in check mode")
                return result
            raise AnsibleActionFail(f"nvidia-smi failed (exit {listing['rc']}): {text[:300]}; install and load the "
                                    "driver first (role nvidia_driver, then a reboot)")
        current = parse_mig_state(listing["stdout"])
        node = reconcile_node(current, self._wanted(current), self._task.args.get("gpu_model") or None)
        if node.problems:
            raise AnsibleActionFail("; ".join(node.problems) + "; nothing was changed")

        found = {gpu.index: gpu for gpu in current}
        gpus = [{"index": g.index, "model": g.model, "mig_mode": g.mig_mode,
                 "mig_current": bool(found[g.index].mig_current), "mig_pending": bool(found[g.index].mig_pending),
                 # set when a mode change waits for a GPU reset (on cloud VMs: a reboot)
                 "mode_change_pending": bool(found[g.index].mig_pending) != bool(found[g.index].mig_current),
                 "layout": None if g.layout is None else describe(g.layout), "keep": list(g.keep),
                 "destroy": list(g.destroy), "create": list(g.create), "commands": [list(c) for c in g.commands]}
                for g in node.gpus]
        commands = node.commands
        result.update(gpus=gpus, commands=commands, changes_needed=bool(commands), driver_missing=False)
        result["changed"] = bool(commands) and bool(self._task.check_mode)
        if self._task.diff and commands:
            mig_before = {g.index: bool(g.mig_current) for g in current}
            result["diff"] = {
                "before": "".join(f"GPU {g['index']}: {', '.join(g['keep'] + g['destroy']) or 'no instances'}"
                                  f" (MIG {'on' if mig_before[g['index']] else 'off'})\n" for g in gpus),
                "after": "".join(f"GPU {g['index']}: {', '.join(g['keep'] + g['create']) or 'no instances'}"
                                 f" (MIG {'off' if g['layout'] is None else 'on'})\n" for g in gpus),
                "before_header": "current MIG layout", "after_header": "planned MIG layout",
            }
        return result

    def _wanted(self, current: list[Any]) -> dict[int, Any]:
        """GPU index -> named layout, profiles or None (MIG off), from the task's arguments."""
        args = self._task.args
        if args.get("gpus") is not None:
            return {int(g["index"]): g.get("profiles") for g in args["gpus"]}
        every_gpu = args.get("profiles") or args.get("layout") or None
        if every_gpu is None:
            return {}  # nothing asked: the GPUs are left alone
        return {gpu.index: every_gpu for gpu in current}
