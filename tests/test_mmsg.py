"""Tier 2 (loopback): Udp.recv_batch reads with recvmmsg (alpaca/host/mmsg.py)
exactly what it read with one recvmsg per datagram: the same datagrams, in
the same order, from the same senders in the core's plain address form, with
GSO trains cut back into their datagrams and the same local arrival
addresses noted; and it falls back to recvmsg where recvmmsg is missing or
refused. Tier 1: the budget sizes each recvmmsg."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from alpaca.host import mmsg, udp
from alpaca.host.udp import UDP_GRO, UDP_SEGMENT, Udp, _U16


def pair_of_receivers(listen: str, v6only: bool = False) -> tuple[Udp, Udp]:
    fast, slow = Udp(listen, 0, v6only=v6only), Udp(listen, 0, v6only=v6only)
    assert fast._mmsg is not None, "this C library has recvmmsg"
    slow._mmsg.close()
    slow._mmsg = None
    return fast, slow


def send_mix(rx: Udp, senders: list[tuple[socket.socket, str]]) -> None:
    """Single datagrams of odd sizes and a GSO train (one sendmsg, cut by the
    receiving kernel only if the socket did not ask for GRO), from every sender."""
    port = rx.sock.getsockname()[1]
    for k, (sock, dst) in enumerate(senders):
        for n in (1, 1400, 37, 0, 1200):
            sock.sendto(bytes([k, n % 256]) * (n // 2) + b"x" * (n % 2), (dst, port))
        train = [bytes([k, i]) * 500 for i in range(5)] + [b"end" * 100]
        sock.sendmsg(train, [(socket.IPPROTO_UDP, UDP_SEGMENT, _U16.pack(1000))], 0, (dst, port))


def read_all(rx: Udp, limit: int = 3) -> tuple[list, dict]:
    got, arrivals = [], {}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        batch = rx.recv_batch(limit)
        arrivals.update(rx.arrivals)
        got += [(bytes(d), a) for d, a in batch]
        if not batch:
            if got:
                break
            time.sleep(0.01)
    return got, arrivals


def same_traffic(fast: Udp, slow: Udp, sources: list[tuple[str, str]], family=socket.AF_INET) -> None:
    senders = []
    try:
        for src, dst in sources:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((src, 0))
            senders.append((s, dst))
        for rx in (fast, slow):
            send_mix(rx, senders)
        time.sleep(0.05)
        (got_fast, arr_fast), (got_slow, arr_slow) = read_all(fast), read_all(slow)
        assert got_fast == got_slow
        assert len(got_fast) == len(sources) * 11
        assert arr_fast == arr_slow
        if fast.sources is not None:
            assert len(arr_fast) == len(sources)    # each remote noted with the address it sent to
    finally:
        for s, _ in senders:
            s.close()


@pytest.mark.parametrize("gro", [True, False])
def test_ipv4_wildcard_socket_reads_the_same_with_recvmmsg(gro):
    fast, slow = pair_of_receivers("0.0.0.0")
    try:
        for rx in (fast, slow):     # without GRO the kernel cuts each train before we read it
            rx.sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, int(gro))
        reads = []
        real = fast._mmsg.receive
        fast._mmsg.receive = lambda n: [reads.append(len(m[0])) or m for m in real(n)]
        # two local addresses: the arrival notes must say which one each remote used
        same_traffic(fast, slow, [("127.0.0.1", "127.0.0.1"), ("127.0.0.3", "127.0.0.2")])
        assert (5300 in reads) == gro         # a train came as one read, and was cut by recv_batch
    finally:
        fast.close()
        slow.close()


@pytest.mark.parametrize("v6only", [False, True])
def test_ipv6_socket_reads_the_same_with_recvmmsg(v6only):
    fast, slow = pair_of_receivers("::", v6only=v6only)
    try:
        same_traffic(fast, slow, [("::1", "::1")], socket.AF_INET6)
        if not v6only:      # IPv4 on a dual-stack socket: plain dotted quads for the core
            same_traffic(fast, slow, [("127.0.0.1", "127.0.0.1")])
    finally:
        fast.close()
        slow.close()


def test_content_order_and_senders_are_exactly_recvmsgs():
    fast, slow = pair_of_receivers("127.0.0.1")
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        datagrams = [os.urandom(n) for n in (5, 1400, 0, 65000, 1, 999)]
        for rx in (fast, slow):
            for d in datagrams:
                tx.sendto(d, rx.sock.getsockname())
        src = ("127.0.0.1", tx.getsockname()[1])
        for rx in (fast, slow):
            got, _ = read_all(rx, limit=64)
            assert got == [(d, src) for d in datagrams]
    finally:
        for s in (fast, slow):
            s.close()
        tx.close()


def test_without_recvmmsg_in_libc_it_reads_with_recvmsg(monkeypatch):
    def missing():
        raise OSError("no recvmmsg in the C library")
    monkeypatch.setattr(mmsg, "libc_recvmmsg", missing)
    rx = Udp("127.0.0.1", 0)
    try:
        assert rx._mmsg is None
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hi", rx.sock.getsockname())
        assert [bytes(d) for d, _ in read_all(rx)[0]] == [b"hi"]
    finally:
        rx.close()


def test_a_refused_recvmmsg_falls_back_for_good():
    rx = Udp("127.0.0.1", 0)
    try:
        def refused(*_args):
            ctypes_errno = errno.ENOSYS
            raise OSError(ctypes_errno, os.strerror(ctypes_errno))
        rx._mmsg.receive = refused
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hi", rx.sock.getsockname())
        assert [bytes(d) for d, _ in read_all(rx)[0]] == [b"hi"]
        assert rx._mmsg is None
    finally:
        rx.close()


def test_each_recvmmsg_asks_for_what_fits_the_budget():
    rx = Udp("127.0.0.1", 0)
    asked = []
    real = rx._mmsg.receive
    rx._mmsg.receive = lambda n: asked.append(n) or real(n)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(100):
            tx.sendto(bytes(1400), rx.sock.getsockname())
        time.sleep(0.05)
        got = rx.recv_batch(64, budget=udp.MIN_READ_GUESS * 10)
        assert asked[0] == 10                       # 10 reads of the guessed size fill the budget
        assert len(got) == sum(asked) and len(got) * 1400 >= udp.MIN_READ_GUESS * 10
        asked.clear()
        assert len(rx.recv_batch(5)) == 5 and asked == [5]
    finally:
        rx.close()
        tx.close()
