"""GPUs and MIG: the catalog of GPU models and MIG profiles, layout validation, the planner, its renderers,
the MIG reconcile, read-only discovery and the preflight checks.

- `catalog`: the one list of GPU models, their MIG profiles and valid placements (`GPU_MODELS`, `gpu_model`,
  `model_for_product`); the spec's `gpu.model` names come from it.
- `layout`: placement search and mig-parted named layouts (`place`, `fits`, `named_layouts`, `resolve_layout`).
- `plan`: shards onto MIG instances (`plan_cluster`).
- `render`: mig-parted config, node labels, extended resources.
- `reconcile`: discovered + wanted -> keep / destroy / create + nvidia-smi commands (`cpctl mig` and the
  Ansible mig role's `mig_plan` both call it).
- `devices`: what discovery reports (`HostGpus`, `GpuInfo`, ...); `nvml` and `nvidia_smi` fill it;
  `discover` picks NVML, else nvidia-smi.
- `cli`: the `cpctl gpu list|plan|mig` commands.

Nothing is imported here: `catalog`, `layout`, `devices`, `nvml`, `nvidia_smi`, `discover` and `reconcile`
use only the standard library (and nvidia-ml-py when present), so GPU hosts and the Ansible controller can
import them without the rest of the project's dependencies.
"""
