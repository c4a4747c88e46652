"""Tier 1/2: a wake-up's read budget (daemon.BATCH, BATCH_BYTES). A batch ends
at the read that reaches the byte budget; what is left arrives whole and in
order with the next batch (TUN: a SOCK_SEQPACKET pair stands in for the
device's descriptor, one packet per read as on a TUN)."""

from __future__ import annotations

import os
import socket

from alpaca.host.tun import Tun
from alpaca.host.udp import Udp


def fake_tun() -> tuple[Tun, socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    tun = Tun.__new__(Tun)
    tun.name, tun.fd, tun.dev, tun.offload = "fake", ours.fileno(), None, False
    return tun, ours, theirs


def test_tun_batch_ends_at_the_byte_budget_and_keeps_the_rest_in_order():
    tun, ours, theirs = fake_tun()
    try:
        packets = [os.urandom(n) for n in (30000, 30000, 100, 30000, 60, 70)]
        for p in packets:
            theirs.send(p)
        first = tun.read_batch(64, budget=50000)
        assert first == packets[:2]                 # the read that crossed the budget is the last
        assert tun.read_batch(64, budget=30000) == packets[2:4]
        assert tun.read_batch(64, budget=50000) == packets[4:]
        assert tun.read_batch(64, budget=50000) == []
    finally:
        ours.close()
        theirs.close()


def test_tun_batch_without_budget_counts_packets_only():
    tun, ours, theirs = fake_tun()
    try:
        packets = [os.urandom(20000) for _ in range(5)]
        for p in packets:
            theirs.send(p)
        assert tun.read_batch(3) == packets[:3]
        assert tun.read_batch(3) == packets[3:]
    finally:
        ours.close()
        theirs.close()


def test_udp_batch_ends_at_the_byte_budget_and_keeps_the_rest_in_order():
    rx, tx = Udp("127.0.0.1", 0), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        datagrams = [os.urandom(1400) for _ in range(10)]
        for d in datagrams:
            tx.sendto(d, rx.sock.getsockname())
        got = [bytes(d) for d, _ in rx.recv_batch(64, budget=4000)]
        assert got == datagrams[:3]                 # 3 x 1400 crosses 4000
        rest = [bytes(d) for d, _ in rx.recv_batch(64, budget=1 << 20)]
        assert rest == datagrams[3:]
    finally:
        rx.close()
        tx.close()
