"""Accept one TCP connection, read to EOF, print '<bytes> <sha256>'.

    python -m alpaca.lab.tcp_sink ADDRESS PORT

Prints "ready" once it listens. The receiving end of Mesh.transfer.
"""

from __future__ import annotations

import hashlib
import socket
import sys


def sink(address: str, port: int) -> tuple[int, str]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    srv = socket.create_server((address, port), family=family)
    print("ready", flush=True)
    srv.settimeout(60)
    conn, _ = srv.accept()
    h, n = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 16):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


if __name__ == "__main__":
    n, digest = sink(sys.argv[1], int(sys.argv[2]))
    print(n, digest, flush=True)
