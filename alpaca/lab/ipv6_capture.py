"""Watch the IPv6 packets on one device: the tests' leak detector.

    python -m alpaca.lab.ipv6_capture DEV

prints "ready" once its AF_PACKET socket is bound, then one line per IPv6
packet in either direction, "out|in SRC DST NEXT-HEADER", until SIGTERM.
Run it inside the namespace whose device it watches (Testbed.popen)."""

from __future__ import annotations

import signal
import socket
import sys
from typing import NamedTuple

ETH_P_ALL, ETH_P_IPV6 = 0x0003, 0x86DD     # only an ETH_P_ALL socket sees the packets sent too
ETH_HEADER = 14
PACKET_OUTGOING = getattr(socket, "PACKET_OUTGOING", 4)


class Seen(NamedTuple):
    outgoing: bool
    src: str
    dst: str
    next_header: int


def parse(line: str) -> Seen | None:
    """A line this tool printed, or None for any other line."""
    parts = line.split()
    if len(parts) != 4 or parts[0] not in ("out", "in"):
        return None
    return Seen(parts[0] == "out", parts[1], parts[2], int(parts[3]))


def main(device: str) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((device, ETH_P_ALL))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        frame, address = sock.recvfrom(65535)
        packet = frame[ETH_HEADER:]
        if address[1] != ETH_P_IPV6 or len(packet) < 40:
            continue
        src, dst = (socket.inet_ntop(socket.AF_INET6, packet[i:i + 16]) for i in (8, 24))
        direction = "out" if address[2] == PACKET_OUTGOING else "in"
        print(f"{direction} {src} {dst} {packet[6]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
