"""Receive numbered UDP datagrams and check each one's content; print what arrived.

    python -m alpaca.lab.udp_sink ADDRESS PORT EXPECTED [--idle SECONDS]

Prints "ready" once bound, then takes datagrams until EXPECTED distinct ones
arrived or none came for --idle seconds (default 3), and prints the JSON
{"received": n, "distinct": n, "bad": n, "sizes": {size: count}}: `bad`
counts datagrams whose bytes are not what udp_send wrote for their number.
The receiving end of the UDP tests (alpaca.lab.udp_send).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket

HEAD = 6        # sequence number (4 bytes) and size (2)
SO_RCVBUFFORCE = 33     # asm-generic/socket.h (the socket module lacks it)


def datagram(seq: int, size: int) -> bytes:
    """Datagram `seq` of `size` bytes (at least HEAD): its number, its size, then bytes that depend on both."""
    head = seq.to_bytes(4, "big") + size.to_bytes(2, "big")
    pattern = hashlib.blake2b(head, digest_size=64).digest()
    body = pattern * ((size - HEAD) // len(pattern) + 1)
    return head + body[:size - HEAD]


def sink(address: str, port: int, expected: int, idle: float) -> dict:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:        # past net.core.rmem_max (as root): a burst must not overflow the buffer
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((address, port))
    print("ready", flush=True)
    sock.settimeout(idle)
    seen: set[int] = set()
    received = bad = 0
    sizes: dict[int, int] = {}
    while len(seen) < expected:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        received += 1
        seq, size = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:HEAD], "big")
        if len(data) < HEAD or size != len(data) or data != datagram(seq, size):
            bad += 1
            continue
        seen.add(seq)
        sizes[size] = sizes.get(size, 0) + 1
    return {"received": received, "distinct": len(seen), "bad": bad, "sizes": sizes}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("port", type=int)
    ap.add_argument("expected", type=int)
    ap.add_argument("--idle", type=float, default=3.0)
    a = ap.parse_args()
    print(json.dumps(sink(a.address, a.port, a.expected, a.idle)), flush=True)
