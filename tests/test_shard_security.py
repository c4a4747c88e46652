"""Tier 1: the shard layer against a forger who knows the group name (or one
member's own key string), docs/security.md §6 and "Shards".

Each test is one of the attacks found against the previous shard layer,
driven through the pure core: relay storms, reassembly exhaustion, decode
CPU, memory, forged loss, reflection, replay after a restart, and a clock
excursion. A forger here unmasks and masks headers with the group key, so
it can write any header and sub-header it likes; what it lacks is a pair
key, which is what every shard's MAC and every datagram's AEAD need.
"""

from __future__ import annotations

import os

import pytest

from protocol_helpers import (START, T0, Wire, addr, data_only, full_path_of, header_of, make_datagram, make_node, name,
                              pid, tcp, trust, tun_ip)
from test_fragments import super_packet

from alpaca.protocol import fec
from alpaca.protocol.constants import (FLAG_FRAG, FLAG_ISAL, KIND_CHALLENGE, KIND_DATA, MASK_SIZE, REPORT_INTERVAL,
                                       REASSEMBLY_TIMEOUT, WIRE_VERSION)
from alpaca.protocol.crypto import derive_group_key, mask_state
from alpaca.protocol.drops import DropReason
from alpaca.protocol.wire import SUB, Header, peek

GROUP_KEY = derive_group_key("example")


def forged_shard(src: str, dst: str, index: int = 0, k: int = 47, m: int = 0, length: int = 66_000,
                 chunk_len: int | None = None, ttl: int = 255, seq: int = 0, flags: int = FLAG_FRAG,
                 ts: float = T0) -> bytes:
    """A shard datagram as a holder of the group name alone can make it: a
    header and sub-header of its choice, masked correctly, random chunk and MAC."""
    size = fec.shard_size(length, k)
    chunk_len = chunk_len if chunk_len is not None else (length - (k - 1) * size if index == k - 1 else size)
    tail = os.urandom(chunk_len + 8)
    clear = Header(ttl, 0, KIND_DATA, pid(src), pid(dst), b"\x07" * 8, int(ts), seq + index, 0,
                   flags).pack() + SUB.pack(index, k, m, length >> 16, length & 0xFFFF)
    h = mask_state(GROUP_KEY).copy()
    h.update(tail[-16:])
    masked = (int.from_bytes(clear, "big") ^ int.from_bytes(h.digest(), "big")).to_bytes(MASK_SIZE, "big")
    return masked + tail


def vnet_pair(**kw):
    client = make_node("16.1", gateway="1.1", vnet=True, **kw)
    server = make_node("1.1", vnet=True, **kw)
    trust(server, client.session, ("16.1",))
    trust(client, server.session, ("1.1",))
    return client, server


# ---------------------------------------------------------------- 1. relay storms

def four_servers_with_relayed_paths():
    """Servers 1.1-1.4, each holding, for client 16.1, a relayed path through
    every other server (what a member gets by sending keepalives to Sj
    through Si), and client 16.2 sending to 16.1 through 1.1."""
    ids = ("1.1", "1.2", "1.3", "1.4", "16.1", "16.2")
    static = ("1.1", "1.2", "1.3", "1.4")
    servers = [make_node(s, ids=ids, static=static) for s in static]
    for sj in servers:
        for si in static:
            if si != name(sj):
                keepalive = make_datagram("16.1", name(sj), b"", kind=1, seq=pid(si), path=1)
                sj.from_udp([(keepalive, addr(si))], T0)
        assert sum(p.relayed for p in sj.table.get(pid("16.1")).paths.values()) == 3
        for path in sj.table.get(pid("16.1")).paths.values():
            path.proven = True      # the worst case: every relayed path proven
    return servers


def test_a_forged_shard_with_the_highest_ttl_is_relayed_nowhere():
    servers = four_servers_with_relayed_paths()
    wire = Wire(*servers)
    forged = forged_shard("16.2", "16.1", ttl=255)
    got = wire.run([(forged, addr("1.1"))], "16.2", T0)
    assert len(got.hops) == 1                           # it reached 1.1 and went no further
    assert servers[0].global_drops[DropReason.AUTH_FAILURE] == 1
    assert sum(s.table.get(pid("16.2")).relayed_packets for s in servers) == 0


def test_a_genuine_shard_is_relayed_at_most_once_per_relay_and_the_storm_is_bounded():
    servers = four_servers_with_relayed_paths()
    sender = make_node("16.2", ids=("1.1", "1.2", "1.3", "1.4", "16.1", "16.2"),
                       static=("1.1", "1.2", "1.3", "1.4"), gateway="1.1", vnet=True, ttl=255)
    wire = Wire(*servers, sender)
    packet = super_packet(src="16.2", dst="16.1")
    shards = [d for d, a in sender.from_tun([packet], T0).sends if header_of(d).flags & FLAG_FRAG]
    assert shards and header_of(shards[0]).ttl == 255
    got = wire.run([(shards[0], addr("1.1"))], "16.2", T0)
    for s in servers:
        assert s.table.get(pid("16.2")).relayed_packets <= 1, name(s)
    # each relay sends it on at most once, to at most its paths: 4 relays x 4 paths
    assert len(got.hops) <= 1 + 4 * 4, len(got.hops)
    for _, _, datagram in got.hops[1:]:
        if header_of(datagram).path:                    # relayed (the rest: challenges and answers)
            assert header_of(datagram).ttl < 16         # a relay never passes on more than MAX_TTL


# ---------------------------------------------------------------- 2-4. pre-auth state, CPU, memory

def test_forged_first_shards_open_no_slot_and_a_genuine_message_still_arrives():
    client, server = vnet_pair()
    for i in range(2000):
        server.from_udp([(forged_shard("16.1", "1.1", seq=i * 64), addr("16.1"))], T0)
    assert not server.reassembly.slots and server.reassembly.bytes == 0
    assert server.global_drops[DropReason.AUTH_FAILURE] == 2000
    packet = super_packet()
    out = []
    for d, _ in client.from_tun([packet], T0).sends:
        out.extend(server.from_udp([(d, addr("16.1"))], T0).tun)
    assert out == [packet]


def test_a_forged_shard_claiming_heavy_parity_never_reaches_a_codec(monkeypatch):
    _, server = vnet_pair()

    def no_decode(*a, **kw):
        raise AssertionError("a forged shard reached the Reed-Solomon decoder")
    monkeypatch.setattr(fec, "decode", no_decode)
    monkeypatch.setattr(fec, "_codec", no_decode)
    for index in range(254):
        d = forged_shard("16.1", "1.1", index=index, k=127, m=127, length=127 * 500,
                         flags=FLAG_FRAG | FLAG_ISAL)
        server.from_udp([(d, addr("16.1"))], T0)
    assert server.global_drops[DropReason.AUTH_FAILURE] == 254


def test_forged_never_completing_shards_hold_no_memory_and_count_as_unauthenticated():
    _, server = vnet_pair()
    for i in range(500):
        d = forged_shard("16.1", "1.1", k=1, m=0, length=65_000, chunk_len=65_000, seq=i)
        server.from_udp([(d, addr("16.1"))], T0)
    assert server.reassembly.bytes == 0 and not server.reassembly.slots
    # counted the moment it arrives (the daemon's flood filter sums these), not when a slot expires
    assert server.global_drops[DropReason.AUTH_FAILURE] == 500


def test_a_members_own_shards_are_bounded_by_its_byte_budget():
    """What a member can do with its own key: open slots for its own
    messages, up to its budget, counted against itself."""
    from alpaca.protocol.constants import REASSEMBLY_PEER_BYTES, REASSEMBLY_PER_PEER
    client, server = vnet_pair()
    sent = 0
    for i in range(REASSEMBLY_PER_PEER + 20):
        shards = [d for d, _ in client.from_tun([super_packet(size=60_000 + i)], T0).sends]
        server.from_udp([(shards[0], addr("16.1"))], T0)     # first shard only: never completes
        sent += 1
    peer = server.table.get(pid("16.1"))
    assert len(server.reassembly.slots) <= REASSEMBLY_PER_PEER
    assert server.reassembly.bytes <= REASSEMBLY_PEER_BYTES
    assert peer.drops[DropReason.REASSEMBLY_FULL] == sent - REASSEMBLY_PER_PEER
    server.tick(T0 + REASSEMBLY_TIMEOUT + REPORT_INTERVAL + 0.01)
    assert server.reassembly.bytes == 0
    assert peer.drops[DropReason.INCOMPLETE] == REASSEMBLY_PER_PEER


# ---------------------------------------------------------------- 5. forged loss

def test_forged_incomplete_messages_do_not_raise_the_senders_parity_or_copies():
    def clean_traffic(forgeries: int):
        client, server = vnet_pair(fec=fec.AUTO)
        wire = Wire(client, server)
        for i in range(forgeries):      # "from" the client, to the server
            server.from_udp([(forged_shard("16.1", "1.1", seq=i * 64, m=20), addr("16.1"))], T0)
        for t in range(8):              # genuine, clean traffic both ways
            now = T0 + t * 0.5
            wire.originate(client, [super_packet(size=30_000 + t)], now)
            wire.originate(server, [super_packet(size=30_000 + t, src="1.1", dst="16.1")], now)
            wire.tick(server, now + 0.01)
            wire.tick(client, now + 0.01)
        tally = server.loss.tally.get(pid("16.1"))
        assert not tally or tally[0] == tally[1]
        return client.loss.loss.get(pid("1.1")), client._parity(pid("1.1"), client.loss.k), \
            client._parity(pid("1.1"), 1)

    # the client's estimate is exactly what the same traffic without forgeries gives
    forged = clean_traffic(300)
    assert forged == clean_traffic(0)
    assert forged[1:] == (0, 0)


# ---------------------------------------------------------------- 6. reflection

def test_a_member_spoofing_a_victims_address_gets_no_more_sent_there_than_it_sent():
    client, server = make_node("16.1", gateway="1.1"), make_node("1.1")
    trust(server, client.session, ("16.1",))
    victim = [("203.0.113.9", 5000 + i) for i in range(8)]
    received = 0
    for i, v in enumerate(victim):       # genuine keepalives from the member, sources forged to the victim
        d = make_datagram("16.1", "1.1", b"", kind=1, seq=100 + i, ts=T0)
        received += len(d)
        server.from_udp([(d, v)], T0)
    sent_to_victim = 0
    for i in range(50):                  # the server's traffic to the member: 50 x 1400 bytes
        out = server.from_tun([tcp(tun_ip("1.1"), tun_ip("16.1"), data=bytes(1300))], T0 + 0.01 * i)
        sent_to_victim += sum(len(d) for d, a in out.sends if a in victim)
    challenges = 8                        # at most one small challenge per new path
    assert sent_to_victim <= received + challenges * 80, (sent_to_victim, received)
    assert not any(p.proven for a, p in server.table.get(pid("16.1")).paths.items() if a in victim)


def test_a_path_that_answers_its_challenge_is_proven_and_carries_everything():
    client, server = make_node("16.1", gateway="1.1"), make_node("1.1")
    wire = Wire(client, server)
    wire.tick(client, T0)                 # a keepalive: the server learns the path and challenges it
    path = server.table.get(pid("16.1")).paths[addr("16.1")]
    assert path.proven
    got = wire.originate(server, [tcp(tun_ip("1.1"), tun_ip("16.1"), data=bytes(1300))] * 20, T0 + 0.1)
    assert len(got.tun["16.1"]) == 20


# ---------------------------------------------------------------- 7-8. restarts and clock excursions

def handshake(a, b, now):
    """Real challenges, no trusted shortcut: a's keepalives make b challenge a."""
    wire = Wire(a, b, trusted=False)
    wire.tick(a, now)
    return wire


def test_a_restarted_receiver_refuses_datagrams_captured_before_even_from_a_clock_3s_ahead():
    ahead = 3.0
    client = make_node("16.1", gateway="1.1", trust_test_session=False)
    server = make_node("1.1", trust_test_session=False)
    wire = handshake(client, server, T0 + ahead)
    captured = [d for d, _ in client.from_tun([tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"%d" % i)
                                                for i in range(10)], T0 + ahead).sends]
    for d in captured:
        assert server.from_udp([(d, addr("16.1"))], T0).tun
    # the server restarts one second later: no replay state survives
    restarted = make_node("1.1", now=T0 + 1, trust_test_session=False)
    for d in captured:
        assert restarted.from_udp([(d, ("198.51.100.66", 4444))], T0 + 1).tun == []
    assert restarted.table.get(pid("16.1")).drops[DropReason.UNVERIFIED] == 10
    assert not any(a == ("198.51.100.66", 4444) and p.proven
                   for a, p in restarted.table.get(pid("16.1")).paths.items())
    # the client's next keepalive proves its session; the captured ones stay refused
    wire = handshake(client, restarted, T0 + 1 + ahead)
    for d in captured:
        assert restarted.from_udp([(d, addr("16.1"))], T0 + 1.5).tun == []
    assert restarted.table.get(pid("16.1")).drops[DropReason.REPLAY] == 10
    fresh = wire.originate(client, [tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"new")], T0 + 1.6 + ahead)
    assert len(fresh.tun["1.1"]) == 1


def test_a_shared_clock_excursion_locks_nobody_out():
    day = 86_400
    client = make_node("16.1", gateway="1.1", trust_test_session=False, now=START)
    server = make_node("1.1", trust_test_session=False, now=START)
    up = [tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"up")]
    down = [tcp(tun_ip("1.1"), tun_ip("16.1"), data=b"down")]
    # both clocks a day ahead (a bad time source) ...
    wire = handshake(client, server, T0 + day)
    assert len(wire.originate(client, up, T0 + day + 0.2).tun["1.1"]) == 1
    assert len(wire.originate(server, down, T0 + day + 0.3).tun["16.1"]) == 1
    for t in range(0, 30, 5):
        wire.tick(client, T0 + day + t)
        wire.tick(server, T0 + day + t)
    # ... then both back to the right time: each side's first datagram in
    # its new session is challenged, and from the answer on the pair talks
    old = (client.session, server.session)
    before = {n: n.table.get(pid(o)).drops[DropReason.UNVERIFIED] for n, o in ((server, "16.1"), (client, "1.1"))}
    wire.originate(client, up, T0 + 0.2)
    wire.originate(server, down, T0 + 0.3)
    assert (client.session, server.session) != old     # both noticed their clocks step back
    assert len(wire.originate(client, up, T0 + 0.4).tun["1.1"]) == 1
    assert len(wire.originate(server, down, T0 + 0.5).tun["16.1"]) == 1
    for node, other in ((server, "16.1"), (client, "1.1")):
        drops = node.table.get(pid(other)).drops
        assert drops[DropReason.REPLAY] == 0 and drops[DropReason.UNVERIFIED] - before[node] <= 1, dict(drops)


def test_datagrams_of_another_wire_version_are_counted_and_noticed_once():
    _, server = vnet_pair()
    other = bytearray(make_datagram("16.1", "1.1", b"x" * 40))
    header, mask = peek(GROUP_KEY, bytes(other))
    clear = (int.from_bytes(other[:26], "big") ^ (mask >> 48)).to_bytes(26, "big")
    clear = clear[:2] + bytes(((WIRE_VERSION - 1) << 4 | KIND_DATA,)) + clear[3:]
    other[:26] = (int.from_bytes(clear, "big") ^ (mask >> 48)).to_bytes(26, "big")
    for i in range(100):
        server.from_udp([(bytes(other), addr("16.1"))], T0 + i * 0.01)
    assert server.global_drops[DropReason.WRONG_VERSION] == 100
    lines = [n for n in server.notices if "wire version" in n]
    assert len(lines) == 1 and f"version {WIRE_VERSION - 1}" in lines[0]


def test_an_unverified_session_is_challenged_at_a_bounded_rate():
    _, server = vnet_pair(trust_test_session=False)
    sends = []
    for i in range(200):
        d = make_datagram("16.1", "1.1", b"x" * 40, seq=i, session=bytes([i % 250]) * 8)
        sends.extend(server.from_udp([(d, ("203.0.113.50", 7000))], T0 + i * 0.001).sends)
    # 0.2 s of replays from a forged address: at most one challenge per 0.25 s
    assert len([s for s in sends if header_of(s[0]).kind == KIND_CHALLENGE]) <= 2
    assert server.table.get(pid("16.1")).drops[DropReason.UNVERIFIED] == 200
    assert data_only(sends) == []


def test_a_replayed_challenge_is_answered_once_and_never_amplified():
    """A captured challenge replayed from a forged address gets no answer
    (each challenge is answered once), and even a fresh one gets an answer
    no bigger than itself where it came from, with padding on."""
    client = make_node("16.1", gateway="1.1", trust_test_session=False, padding=400)
    server = make_node("1.1", trust_test_session=False, padding=400)
    # the server challenges the client's first keepalive
    challenge = [d for d, a in client.tick(T0).sends]
    out = server.from_udp([(challenge[0], addr("16.1"))], T0)
    challenges = [(d, a) for d, a in out.sends if header_of(d).kind == KIND_CHALLENGE]
    assert challenges and all(len(d) < 100 for d, _ in challenges)    # never padded
    victim = ("203.0.113.77", 9)
    first = client.from_udp([(challenges[0][0], victim)], T0)
    answers = [(d, a) for d, a in first.sends if header_of(d).kind == 4]
    assert answers and all(len(d) <= len(challenges[0][0]) for d, _ in answers)
    sent = 0
    for i in range(50):                 # the same challenge, replayed
        sent += sum(len(d) for d, a in client.from_udp([(challenges[0][0], victim)], T0 + 0.01 * i).sends)
    assert sent == 0
    assert client.table.get(pid("1.1")).drops[DropReason.DUPLICATE] == 50


def test_answers_beyond_the_rate_limit_are_counted():
    from alpaca.protocol.constants import RESPONSE_LIMIT
    server = make_node("1.1")
    peer = server.table.get(pid("16.1"))
    for i in range(RESPONSE_LIMIT + 5):
        d = make_datagram("16.1", "1.1", os.urandom(16), kind=KIND_CHALLENGE, seq=i)
        server.from_udp([(d, addr("16.1"))], T0 + 0.001 * i)
    assert peer.drops[DropReason.RATE_LIMITED] == 5


def test_the_predicted_next_shard_is_still_authenticated_and_replay_checked():
    """The receive fast path (a train of shards: the next one's header is
    predicted) skips only the parsing: a forged shard that carries exactly
    the predicted header is refused by its MAC, a copy of the shard just
    filed by the window, and the genuine train still completes once."""
    client, server = make_node("16.1", gateway="1.1", vnet=True), make_node("1.1", vnet=True)
    wire = Wire(client, server)
    wire.tick(client, T0)                                   # the client's path at the server is proven
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    frm = addr("16.1")
    out = server.from_udp([(d, frm) for d in shards[:5]], T0 + 0.1)
    assert server._next[frm].index == 5
    forged = bytearray(shards[5])
    forged[MASK_SIZE + 100] ^= 1                            # same sample, same predicted header
    forged = bytes(forged)
    out = server.from_udp([(forged, frm), (shards[4], frm)], T0 + 0.1)
    assert server.global_drops[DropReason.AUTH_FAILURE] == 1
    assert server.table.get(pid("16.1")).drops[DropReason.DUPLICATE] == 1
    out = server.from_udp([(d, frm) for d in shards[5:]] + [(shards[-1], frm)], T0 + 0.1)
    assert out.tun == [packet]
    assert server.table.get(pid("16.1")).drops[DropReason.DUPLICATE] == 2


def spoiled_train(shards: list[bytes], frm: tuple) -> tuple[list, bytes]:
    """One receive batch of a message's shards from frm with, in the middle,
    a forgery of shard 7 (same sample, so the same predicted header), a copy
    of shard 5 and a stranger's datagram. Returns it and the forgery."""
    forged = bytearray(shards[7])
    forged[MASK_SIZE + 100] ^= 1
    middle = [(bytes(forged), frm), (shards[5], frm), (os.urandom(200), ("198.51.100.9", 4000))]
    return [(d, frm) for d in shards[:7]] + middle + [(d, frm) for d in shards[7:]], bytes(forged)


def test_a_train_in_one_batch_checks_every_shard(monkeypatch):
    """A GRO train is taken in one go (inbound._train), but shard by shard:
    a forged shard, a copy and another sender's datagram in the middle of
    one receive batch are each refused or handled on their own, and the
    train's genuine shards around them are still taken as predicted."""
    client, server = make_node("16.1", gateway="1.1", vnet=True), make_node("1.1", vnet=True)
    Wire(client, server).tick(client, T0)
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    frm = addr("16.1")
    batch, forged = spoiled_train(shards, frm)
    full_path = full_path_of(server, monkeypatch)
    out = server.from_udp(batch, T0 + 0.1)
    assert out.tun == [packet]
    assert server.global_drops[DropReason.AUTH_FAILURE] == 1
    assert server.table.get(pid("16.1")).drops[DropReason.DUPLICATE] == 1
    # the full path saw the first shard, the forgery, the copy and the stranger's datagram: nothing else
    assert len(full_path) == 4 and full_path[0] == shards[0] and full_path[1] == forged
    assert frm not in server._next or server._next[frm].done


def test_a_relayed_train_checks_every_shard(monkeypatch):
    """A forwarder relays the shards of a GRO train in one go (relay._RelayNext),
    but shard by shard: a forged shard, a copy and a stranger's datagram in
    the middle of one batch are each refused or handled on their own, every
    genuine shard is relayed exactly once, and the server decodes the message."""
    client = make_node("16.1", gateway="1.1", forwarders=("1.2",), vnet=True)
    forwarder = make_node("1.2", mode="forwarder")
    server = make_node("1.1", vnet=True)
    wire = Wire(client, forwarder, server)
    wire.tick(client, T0)                                   # the client's path at the forwarder is proven
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    frm = addr("16.1")
    batch, forged = spoiled_train(shards, frm)
    full_path = full_path_of(forwarder, monkeypatch)
    source = forwarder.table.get(pid("16.1"))
    before = source.relayed_packets                         # (the keepalives it relayed)
    out = forwarder.from_udp(batch, T0 + 0.1)
    assert source.relayed_packets - before == len(shards) == len(out.sends)
    assert forwarder.global_drops[DropReason.AUTH_FAILURE] == 1 and source.drops[DropReason.DUPLICATE] == 1
    # the full path saw the first shard, the forgery, the copy and the stranger's datagram: nothing else
    assert len(full_path) == 4 and full_path[0] == shards[0] and full_path[1] == forged
    relayed = [d for d, _ in out.sends]
    assert all(header_of(d).path and header_of(d).ttl == header_of(shards[0]).ttl - 1 for d in relayed)
    assert [d[MASK_SIZE:] for d in relayed] == [d[MASK_SIZE:] for d in shards]     # each once, unchanged
    assert wire.run(out.sends, "1.2", T0 + 0.1).tun["1.1"] == [packet]


def test_a_prediction_skips_lost_shards_only_after_the_mac(monkeypatch):
    """With shards lost on the way, the prediction moves on to the one that
    came (same header, seq and index j further), but only once its MAC
    verifies: a forged shard j ahead is refused and moves nothing. After
    the message decodes, its late parity is still predicted."""
    client = make_node("16.1", gateway="1.1", vnet=True, fec=(10, 5))
    server = make_node("1.1", vnet=True)
    wire = Wire(client, server)
    wire.tick(client, T0)
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    frm = addr("16.1")
    full_path = full_path_of(server, monkeypatch)
    server.from_udp([(d, frm) for d in shards[:3]], T0 + 0.1)
    assert full_path == [shards[0]] and server._next[frm].index == 3
    forged = bytearray(shards[6])                           # 3, 4 and 5 "lost"
    forged[MASK_SIZE + 100] ^= 1
    server.from_udp([(bytes(forged), frm)], T0 + 0.1)
    assert server.global_drops[DropReason.AUTH_FAILURE] == 1 and server._next[frm].index == 3
    out = server.from_udp([(d, frm) for d in shards[6:]], T0 + 0.1)
    assert out.tun == [packet]
    assert full_path == [shards[0], bytes(forged)]          # every genuine shard after 0 was predicted
    assert server.table.get(pid("16.1")).drops.get(DropReason.BAD_SHARD, 0) == 0


def test_the_parity_of_a_one_shard_message_is_predicted_and_still_authenticated(monkeypatch):
    """A FEC batch of one small packet is one data shard and its parity: the
    data shard completes the message, and its parity is then predicted as
    surplus. A forged parity shard is still refused by its MAC, a copy is
    still a duplicate, and nothing is delivered twice."""
    client = make_node("16.1", gateway="1.1", fec=(1, 4))
    server = make_node("1.1")
    Wire(client, server).tick(client, T0)
    packet = tcp(tun_ip("16.1"), "8.8.8.8")
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    assert len(shards) == 5
    frm = addr("16.1")
    full_path = full_path_of(server, monkeypatch)
    assert server.from_udp([(shards[0], frm)], T0 + 0.1).tun == [packet]
    assert server._next[frm].done and server._next[frm].index == 1
    forged = bytearray(shards[1])
    forged[MASK_SIZE + 3] ^= 1
    assert server.from_udp([(bytes(forged), frm)], T0 + 0.1).tun == []
    assert server.global_drops[DropReason.AUTH_FAILURE] == 1 and server._next[frm].index == 1
    out = server.from_udp([(d, frm) for d in shards[1:]] + [(shards[2], frm)], T0 + 0.1)
    assert out.tun == []
    assert full_path == [shards[0], bytes(forged), shards[2]]   # the late copy of 2: no longer predicted
    peer = server.table.get(pid("16.1"))
    assert peer.drops[DropReason.DUPLICATE] == 1 and peer.drops.get(DropReason.BAD_SHARD, 0) == 0


def macs_checked(monkeypatch) -> list:
    """The shard MACs the receive paths compute from now on (all of them
    through wire.shard_authentic)."""
    from alpaca.protocol import wire
    seen = []
    real = wire.mac
    monkeypatch.setattr(wire, "mac", lambda key, data: (seen.append(data), real(key, data))[1])
    return seen


def aead_opens(monkeypatch) -> list:
    """The messages the receive paths open from now on (a whole train's, or a decoded one's)."""
    from alpaca.protocol import inbound
    seen = []
    real = inbound.open_message
    monkeypatch.setattr(inbound, "open_message", lambda *a: (seen.append(a), real(*a))[1])
    return seen


def test_a_train_that_ends_its_message_is_authenticated_by_its_aead(monkeypatch):
    """The shards after the first, in one receive batch up to the message's
    last data shard, are authenticated by the message's AEAD instead of a
    MAC each (inbound._whole). It is the same check: every shard of it is
    then in the replay window (a copy is a duplicate), the loss tally has
    each, and the message is delivered once."""
    client, server = make_node("16.1", gateway="1.1", vnet=True), make_node("1.1", vnet=True)
    Wire(client, server).tick(client, T0)
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    frm = addr("16.1")
    macs = macs_checked(monkeypatch)
    counted = []
    monkeypatch.setattr(server.reassembly, "count", lambda *a: counted.append(a))
    out = server.from_udp([(d, frm) for d in shards], T0 + 0.1)
    assert out.tun == [packet]
    assert len(macs) == 1                                   # shard 0's, on the full path
    assert counted == [(pid("16.1"), len(shards), len(shards))]     # (sent, arrived) for the loss report
    peer = server.table.get(pid("16.1"))
    for d in shards[1:]:
        assert server.from_udp([(d, frm)], T0 + 0.1).tun == []
    assert peer.drops[DropReason.DUPLICATE] == len(shards) - 1 and not server.global_drops


def test_a_forged_shard_in_a_whole_train_fails_the_aead_and_changes_nothing(monkeypatch):
    """A train that looks like the rest of a message (right sizes, its last
    shard's header the predicted one) but carries a forged chunk fails the
    message's AEAD. Nothing of it was recorded before that check: its shards
    are then checked one by one as always (each forgery is refused by its
    MAC, the genuine ones filed), and the genuine shards that come later
    complete the message, delivered once. One attempt a batch, however many
    forgeries: each would otherwise cost an AEAD of the rest of the message."""
    client, server = make_node("16.1", gateway="1.1", vnet=True), make_node("1.1", vnet=True)
    Wire(client, server).tick(client, T0)
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    frm = addr("16.1")
    forged = {}
    for x in range(10, 30, 2):
        forged[x] = bytearray(shards[x])
        forged[x][MASK_SIZE + 100] ^= 1                     # same sample, same header
    train = [bytes(forged[x]) if x in forged else d for x, d in enumerate(shards)]
    opened = aead_opens(monkeypatch)
    out = server.from_udp([(d, frm) for d in train], T0 + 0.1)
    assert out.tun == [] and len(opened) == 1               # the whole-train attempt, refused
    peer = server.table.get(pid("16.1"))
    assert server.global_drops[DropReason.AUTH_FAILURE] == len(forged) and not peer.drops
    assert sorted(next(iter(server.reassembly.slots.values())).chunks) == [x for x in range(len(shards))
                                                                          if x not in forged]
    assert server.from_udp([(shards[x], frm) for x in forged], T0 + 0.1).tun == [packet]
    assert server.from_udp([(shards[10], frm)], T0 + 0.1).tun == []
    assert peer.drops[DropReason.DUPLICATE] == 1


def test_a_train_with_a_lost_shard_costs_no_aead_attempt(monkeypatch):
    """When a shard of the train was lost on the way, the datagram where the
    last data shard should be is another (its header, unmasked, is not the
    predicted one): no AEAD is spent on the train, its shards are taken one
    by one, and the parity decodes the message."""
    client = make_node("16.1", gateway="1.1", vnet=True, fec=(10, 2))
    server = make_node("1.1", vnet=True)
    Wire(client, server).tick(client, T0)
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    frm = addr("16.1")
    opened = aead_opens(monkeypatch)
    out = server.from_udp([(d, frm) for d in shards[:10] + shards[11:]], T0 + 0.1)
    assert out.tun == [packet] and len(opened) == 1         # only the decoding, after each MAC
    assert not server.global_drops and not server.table.get(pid("16.1")).drops


@pytest.mark.parametrize("filed", ["10", "half", "half + 1", "all but 3"])
def test_a_whole_train_is_tried_only_when_it_brings_half_its_message(filed, monkeypatch):
    """The message's AEAD covers the shards filed before the train too: a
    train that brings fewer shards than were filed is taken shard by shard,
    so an attempt on forgeries never costs more than twice what they bring."""
    client, server = make_node("16.1", gateway="1.1", vnet=True), make_node("1.1", vnet=True)
    Wire(client, server).tick(client, T0)
    packet = super_packet()
    shards = [d for d, _ in client.from_tun([packet], T0 + 0.1).sends]
    k = len(shards)                                         # (no parity)
    filed = {"10": 10, "half": k // 2, "half + 1": k // 2 + 1, "all but 3": k - 3}[filed]
    frm = addr("16.1")
    server.from_udp([(d, frm) for d in shards[:filed]], T0 + 0.1)
    macs = macs_checked(monkeypatch)
    assert server.from_udp([(d, frm) for d in shards[filed:]], T0 + 0.1).tun == [packet]
    assert len(macs) == (0 if k - filed >= filed else k - filed)
