"""Send numbered UDP datagrams of given sizes, optionally as UDP_SEGMENT writes; print what was sent.

    python -m alpaca.lab.udp_send ADDRESS PORT SIZES COUNT [--gso N] [--rate PPS]

SIZES: comma-separated payload sizes; COUNT datagrams of each. With --gso N
each write carries N datagrams (UDP_SEGMENT = the size), the last write of
a size cut short with one datagram of half the size, so a super-packet with
a short tail travels too. --rate: datagrams per second (paced per write).
Each datagram is `udp_sink.datagram(seq, size)`, checked by alpaca.lab.udp_sink.
Prints the JSON {"sent": n, "sizes": {size: count}}.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from .udp_sink import datagram

UDP_SEGMENT = 103       # linux/udp.h


def writes(sizes: list[int], count: int, gso: int) -> list[list[bytes]]:
    """The datagrams, grouped as they are written."""
    out, seq = [], 0
    for size in sizes:
        group: list[bytes] = []
        for n in range(count):
            last = gso > 1 and n == count - 1 and len(group) > 0
            group.append(datagram(seq, max(size // 2, 8) if last else size))
            seq += 1
            if len(group) == max(gso, 1) or n == count - 1:
                out.append(group)
                group = []
    return out


def send(address: str, port: int, sizes: list[int], count: int, gso: int, rate: float) -> dict:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sent: dict[int, int] = {}
    start, done = time.monotonic(), 0
    for group in writes(sizes, count, gso):
        if len(group) > 1:
            sock.sendmsg([b"".join(group)], [(socket.SOL_UDP, UDP_SEGMENT, len(group[0]).to_bytes(2, "little"))],
                         0, (address, port))
        else:
            sock.sendto(group[0], (address, port))
        for d in group:
            sent[len(d)] = sent.get(len(d), 0) + 1
        done += len(group)
        if rate:
            lag = start + done / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
    return {"sent": done, "sizes": sent}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("port", type=int)
    ap.add_argument("sizes")
    ap.add_argument("count", type=int)
    ap.add_argument("--gso", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0)
    a = ap.parse_args()
    print(json.dumps(send(a.address, a.port, [int(s) for s in a.sizes.split(",")], a.count, a.gso, a.rate)),
          flush=True)
