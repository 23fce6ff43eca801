"""`pulumi up`: the GPU node pools of cluster.yaml, their Ansible inventory, and the serving layer.

Read top to bottom: settings and spec -> MIG plan -> one pool component per spec pool -> inventory output ->
the Kubernetes serving layer. Every decision lives in the components; this file only wires them.
"""

import sys
from pathlib import Path

# Pulumi runs this file with infra/ (not the project root) on sys.path; the components import as `infra.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi  # noqa: E402

from controlplane.gpu.plan import plan_cluster  # noqa: E402
from controlplane.spec import load_spec  # noqa: E402
from infra.program import inventory_of, node_pool, serving_args  # noqa: E402
from infra.serving import ServingCluster  # noqa: E402
from infra.settings import read_settings  # noqa: E402

settings = read_settings()
spec = load_spec(settings.spec_path)
plan = plan_cluster(spec)

pools = [node_pool(spec, plan, pool, settings) for pool in spec.node_pools]
pulumi.export("nodeAddresses", {p.pool_name: p.addresses for p in pools})
pulumi.export("ansibleInventory", inventory_of(spec, plan, pools))

if settings.kubernetes.enabled:
    serving = ServingCluster("serving", serving_args(spec, plan, pools, settings))
    pulumi.export("gatewayService", f"gateway.{settings.kubernetes.namespace}.svc")
