"""Tier 2: the UDP module on loopback — GSO trains and GRO splitting keep
every datagram intact and in order, whatever the mix of sizes and addresses;
replies leave from the address the remote sent to (IP_PKTINFO). Tier 1: the
socket filter's program and the bounded map of reply sources."""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import time

import pytest

from alpaca.host.udp import MAX_FILTER_ADDRESSES, ReplySources, Udp, filter_program


def drain(udp: Udp, expected: int, timeout: float = 3.0) -> list[bytes]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        got += [d for d, _ in udp.recv_batch(64)]
        time.sleep(0.001)
    return got


def test_trains_and_odd_sizes_arrive_intact_and_in_order():
    rx, tx = Udp("127.0.0.1", 0), Udp("127.0.0.1", 0)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    try:
        dst = rx.sock.getsockname()
        sizes = [1400] * 50 + [700] + [1400] * 3 + [100, 100, 200] + [1400] * 70 + [1]
        datagrams = [os.urandom(n) for n in sizes]
        sends = []
        for k, d in enumerate(datagrams):
            sends.append((d, dst))
            if k % 17 == 0:             # interleave another address: breaks trains
                sends.append((b"x" * 1400, other.getsockname()))
        tx.send_batch(sends)
        assert drain(rx, len(datagrams)) == datagrams
        assert tx.send_errors == 0
    finally:
        for s in (rx, tx):
            s.close()
        other.close()


@pytest.mark.parametrize("sizes, runs", [
    ([1452] * 46 + [700], [44, 3]),                 # a 64 KiB message: 65,000 bytes a send at most
    ([1452] * 44 + [500], [45]),                    # the short last one fits the first send
    ([100] * 130, [64, 64, 2]),                     # 64 segments a send at most
    ([100, 100, 200, 100], [2, 2]),                 # a longer one starts a new run
    ([0, 0, 5], [1, 1, 1]),                         # (empty datagrams go alone)
])
def test_a_messages_shards_go_in_as_few_gso_sends_as_the_limits_allow(sizes, runs, monkeypatch):
    rx, tx = Udp("127.0.0.1", 0), Udp("127.0.0.1", 0)
    try:
        sent = []
        real = tx._send_gso
        monkeypatch.setattr(tx, "_send_gso", lambda ds, *a: (sent.append(len(ds)), real(ds, *a)))
        monkeypatch.setattr(tx, "_send_one", lambda d, *a: sent.append(1))
        dst = rx.sock.getsockname()
        tx.send_batch([(os.urandom(n), dst) for n in sizes])
        assert sent == runs and tx.send_errors == 0
    finally:
        rx.close()
        tx.close()


def test_falls_back_when_gso_is_refused():
    rx, tx = Udp("127.0.0.1", 0), Udp("127.0.0.1", 0)
    try:
        tx.gso = False
        datagrams = [os.urandom(1000) for _ in range(10)]
        tx.send_batch([(d, rx.sock.getsockname()) for d in datagrams])
        assert drain(rx, 10) == datagrams
    finally:
        rx.close()
        tx.close()


def test_ipv6_socket_speaks_plain_addresses_to_the_core():
    """With listen "::" the core still sees (host, port) pairs, IPv4 as dotted
    quads, so static addresses from secrets.txt match what arrives."""
    rx, tx = Udp("::", 0), Udp("127.0.0.1", 0)
    try:
        port = rx.sock.getsockname()[1]
        tx.send_batch([(b"hello", ("127.0.0.1", port))])
        got = []
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            got = rx.recv_batch(8)
        assert got == [(b"hello", ("127.0.0.1", tx.sock.getsockname()[1]))]
        rx.send_batch([(b"back", ("127.0.0.1", tx.sock.getsockname()[1]))])
        assert drain(tx, 1) == [b"back"]
    finally:
        rx.close()
        tx.close()


# ---------------------------------------------------------------- socket filter (SO_ATTACH_FILTER)

def run_bpf(program, source: str, random_u32: int = 0) -> int:
    """What the kernel would return for a datagram from `source` (the classic
    BPF subset filter_program emits)."""
    ip = ipaddress.ip_address(source)
    net = {0: 0x45 if ip.version == 4 else 0x60, 12: int.from_bytes(ip.packed[:4], "big")}
    pc, a = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        k = k - (1 << 32) if k >= 1 << 31 else k
        if code in (0x20, 0x30):                                  # ld / ldb [k]
            a = random_u32 if k == -0x1000 + 56 else net[k + 0x100000]
        elif code == 0x05:                                        # ja
            pc += k
        elif code in (0x15, 0x35):                                # jeq / jge #k
            pc += jt if (a == k & 0xFFFFFFFF if code == 0x15 else a >= k & 0xFFFFFFFF) else jf
        elif code == 0x06:
            return k & 0xFFFFFFFF
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
        pc += 1


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 100, MAX_FILTER_ADDRESSES])
def test_filter_program_finds_exactly_the_known_addresses(count):
    rng = random.Random(count)
    known = {str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(count)}
    others = {str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(300)} - known
    program = filter_program(known, unknown_one_in=0)
    assert len(program) <= 4096
    assert all(run_bpf(program, host) for host in known)
    assert not any(run_bpf(program, host) for host in others)
    # one in 16 of the others: the random u32 decides
    some = filter_program(known, unknown_one_in=16)
    assert run_bpf(some, "192.0.2.1", random_u32=(1 << 28) - 1) and not run_bpf(some, "192.0.2.1", random_u32=1 << 28)
    # an IPv6 socket: IPv6 datagrams all pass, IPv4 ones (mapped) are filtered
    v6 = filter_program(known, unknown_one_in=0, v6_socket=True)
    assert run_bpf(v6, "2001:db8::1") and all(run_bpf(v6, h) for h in known)
    assert not any(run_bpf(v6, h) for h in others)


def arrivals(rx: Udp, sources: list[str], count: int = 1) -> dict[str, int]:
    """Send `count` datagrams from each loopback source address to rx; how
    many of each arrived."""
    port = rx.sock.getsockname()[1]
    senders = {}
    try:
        for host in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, 0))
            senders[host] = s
        got = {host: 0 for host in sources}
        for _ in range(count):
            for host, s in senders.items():
                s.sendto(host.encode(), ("127.0.0.1", port))
            time.sleep(0.0005)
            for data, _ in rx.recv_batch(64):
                got[data.decode()] += 1
        time.sleep(0.05)
        for data, _ in rx.recv_batch(1000):
            got[data.decode()] += 1
        return got
    finally:
        for s in senders.values():
            s.close()


@pytest.mark.parametrize("listen", ["127.0.0.1", "::"])
def test_socket_filter_in_the_kernel(listen):
    """The kernel takes the program and filters by source address: known ones
    pass, the rest not at all (unknown_one_in=0), all of them (1), or about 1
    in 16; the drops show in kernel_drops; removing the filter lets all in."""
    if listen == "::" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    rx = Udp(listen, 0)
    try:
        many = {f"10.{i >> 8}.{i & 255}.1" for i in range(MAX_FILTER_ADDRESSES - 2)}
        assert rx.filter_known(many | {"127.0.0.1", "127.0.0.5"}, unknown_one_in=0)
        assert rx.filtered == MAX_FILTER_ADDRESSES
        before = rx.kernel_drops()
        assert arrivals(rx, ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.5"], 5) == \
            {"127.0.0.1": 5, "127.0.0.2": 0, "127.0.0.3": 0, "127.0.0.5": 5}
        assert rx.kernel_drops() - before == 10
        assert rx.filter_known({"127.0.0.2"}, unknown_one_in=1)
        assert arrivals(rx, ["127.0.0.1", "127.0.0.2"], 3) == {"127.0.0.1": 3, "127.0.0.2": 3}
        assert rx.filter_known({"127.0.0.2"})                      # the default: 1 in 16 of the others
        got = arrivals(rx, ["127.0.0.1", "127.0.0.2"], 1600)
        assert got["127.0.0.2"] == 1600 and 40 <= got["127.0.0.1"] <= 200, got
        # more addresses than a filter takes: no filter, everything passes
        assert not rx.filter_known(many | {f"127.0.1.{i}" for i in range(10)})
        assert rx.filtered is None
        assert arrivals(rx, ["127.0.0.1", "127.0.0.3"], 3) == {"127.0.0.1": 3, "127.0.0.3": 3}
    finally:
        rx.close()


# ---------------------------------------------------------------- reply sources (IP_PKTINFO)

A, B = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"      # two local addresses


def test_reply_sources_follow_the_last_arrival():
    m = ReplySources(limit=4)
    assert m.source(("192.0.2.1", 1040)) is None                # never heard: the kernel chooses
    m.arrived(("192.0.2.1", 1040), A)
    assert m.get(("192.0.2.1", 1040)) == A
    assert m.source(("192.0.2.1", 1040)) == A
    m.arrived(("192.0.2.1", 1040), B)                           # the remote now sends to B
    assert m.source(("192.0.2.1", 1040)) == B
    assert m.source(("192.0.2.1", 1041)) is None                # another port is another remote
    m.forget(("192.0.2.1", 1040))
    assert m.source(("192.0.2.1", 1040)) is None and len(m) == 0


def test_reply_sources_are_bounded_and_a_flood_keeps_the_answered_peers():
    """Arrivals from many addresses push out only each other (oldest first);
    the remotes we send to stay, the least recently sent-to going first."""
    m = ReplySources(limit=3)
    peers = [(f"192.0.2.{i}", 1040) for i in range(3)]
    for peer in peers:
        m.arrived(peer, A)
        assert m.source(peer) == A                               # answered: kept apart
    for i in range(1000):                                        # garbage from spoofed addresses
        m.arrived((f"198.51.100.{i % 250}", i), B)
    assert len(m) == 6
    assert [m.get(p) for p in peers] == [A, A, A]
    assert m.get(("198.51.100.249", 999)) == B and m.get(("198.51.100.246", 996)) is None
    m.source(peers[0])                                           # sent to again: the newest
    m.arrived(("203.0.113.1", 1040), A)
    m.source(("203.0.113.1", 1040))                              # a fourth peer answered: peers[1] goes
    assert m.get(peers[1]) is None
    assert m.get(peers[0]) == A and m.get(peers[2]) == A and m.get(("203.0.113.1", 1040)) == A


def recv_from(sock: socket.socket, count: int, timeout: float = 3.0) -> list[tuple[bytes, str]]:
    """`count` datagrams on a plain socket, each with its source host."""
    sock.settimeout(timeout)
    got = []
    for _ in range(count):
        data, addr = sock.recvfrom(65535)
        got.append((data, addr[0]))
    return got


@pytest.mark.parametrize("listen", ["0.0.0.0", "::"])
def test_replies_leave_from_the_address_the_remote_sent_to(listen):
    """Bound to the wildcard address, a datagram that arrived on 127.0.0.5 is
    answered from 127.0.0.5 (not 127.0.0.1, the kernel's choice) once the
    core has vouched for its sender (confirm), single and GSO trains alike; a remembered address that is gone is forgotten and the
    kernel chooses again."""
    rx = Udp(listen, 0)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    try:
        assert rx.sources is not None
        port = rx.sock.getsockname()[1]
        remote = peer.getsockname()
        peer.sendto(b"hello", ("127.0.0.5", port))
        got = []
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            got = rx.recv_batch(8)
        assert got == [(b"hello", remote)]
        # only what the core authenticated teaches the reply address
        assert rx.reply_source(remote) is None and rx.arrivals == {remote: socket.inet_aton("127.0.0.5")}
        rx.confirm(set())
        assert rx.reply_source(remote) is None
        rx.confirm({remote})
        assert rx.reply_source(remote) == "127.0.0.5"
        train = [os.urandom(1000) for _ in range(5)] + [b"last"]
        rx.send_batch([(d, remote) for d in train])
        assert recv_from(peer, 6) == [(d, "127.0.0.5") for d in train]
        # the address is gone (here: one that was never local): sent from the kernel's choice
        rx.sources.used[remote] = socket.inet_aton("192.0.2.1")
        train = [b"x" * 1000] * 3 + [b"end"]
        rx.send_batch([(d, remote) for d in train])                 # a GSO train
        assert recv_from(peer, 4) == [(d, "127.0.0.1") for d in train]
        rx.sources.used[remote] = socket.inet_aton("192.0.2.1")
        rx.send_batch([(b"one", remote)])                           # a single datagram
        assert recv_from(peer, 1) == [(b"one", "127.0.0.1")]
        assert rx.stale_sources == 2 and rx.send_errors == 0 and rx.gso
        assert rx.reply_source(remote) is None
    finally:
        rx.close()
        peer.close()


def test_a_socket_on_one_address_needs_no_reply_sources():
    udp = Udp("127.0.0.1", 0)
    try:
        assert udp.sources is None and udp.reply_source(("127.0.0.2", 1)) is None
    finally:
        udp.close()
