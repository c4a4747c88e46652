"""Tier 1: fuzzing the datagram parser (Node.from_udp), in the manner of h11's fuzz test.

The invariant, for every input: it either yields an inner packet that was
really sent (at the destination), or a relay of a datagram or shard that
was really sent (at a forwarder), or, for a real shard, it is kept for
reassembly (docs/protocol.md §12), or it is exactly one counted drop
(global or per peer); never an exception, never anything else. A node may
also challenge the sender (docs/protocol.md §5), but only for a real
datagram: nothing unauthenticated makes it send anything.
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
    trust,
    tun_ip,
    udp,
)

from alpaca.protocol.constants import FLAG_FRAG, HEADER_SIZE, KIND_CHALLENGE, KIND_REPORT, MASK_SIZE, MAX_TTL
from alpaca.protocol.wire import MUTABLE_BYTES


def held_shards(node) -> int:
    return (sum(len(slot.chunks) for slot in node.reassembly.slots.values())
            + sum(seen[0].bit_count() for seen in node.reassembly.done.values()))


# ---------------------------------------------------------------- what was really sent

SENT_PACKETS = [udp(tun_ip("16.1"), INTERNET, data=b"x" * n) for n in (0, 1, 100, 1400)] + [
    tcp(tun_ip("16.1"), INTERNET, flags=SYN), udp(tun_ip("16.1"), INTERNET, 40000, 53, b"dns?"),
    udp(tun_ip("16.1"), INTERNET, data=b"y" * 1372)]      # 1400 bytes: a FEC batch of it needs 2 shards
UNPROVEN = b"\x09" * 8       # a session of 16.1 that never answered a challenge


def _pool() -> tuple[list[bytes], list[bytes]]:
    """Real datagrams from 16.1 to 1.1: as sealed, padded, and as relayed by a
    forwarder; shards of FEC batches (parity included); one of a session the
    receiver never verified. And the sessions the receiver has verified."""
    c = make_node("16.1", ids=("1.1", "1.2"), gateway="1.1")
    padded = make_node("16.1", ids=("1.1", "1.2"), gateway="1.1", padding=300)
    sharded = make_node("16.1", ids=("1.1", "1.2"), gateway="1.1", fec=(2, 1))
    pool = [d for p in SENT_PACKETS for d, _ in c.from_tun([p], T0).sends]
    pool += [d for p in SENT_PACKETS[:2] for d, _ in padded.from_tun([p], T0 + 1).sends]
    pool += [relayed(d) for d in pool[:3]]
    pool.append(make_datagram("16.1", "1.1", SENT_PACKETS[0], ts=T0, seq=99, ttl=1))
    shards = [d for p in (SENT_PACKETS[2], SENT_PACKETS[-1]) for d, _ in sharded.from_tun([p], T0).sends]
    assert len(shards) == 2 + 3 and all(header_of(d).flags & FLAG_FRAG for d in shards)    # k + m: 1 + 1, 2 + 1
    pool += shards + [relayed(shards[0])]
    pool.append(make_datagram("16.1", "1.1", SENT_PACKETS[1], ts=T0, session=UNPROVEN))
    return pool, [c.session, padded.session, sharded.session]


POOL, SESSIONS = _pool()
SHARDS = [d for d in POOL if header_of(d).flags & FLAG_FRAG and not header_of(d).path]
SENT_TAILS = {d[MUTABLE_BYTES:] for d in POOL}   # a relay may change only TTL and path
SOURCES = [addr("16.1"), addr("1.1"), addr("1.2"), ("203.0.113.9", 5555), ("2001:db8::9", 1040)]


def receiver():
    node = make_node("1.1", ids=("1.1", "1.2", "16.1", "16.2"))
    for session in SESSIONS:                       # (as if each had answered a challenge)
        trust(node, session, ("16.1",))
    return node


def forwarder():
    return make_node("1.2", ids=("1.1", "1.2", "16.1", "16.2"))


def relayed_total(node) -> int:
    return sum(p.relayed_packets for p in node.table.peers.values())


def feed(node, data: bytes, source, now: float = T0) -> None:
    """Feed one input and check the invariant."""
    before, global_before = total_drops(node), sum(node.global_drops.values())
    held, relays, tallied = held_shards(node), relayed_total(node), sum(node.loss.tally.get(pid("16.1"), ()))
    out = node.from_udp([(data, source)], now)
    after, global_after = total_drops(node), sum(node.global_drops.values())
    real = data[MUTABLE_BYTES:] in SENT_TAILS
    challenges = [(d, to) for d, to in out.sends if header_of(d).kind == KIND_CHALLENGE
                  and header_of(d).src == node.me]
    reports = [(d, to) for d, to in out.sends if header_of(d).kind == KIND_REPORT and header_of(d).src == node.me]
    sends = [s for s in out.sends if s not in challenges and s not in reports]
    if reports:
        # a real shard that completed the first tally for its source: reported at once (one
        # report, on each path to the source)
        assert real and header_of(data).flags & FLAG_FRAG and node.me == pid("1.1")
        assert len({d for d, _ in reports}) == 1 and header_of(reports[0][0]).dst == header_of(data).src
    if challenges:
        # "prove your session and this path": only for a real datagram for
        # this node, first to where it came from, at most once per peer here
        assert real and node.me == pid("1.1") and global_after == global_before
        assert challenges[0][1] == source and len({to for _, to in challenges}) == len(challenges)
        assert all(header_of(d).dst == header_of(data).src for d, _ in challenges)
    if out.tun:
        assert len(out.tun) == 1 and out.tun[0] in SENT_PACKETS, out.tun
        assert sends == [] and after == before and real
        assert node.me == pid("1.1")
    elif sends:
        # a relay: the same datagram or shard, TTL and path rewritten, never back
        assert after == before and real and node.me != pid("1.1")
        assert relayed_total(node) == relays + 1
        assert all(d[MUTABLE_BYTES:] == data[MUTABLE_BYTES:] for d, _ in sends)
        assert all(to != source for _, to in sends)
        assert len({d for d, _ in sends}) == 1
        h = header_of(sends[0][0])
        assert h.path == 1 and h.ttl == min(header_of(data).ttl, MAX_TTL) - 1 >= 1
    elif after == before:
        # a real shard, authenticated by its MAC: kept until its message is
        # complete (or counted with the message's other shards once decoded,
        # and the message tallied for the loss report once all its shards are in)
        assert real and header_of(data).flags & FLAG_FRAG and node.me == pid("1.1")
        assert held_shards(node) == held + 1 or (reports or sum(node.loss.tally.get(pid("16.1"), ())) > tallied)
    else:
        assert after == before + 1, (data.hex(), before, after)
        # a drop counted against a peer needs a real datagram
        assert global_after == global_before + 1 or real


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
    # a plain and a padded datagram, and the first shard of a two-shard message
    for original in (POOL[2], POOL[len(SENT_PACKETS)], SHARDS[2]):
        for make in (receiver, forwarder):
            node = make()
            for i in range(len(original)):
                for bit in range(8):
                    flipped = bytearray(original)
                    flipped[i] ^= 1 << bit
                    feed(node, bytes(flipped), addr("16.1"))
            # TTL and path flips are still the real datagram (delivered, kept or relayed
            # once, then duplicates); every other flip failed before touching a peer
            peer = node.table.get(pid("16.1"))
            peer_drops = sum(peer.drops.values())
            global_drops = sum(node.global_drops.values())
            assert global_drops == (len(original) - MUTABLE_BYTES) * 8
            assert peer_drops == MUTABLE_BYTES * 8 - 1 or (
                node.me == pid("1.2") and peer_drops == MUTABLE_BYTES * 8)   # TTL 0/1 flips at a relay


def test_every_byte_value_at_every_header_position():
    # a whole datagram's header, and a shard's header and sub-header (all masked, all authenticated)
    for original, size in ((POOL[0], HEADER_SIZE), (SHARDS[2], MASK_SIZE)):
        node = receiver()
        for i in range(size):
            for value in range(256):
                data = bytearray(original)
                data[i] = value
                feed(node, bytes(data), addr("16.1"))
        assert sum(node.global_drops.values()) == (size - MUTABLE_BYTES) * 255


def test_every_length_of_a_real_datagram():
    for original in (POOL[3], SHARDS[2]):
        for make in (receiver, forwarder):
            node = make()
            for n in range(len(original) + 1):
                feed(node, original[:n], addr("16.1"))
                feed(node, original[n:], addr("16.1"))
