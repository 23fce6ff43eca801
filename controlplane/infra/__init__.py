"""`cpctl infra`: the Pulumi program of infra/ seen without the Pulumi CLI or cloud credentials."""
