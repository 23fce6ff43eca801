"""Provisioning GPU nodes with Ansible: inventories from the spec, site.yml through ansible-runner, a Rich view.

- `inventory`: the Ansible inventory of the spec's GPU pools (`cpctl inventory`).
- `runner`: runs playbooks/site.yml in a fresh ansible-runner private data directory; per-host results.
- `view`: the live per-host view and the summary table.
- `cli`: the `cpctl inventory` and `cpctl provision` command functions.
"""
