"""stdin/stdout <-> TCP relay: the ssh ProxyCommand that reaches test hosts on the namespaced network.

Run as `ip netns exec CONTROLLER python -S -I relay.py HOST PORT`: the test hosts' subnet exists only inside
the controller namespace, so ssh (Ansible's and Fabric's) enters it through this relay instead of the
machine's own network. Standard library only, started with -S -I to keep the start-up in milliseconds.
"""

import os
import selectors
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        print(f"relay: cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:  # ssh closed its side: half-close, keep reading the answer
                    selector.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
                    continue
                sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return 0
                os.write(1, data)


if __name__ == "__main__":
    sys.exit(main())
