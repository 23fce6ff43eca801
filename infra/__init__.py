"""The Pulumi program of the project: GPU node pools (AWS EFA, Azure InfiniBand, existing hosts) and the
Kubernetes serving layer, all read from one cluster.yaml through `controlplane.spec`.

`pulumi up` runs `infra/__main__.py`; tests and `cpctl infra preview` import the components from this package
and run the same program under Pulumi mocks (the Pulumi CLI is not needed for either).
"""
