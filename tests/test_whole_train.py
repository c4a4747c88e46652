"""Tier 1: whole trains (docs/protocol.md §12 "Whole trains") change what a
receiver spends, never what it does.

Two receivers get the same datagrams in the same batches: one as the
product runs, one with the whole-train path switched off (every shard
checked by its MAC, inbound._train). The batches are the shards of many
super-packets, with shards lost, copied, swapped, given a forged chunk, and
strangers' datagrams in between, cut into receive batches at random. Both
must deliver the same packets in the same order and end with the same
drops, counters, loss tallies, replay windows and reassembly state.
(A shard whose masked header was changed on the way but whose chunk is
genuine is the one input they may treat differently: inside a whole train
its header is not read. It is left out here.)
"""

from __future__ import annotations

import os
import random

import pytest
from protocol_helpers import T0, addr, make_node, pid, trust
from test_fragments import super_packet

from alpaca.protocol.constants import MASK_SIZE
from alpaca.protocol.peers import OWN_WINDOW

FRM = addr("16.1")
STRANGER = ("198.51.100.7", 4000)


def receiver(fec):
    server = make_node("1.1", vnet=True, fec=fec)
    trust(server, CLIENT_SESSION, ("16.1",))
    return server


CLIENT_SESSION = b"c" * 8


def sender(fec):
    client = make_node("16.1", gateway="1.1", vnet=True, fec=fec)
    client.session = CLIENT_SESSION
    return client


def spoil(rng: random.Random, shards: list[bytes]) -> list[tuple[bytes, tuple]]:
    """A message's shards as the network and a forger might hand them over
    (half the messages untouched)."""
    if rng.random() < 0.5:
        return [(d, FRM) for d in shards]
    out = []
    for d in shards:
        r = rng.random()
        if r < 0.04:
            continue                                        # lost
        if r < 0.07:
            forged = bytearray(d)
            forged[MASK_SIZE + rng.randrange(len(d) - MASK_SIZE - 24)] ^= 1 << rng.randrange(8)
            out.append((bytes(forged), FRM))                # a forged chunk: its MAC fails
        else:
            out.append((d, FRM))
        if r > 0.97:
            out.append((d, FRM))                            # a copy
        if 0.95 < r <= 0.97:
            out.append((os.urandom(rng.randrange(42, 1500)), STRANGER))
    for _ in range(rng.randrange(3) if len(out) > 2 else 0):
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]             # reordered on the way
    return out


def state(node) -> dict:
    peer = node.table.get(pid("16.1"))
    window = peer.replay.get(OWN_WINDOW)
    return {"global": dict(node.global_drops), "drops": dict(peer.drops), "rx": (peer.rx_packets, peer.rx_bytes),
            "tally": dict(node.loss.tally), "slots": {k: sorted(s.chunks) for k, s in node.reassembly.slots.items()},
            "done": {k: list(v) for k, v in node.reassembly.done.items()},
            "window": [bytes(page) for *_, page in window.bitmaps()] if window else None}


@pytest.mark.parametrize("seed", range(12))
def test_whole_trains_change_nothing_but_the_work(seed):
    rng = random.Random(seed)
    fec = rng.choice([None, (10, 2), (20, 1)])
    client, plain, whole = sender(fec), receiver(fec), receiver(fec)
    plain._whole = lambda *a: -1                            # every shard by its MAC
    now = T0 + 0.1
    first = [(d, FRM) for d, _ in client.from_tun([super_packet(3000)], now).sends]
    for node in (plain, whole):
        node.from_udp(first, now)
        node.table.get(pid("16.1")).paths[FRM].proven = True    # as if it had answered a challenge
    stream = []
    for n in range(30):
        now += 0.002
        packet = super_packet(rng.choice([3000, 20_000, 40_000, 60_000]) + n)
        stream += spoil(rng, [d for d, _ in client.from_tun([packet], now).sends])
    delivered_plain, delivered_whole = in_random_batches(rng, stream, (plain, whole), now, lambda out: out.tun, state)
    assert delivered_whole == delivered_plain
    assert len(delivered_plain) >= 10                       # (most messages arrive)


def in_random_batches(rng: random.Random, stream: list, nodes: tuple, now: float, output, state) -> list[list]:
    """Hand each node the same stream of datagrams in the same receive
    batches of random sizes; after every batch, state(node) must be the same
    for all. Returns what output(from_udp's result) gathered, per node."""
    gathered = [[] for _ in nodes]
    i = 0
    while i < len(stream):
        j = min(len(stream), i + rng.randrange(1, 160))
        for got, node in zip(gathered, nodes):
            got += output(node.from_udp(stream[i:j], now))
        assert all(state(node) == state(nodes[0]) for node in nodes[1:]), f"after datagrams {i}..{j}"
        i = j
    return gathered
