"""Tier 1: fuzzing the datagram parser (Node.from_udp), in the manner of h11's fuzz test.

The invariant, for every input: it either yields an inner packet that was
really sent (at the destination) or a relay of a datagram that was really sent
(at a forwarder), or exactly one counted drop (global or per peer), or, when
its header is a well-formed shard's, it is held for reassembly or relayed by
header (docs/protocol.md "Fragments"); never an exception, never anything else.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import (
    INTERNET,
    SYN,
    T0,
    addr,
    header_of,
    make_datagram,
    make_node,
    pid,
    relayed,
    tcp,
    total_drops,
    tun_ip,
    udp,
)

from alpaca.protocol.constants import FLAG_FRAG, HEADER_SIZE
from alpaca.protocol.wire import MUTABLE_BYTES

def held_shards(node) -> int:
    return (sum(len(slot.shards) for slot in node.reassembly.slots.values())
            + sum(seen[0].bit_count() for seen in node.reassembly.done.values()))


# ---------------------------------------------------------------- what was really sent

SENT_PACKETS = [udp(tun_ip("16.1"), INTERNET, data=b"x" * n) for n in (0, 1, 100, 1400)] + [
    tcp(tun_ip("16.1"), INTERNET, flags=SYN), udp(tun_ip("16.1"), INTERNET, 40000, 53, b"dns?")]


def _pool() -> list[bytes]:
    """Real datagrams from 16.1 to 1.1: as sealed, padded, and as relayed by a forwarder."""
    c = make_node("16.1", ids=("1.1", "1.2"), gateway="1.1")
    padded = make_node("16.1", ids=("1.1", "1.2"), gateway="1.1", padding=300)
    pool = [d for p in SENT_PACKETS for d, _ in c.from_tun([p], T0).sends]
    pool += [d for p in SENT_PACKETS[:2] for d, _ in padded.from_tun([p], T0 + 1).sends]
    pool += [relayed(d) for d in pool[:3]]
    pool.append(make_datagram("16.1", "1.1", SENT_PACKETS[0], ts=T0, seq=99, ttl=1))
    return pool


POOL = _pool()
SENT_TAILS = {d[MUTABLE_BYTES:] for d in POOL}   # a relay may change only TTL and path
SOURCES = [addr("16.1"), addr("1.1"), addr("1.2"), ("203.0.113.9", 5555), ("2001:db8::9", 1040)]


def receiver():
    return make_node("1.1", ids=("1.1", "1.2", "16.1", "16.2"))


def forwarder():
    return make_node("1.2", ids=("1.1", "1.2", "16.1", "16.2"))


def feed(node, data: bytes, source, now: float = T0) -> None:
    """Feed one input and check the invariant."""
    before = total_drops(node)
    held, relayed_shards = held_shards(node), node.relayed_shards
    out = node.from_udp([(data, source)], now)
    after = total_drops(node)
    if out.tun:
        assert len(out.tun) == 1 and out.tun[0] in SENT_PACKETS, out.tun
        assert out.sends == [] and after == before
        assert node.me == pid("1.1")
    elif out.sends and node.relayed_shards == relayed_shards + 1:
        # a shard for someone else is relayed on the strength of its header
        assert after == before and header_of(data).flags & FLAG_FRAG
        assert all(d[MUTABLE_BYTES:] == data[MUTABLE_BYTES:] and to != source for d, to in out.sends)
    elif out.sends:
        assert after == before
        assert node.me != pid("1.1")
        assert all(d[MUTABLE_BYTES:] in SENT_TAILS for d, _ in out.sends)
        assert all(to != source for _, to in out.sends)
        assert len({d for d, _ in out.sends}) == 1
        h = header_of(out.sends[0][0])
        assert h.path == 1 and h.ttl >= 1
    elif after == before and header_of(data).flags & FLAG_FRAG:
        # a well-formed shard header cannot be authenticated alone: it is
        # held for reassembly (counted as incomplete when it expires)
        assert held_shards(node) == held + 1
    else:
        assert after == before + 1, (data.hex(), before, after)


# ---------------------------------------------------------------- hypothesis

@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(POOL)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "append", "splice", "swap"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=40))
        elif op == "splice":
            other = draw(st.sampled_from(POOL))
            cut = draw(st.integers(0, min(len(data), len(other))))
            data = data[:cut] + bytearray(other[cut:])
        elif op == "swap" and len(data) > HEADER_SIZE:
            data = data[HEADER_SIZE:] + data[:HEADER_SIZE]
    return bytes(data)


inputs = st.one_of(st.binary(max_size=300), st.sampled_from(POOL), mutated())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(inputs, st.sampled_from(SOURCES)), min_size=1, max_size=6),
       st.floats(-8, 8, allow_nan=False))
def test_any_bytes_are_a_packet_or_one_counted_drop(batch, skew):
    nodes = [receiver(), forwarder()]
    for data, source in batch:
        for node in nodes:
            feed(node, data, source, T0 + skew)


# ---------------------------------------------------------------- deterministic bit flips

def test_every_single_bit_flip_of_a_real_datagram():
    for original in (POOL[2], POOL[len(SENT_PACKETS)]):      # a plain and a padded datagram
        for make in (receiver, forwarder):
            node = make()
            for i in range(len(original)):
                for bit in range(8):
                    flipped = bytearray(original)
                    flipped[i] ^= 1 << bit
                    feed(node, bytes(flipped), addr("16.1"))
            # TTL and path flips are still the real datagram (delivered or relayed once,
            # then duplicates); every other flip failed before touching a peer
            peer = node.table.get(pid("16.1"))
            peer_drops = sum(peer.drops.values())
            global_drops = sum(node.global_drops.values())
            assert global_drops == (len(original) - MUTABLE_BYTES) * 8
            assert peer_drops == MUTABLE_BYTES * 8 - 1 or (
                node.me == pid("1.2") and peer_drops == MUTABLE_BYTES * 8)   # TTL 0/1 flips at a relay


def test_every_byte_value_at_every_header_position():
    node = receiver()
    original = POOL[0]
    for i in range(HEADER_SIZE):
        for value in range(256):
            data = bytearray(original)
            data[i] = value
            feed(node, bytes(data), addr("16.1"))
    assert sum(node.global_drops.values()) == (HEADER_SIZE - MUTABLE_BYTES) * 255


def test_every_length_of_a_real_datagram():
    for make in (receiver, forwarder):
        node = make()
        original = POOL[3]
        for n in range(len(original) + 1):
            feed(node, original[:n], addr("16.1"))
            feed(node, original[n:], addr("16.1"))
