"""GPUs and MIG: the catalog of GPU models and MIG profiles, layout validation, the planner, its renderers,
and read-only discovery.

- `catalog`: GPU models, MIG profiles, valid placements (`gpu_model`, `model_for_product`).
- `layout`: placement search and mig-parted named layouts (`place`, `fits`, `named_layouts`, `resolve_layout`).
- `plan`: shards onto MIG instances (`plan_cluster`).
- `render`: mig-parted config, node labels, extended resources, nvidia-smi steps, diff.
- `discover`: NVML / nvidia-smi discovery (`discover`).
- `cli`: the `cpctl gpu list|plan|mig` commands.

Nothing is imported here: `discover` and `catalog` must stay importable on GPU hosts that have only the
standard library and nvidia-ml-py.
"""
