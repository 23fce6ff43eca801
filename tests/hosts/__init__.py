"""A harness of realistic test hosts for the Ansible roles: SSH into Debian roots in network namespaces.

- `image`: the debootstrap'd Debian image, cached under /var/cache/cpctl-test-hosts/.
- `aptrepo`: signed local apt repositories with dummy NVIDIA packages (fake nvidia-smi, nvidia-ctk, nvcc).
- `lab`: boots hosts (namespaces, overlay roots, sshd, simulated GPUs and HCAs) and tears them down.
- `relay`: the ssh ProxyCommand into the hosts' private network.

Needs root; see tests/test_provision_hosts.py for how the tests use it.
"""
