"""Run inside a fresh network namespace: does the kernel take what
alpaca.host.gso cuts, and UDP super-packets written whole?

    python tests/tools/uso_roundtrip.py {4|6}

A TUN (alpaca.host.tun.Tun, offloads on) gets 10.99.0.1/24 (fd99::1/64);
a UDP_SEGMENT write to .2 comes out of it as one super-packet. That packet,
its addresses and ports swapped (which leaves every checksum's sum as it
was), is written back: whole, and cut by segment_udp, to the sending
socket, which takes a datagram only with a correct UDP checksum. Prints JSON.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

from alpaca.host.gso import is_udp_gso, segment_udp
from alpaca.host.tun import Tun

UDP_SEGMENT = 103
SIZE, COUNT = 1200, 7


def read_super(tun: Tun, timeout: float = 3.0) -> bytes | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        select.select([tun.fd], [], [], 0.2)
        for packet in tun.read_batch(64):
            if is_udp_gso(packet):
                return packet
    return None


def swap(packet: bytes, v: int) -> bytes:
    """The super-packet coming back: addresses and ports exchanged."""
    p = bytearray(packet)
    ip = 10
    src, dst = ((ip + 12, ip + 16, 4) if v == 4 else (ip + 8, ip + 24, 16))[:2]
    n = 4 if v == 4 else 16
    p[src:src + n], p[dst:dst + n] = packet[dst:dst + n], packet[src:src + n]
    udp = 10 + ((packet[ip] & 0x0F) * 4 if v == 4 else 40)
    p[udp:udp + 2], p[udp + 2:udp + 4] = packet[udp + 2:udp + 4], packet[udp:udp + 2]
    return bytes(p)


def receive(sock: socket.socket, want: int) -> list[bytes]:
    got = []
    sock.settimeout(1.0)
    try:
        while len(got) < want:
            got.append(sock.recv(65536))
    except TimeoutError:
        pass
    return got


def main(v: int) -> dict:
    family = socket.AF_INET if v == 4 else socket.AF_INET6
    mine, other = ("10.99.0.1", "10.99.0.2") if v == 4 else ("fd99::1", "fd99::2")
    tun = Tun("uso0", 1400, "10.99.0.1", prefixlen=24, offload=True, address6="fd99::1")
    time.sleep(2.5 if v == 6 else 0.2)     # IPv6 duplicate address detection
    tx = socket.socket(family, socket.SOCK_DGRAM)
    tx.bind((mine, 7777))
    payload = b"".join(bytes([i]) * SIZE for i in range(COUNT - 1)) + b"z" * (SIZE // 3)
    tx.sendmsg([payload], [(socket.SOL_UDP, UDP_SEGMENT, SIZE.to_bytes(2, "little"))], 0, (other, 9999))
    big = read_super(tun)
    out: dict = {"uso": tun.uso, "super": big is not None}
    if big is None:
        return out
    back = swap(big, v)
    cut = segment_udp(back)
    out["cut"] = len(cut)
    tun.write_batch(cut)
    out["cut_received"] = receive(tx, COUNT) == [payload[i:i + SIZE] for i in range(0, len(payload), SIZE)]
    tun.write_batch([back])
    out["whole_received"] = receive(tx, COUNT) == [payload[i:i + SIZE] for i in range(0, len(payload), SIZE)]
    tun.uso = False                        # as on a kernel without USO: write_batch cuts it
    tun.write_batch([back])
    out["fallback_received"] = receive(tx, COUNT) == [payload[i:i + SIZE] for i in range(0, len(payload), SIZE)]
    tun.uso = True
    # datagrams written one by one (no UDP_SEGMENT) leave the TUN as one super-packet
    for i in range(0, len(payload), SIZE):
        tx.sendto(payload[i:i + SIZE], (other, 9999))
    time.sleep(0.1)
    joined = read_super(tun)
    out["joined"] = joined is not None and int.from_bytes(joined[4:6], "little") == SIZE
    if joined is not None:
        tun.write_batch([swap(joined, v)])
        out["joined_received"] = receive(tx, COUNT) == [payload[i:i + SIZE] for i in range(0, len(payload), SIZE)]
    tun.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))), flush=True)
