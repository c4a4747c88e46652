"""Send a file over one TCP connection; print '<bytes> <seconds>'.

    python -m alpaca.lab.tcp_send ADDRESS PORT FILE

The sending end of Mesh.transfer.
"""

from __future__ import annotations

import socket
import sys
import time


def send(address: str, port: int, path: str) -> tuple[int, float]:
    start = time.monotonic()
    with socket.create_connection((address, port), timeout=60) as s, open(path, "rb") as f:
        sent = s.sendfile(f)
    return sent, time.monotonic() - start


if __name__ == "__main__":
    sent, seconds = send(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print(sent, f"{seconds:.6f}", flush=True)
