"""Tier 1/2: a wake-up's read budget (daemon.BATCH, BATCH_BYTES). A batch ends
at the read that reaches the byte budget (UDP: or, when that read is a GRO
train ending with a full-size datagram, at the next train that ends short
or once past twice the budget); what is left arrives whole and in order with the
next batch (TUN: a SOCK_SEQPACKET pair stands in for the
device's descriptor, one packet per read as on a TUN)."""

from __future__ import annotations

import os
import socket

import pytest

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


def gro_trains(rx: Udp, tx: Udp, trains: list[list[bytes]]) -> None:
    """Send each train as one GSO send: on loopback it arrives as one GRO read."""
    if not (rx.gro and tx.gso):
        pytest.skip("no UDP GSO/GRO on this kernel")
    for train in trains:
        tx.send_batch([(d, rx.sock.getsockname()) for d in train])


def test_udp_batch_past_the_budget_reads_on_while_a_train_ends_with_a_full_size_datagram():
    """A GRO train that ends with a full-size datagram was most likely cut
    inside a message (its last data shard is the short one): past the
    budget, the batch reads on to a train that ends short, and stops there."""
    rx, tx = Udp("127.0.0.1", 0), Udp("127.0.0.1", 0)
    try:
        cut = [os.urandom(1000) for _ in range(4)]                  # ends full: 4000 >= 3000
        end = [os.urandom(1000), os.urandom(300)]                   # the message's end
        following = [os.urandom(1000) for _ in range(3)] + [os.urandom(200)]
        gro_trains(rx, tx, [cut, end, following])
        assert [bytes(d) for d, _ in rx.recv_batch(64, budget=3000)] == cut + end
        assert [bytes(d) for d, _ in rx.recv_batch(64, budget=3000)] == following
    finally:
        rx.close()
        tx.close()


def test_udp_batch_reads_on_for_at_most_twice_its_budget():
    rx, tx = Udp("127.0.0.1", 0), Udp("127.0.0.1", 0)
    try:
        trains = [[os.urandom(1000) for _ in range(2)] for _ in range(5)]     # each ends full
        gro_trains(rx, tx, trains)
        got = [bytes(d) for d, _ in rx.recv_batch(64, budget=2000)]
        assert got == trains[0] + trains[1]                         # 4000 >= 2 x 2000
        assert [bytes(d) for d, _ in rx.recv_batch(64, budget=1 << 20)] == sum(trains[2:], [])
    finally:
        rx.close()
        tx.close()
