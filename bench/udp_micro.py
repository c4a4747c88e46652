"""Per-datagram CPU of the UDP receive and send paths, one system call per datagram or batched.

    .venv/bin/python bench/udp_micro.py [--datagrams 1500] [--rounds 40] [--size 1400]

Loopback, no GRO (datagrams sent one by one are not coalesced there), as
on an underlay with offloads off. Receive: --datagrams datagrams are queued
in a socket first, then drained, and only the draining is timed (process CPU
time), so the sender's cost is not counted: alpaca's Udp.recv_batch
(IP_PKTINFO and UDP_GRO on, as the daemon has them) reading with recvmsg
and, unchanged, on top of bench/mmsg.py's recvmmsg (64 datagrams per call
into buffers set up once, control messages parsed in Python). Send: runs
of datagrams that GSO cannot take (alternating sizes, so each is its own
sendmsg today) through Udp.send_batch against a ctypes sendmmsg prototype. Prints microseconds per datagram (median over --rounds)
and the ratio. Not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from alpaca.host.udp import _CMSG_SPACE, RECV_SIZE, Udp  # noqa: E402
from mmsg import MmsgSocket  # noqa: E402

MSG_DONTWAIT = 0x40
VLEN = 64


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


_CMSGHDR = struct.Struct("@Nii")        # struct cmsghdr: len, level, type
_ALIGN = ctypes.sizeof(ctypes.c_size_t)


class MmsgWriter:
    """sendmmsg of a list of (bytes, (host, port)) on an IPv4 socket."""

    def __init__(self, sock: socket.socket, vlen: int = VLEN):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd, self.vlen = sock.fileno(), vlen
        self.names = ctypes.create_string_buffer(vlen * 16)
        self.iovs = (Iovec * vlen)()
        self.msgs = (Mmsghdr * vlen)()
        names = ctypes.addressof(self.names)
        for i in range(vlen):
            h = self.msgs[i].hdr
            h.name, h.namelen, h.iov, h.iovlen = names + i * 16, 16, ctypes.pointer(self.iovs[i]), 1

    def send(self, sends: list) -> None:
        for start in range(0, len(sends), self.vlen):
            chunk = sends[start:start + self.vlen]
            keep = []
            for i, (data, (host, port)) in enumerate(chunk):
                buf = ctypes.c_char_p(data)
                keep.append(buf)
                self.iovs[i].base = ctypes.cast(buf, ctypes.c_void_p)
                self.iovs[i].len = len(data)
                struct.pack_into("=H2s4s", self.names, i * 16, socket.AF_INET, port.to_bytes(2, "big"),
                                 socket.inet_aton(host))
            self.libc.sendmmsg(self.fd, self.msgs, len(chunk), 0)


def fill(tx: socket.socket, dst: tuple, n: int, size: int) -> None:
    payload = os.urandom(size)
    for _ in range(n):
        tx.sendto(payload, dst)


def time_drain(drain, rx_fd_count: int) -> tuple[float, int]:
    t0 = time.process_time()
    got = 0
    while True:
        batch = drain()
        if not batch:
            break
        got += len(batch)
    return time.process_time() - t0, got


def receive_bench(args) -> dict:
    """Udp.recv_batch on the socket itself and on MmsgSocket (recvmmsg underneath)."""
    socks = {"recvmsg": Udp("0.0.0.0", 0), "recvmmsg": Udp("0.0.0.0", 0)}
    socks["recvmmsg"].sock = MmsgSocket(socks["recvmmsg"].sock, RECV_SIZE, _CMSG_SPACE)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out: dict = {name: [] for name in socks}
    try:
        # both must return the same datagrams, senders, order
        sample = [bytes([i]) * (args.size - i) for i in range(200)]
        reads = []
        for udp in socks.values():
            for d in sample:
                tx.sendto(d, ("127.0.0.1", udp.sock.getsockname()[1]))
            reads.append([(bytes(d), a) for _ in range(4) for d, a in udp.recv_batch(64)])
        assert reads[0] == reads[1] and len(reads[0]) == len(sample), "recvmmsg reads something else"
        for _ in range(args.rounds):
            for name, udp in socks.items():
                fill(tx, ("127.0.0.1", udp.sock.getsockname()[1]), args.datagrams, args.size)
                cpu, got = time_drain(lambda: udp.recv_batch(64), 1)
                if got:
                    out[name].append(1e6 * cpu / got)
    finally:
        for udp in socks.values():
            udp.close()
        tx.close()
    return {k: statistics.median(v) for k, v in out.items() if v}


def send_bench(args) -> dict:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp = Udp("127.0.0.1", 0)
    writer = MmsgWriter(udp.sock)
    dst = rx.getsockname()
    # sizes alternate: no two neighbours can share a GSO send
    sends = [(os.urandom(args.size - (i % 2) * 100), dst) for i in range(256)]
    out: dict = {"sendmsg": [], "sendmmsg": []}
    try:
        for _ in range(args.rounds):
            for name, send in (("sendmsg", udp.send_batch), ("sendmmsg", writer.send)):
                t0 = time.process_time()
                for _ in range(4):
                    send(sends)
                out[name].append(1e6 * (time.process_time() - t0) / (4 * len(sends)))
                try:
                    while True:
                        rx.recv(65535, MSG_DONTWAIT)
                except BlockingIOError:
                    pass
    finally:
        udp.close()
        rx.close()
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datagrams", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--size", type=int, default=1400)
    args = ap.parse_args(argv)
    recv = receive_bench(args)
    send = send_bench(args)
    print(f"receive, µs per datagram: recvmsg {recv['recvmsg']:.2f}, recvmmsg {recv['recvmmsg']:.2f}, "
          f"ratio {recv['recvmmsg'] / recv['recvmsg']:.2f}")
    print(f"send (no GSO), µs per datagram: sendmsg {send['sendmsg']:.2f}, sendmmsg {send['sendmmsg']:.2f}, "
          f"ratio {send['sendmmsg'] / send['sendmsg']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
