"""Tier 2: the UDP module on loopback — GSO trains and GRO splitting keep
every datagram intact and in order, whatever the mix of sizes and addresses."""

from __future__ import annotations

import os
import socket
import time

from alpaca.udp import Udp


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
