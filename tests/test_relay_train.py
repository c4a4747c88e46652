"""Tier 1: a forwarder's relayed trains (relay._relay_train) change what it
spends, never what it does.

Two forwarders get the same datagrams in the same batches: one as the
product runs, one with the prediction of the next shard switched off (each
shard goes through the full receive path and relay._relay). The batches
are the shards of many super-packets from a client to a server, with
shards lost, copied, swapped, given a forged chunk, and strangers'
datagrams in between, cut into receive batches at random. Both must relay
the same datagrams to each address in the same order and end with the same
drops, counters, relay windows and path credits. The server is reached on
one address, or on two: both proven, or one not proven with credit for
none, a few or every shard, so both ways of spending credit are covered.
"""

from __future__ import annotations

import random

import pytest
from protocol_helpers import T0, addr, make_node, pid, trust
from test_fragments import super_packet
from test_whole_train import CLIENT_SESSION, in_random_batches, spoil

from alpaca.protocol.peers import Path

SERVER = pid("1.1")
SECOND = ("192.0.2.77", 4444)       # the server's second address, learned and not proven


def forwarder(second: str, credit: int):
    """second: the server's second address is "none", "proven", or "credit" (not proven, with `credit` bytes)."""
    node = make_node("1.2", mode="forwarder")
    trust(node, CLIENT_SESSION, ("16.1",))
    if second != "none":
        node.table.get(SERVER).paths[SECOND] = Path(SECOND, relayed=False, last_rx=T0, proven=second == "proven",
                                                    credit=credit)
    return node


def state(node) -> dict:
    client, server = node.table.get(pid("16.1")), node.table.get(SERVER)
    window = client.replay.get(SERVER)
    return {"global": dict(node.global_drops), "drops": dict(client.drops), "relayed": client.relayed_packets,
            "credit": server.paths[SECOND].credit if SECOND in server.paths else None,
            "window": [bytes(page) for *_, page in window.bitmaps()] if window else None}


def by_target(sends) -> dict:
    out = {}
    for datagram, to in sends:
        out.setdefault(to, []).append(bytes(datagram))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_relayed_trains_change_nothing_but_the_work(seed):
    rng = random.Random(seed)
    fec = rng.choice([None, (10, 2)])
    second, credit = ["none", "proven", "credit"][seed % 3], rng.choice([0, 5 * 1500, 10 ** 9])
    client = make_node("16.1", gateway="1.1", forwarders=("1.2",), vnet=True, fec=fec)
    client.session = CLIENT_SESSION
    plain, trains = forwarder(second, credit), forwarder(second, credit)
    plain._predict_relay = lambda *a: None                  # every shard by the full path
    relay_train, taken = trains._relay_train, []
    trains._relay_train = lambda *a: taken.append(relay_train(*a)) or taken[-1]
    now = T0 + 0.1
    stream = []
    for n in range(25):
        now += 0.002
        packet = super_packet(rng.choice([3000, 20_000, 60_000]) + n)
        sends = client.from_tun([packet], now).sends
        assert {to for _, to in sends} == {addr("1.2")}
        stream += spoil(rng, [d for d, _ in sends])
    relayed_plain, relayed_trains = in_random_batches(rng, stream, (plain, trains), now, lambda out: out.sends, state)
    assert by_target(relayed_trains) == by_target(relayed_plain)
    assert state(plain)["relayed"] >= 300                   # (most shards went on)
    assert sum(n + 1 for n in taken if n >= 0) >= 200       # (most of them in trains)
