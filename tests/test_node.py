"""Tier 1: the forwarding and replay rules (docs/protocol.md §5-6), driving Node objects directly.

No sockets and no clock: each Node has a fake address (192.0.2.X:1040) and
protocol_helpers.Wire hands datagrams from one to the next. The usual cast:
servers 1.1 (gateway), 1.2 and 1.3 with static addresses; clients 16.1 and
16.2 behind NAT (no static address, learned from their datagrams).
"""

from __future__ import annotations

import collections
import copy
import ipaddress
import itertools
import random
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import (
    ACK,
    EVERYONE,
    GROUP,
    INTERNET,
    PSH,
    SERVERS,
    SYN,
    T0,
    Wire,
    addr,
    data_only,
    entries,
    header_of,
    make_datagram,
    make_node,
    name,
    pair_key,
    peer_state,
    pid,
    psk,
    relayed,
    tcp,
    total_drops,
    trust,
    tun_ip,
    udp,
    udp6,
)

from alpaca.protocol.constants import (
    DEFAULT_TTL,
    HEADER_SIZE,
    HELD_PACKETS,
    UNREACHABLE_BURST,
    UNREACHABLE_PER_SECOND,
    KEEPALIVE_INTERVAL,
    KIND_CHALLENGE,
    KIND_DATA,
    KIND_KEEPALIVE,
    KIND_RESPONSE,
    MAX_TTL,
    OVERHEAD,
    PATH_LIFETIME,
    PEER_LIFETIME,
    REPLAY_WINDOW,
    SYN_DNS_COPY_DELAY,
)
from alpaca.protocol.crypto import derive_group_key
from alpaca.protocol.wire import MUTABLE_BYTES, Header, seal
from alpaca.protocol.drops import DropReason
from alpaca.protocol.inner import checksum

UP = udp(tun_ip("16.1"), INTERNET)                  # a client's packet to the internet
DOWN = udp(INTERNET, tun_ip("16.1"), 443, 40000)    # the answer, at the gateway


def client(me="16.1", forwarders=(), ids=SERVERS, **kw):
    return make_node(me, ids=ids, gateway="1.1", forwarders=forwarders, **kw)


def drops(node, peer: str) -> dict:
    return {r: n for r, n in node.table.get(pid(peer)).drops.items() if n}


def paths(node, peer: str) -> dict:
    return {a: ("static" if p.static else "relayed" if p.relayed else "direct")
            for a, p in node.table.get(pid(peer)).paths.items()}


def answer_copies(deliveries, at: str, peer: str) -> int:
    """Copies of `peer`'s answers to `at`'s challenges that reached `at`
    after a first copy of the same answer. A peer answers on every path it
    has to the challenger (docs/protocol.md §5); only the first copy finds
    its nonce outstanding, the others are counted `replay`."""
    copies = collections.Counter()
    for delivery in deliveries:
        for _, to, dg in delivery.hops:
            h = header_of(dg)
            if to == addr(at) and h.kind == KIND_RESPONSE and (h.src, h.dst) == (pid(peer), pid(at)):
                copies[dg[MUTABLE_BYTES:]] += 1
    return sum(n - 1 for n in copies.values())


def data_drops(node, peer: str, *deliveries) -> dict:
    """drops(node, peer) without the `duplicate` drops of surplus answer
    copies (answer_copies: an answer goes out on every path, the first copy
    uses its nonce up): exactly those, no more, are taken out."""
    found = drops(node, peer)
    surplus = answer_copies(deliveries, name(node), peer)
    if surplus:
        assert found.get(DropReason.DUPLICATE, 0) >= surplus, (found, surplus)
        found[DropReason.DUPLICATE] -= surplus
        if not found[DropReason.DUPLICATE]:
            del found[DropReason.DUPLICATE]
    return found


class _Deaf:
    """A node that hears nothing from `cut`: the link between them is down."""

    def __init__(self, node, cut):
        self.node, self.cut = node, cut

    def from_udp(self, datagrams, now):
        return self.node.from_udp([(d, a) for d, a in datagrams if a != self.cut], now)

    def __getattr__(self, attr):
        return getattr(self.node, attr)


def run_with_link_down(wire: Wire, sends, sender: str, now: float, a: str, b: str):
    """wire.run with everything between a and b lost, both ways (challenges
    and answers too); the lost hops are moved from `hops` to `lost`."""
    saved = dict(wire.nodes)
    try:
        wire.nodes[addr(a)] = _Deaf(saved[addr(a)], addr(b))
        wire.nodes[addr(b)] = _Deaf(saved[addr(b)], addr(a))
        got = wire.run(sends, sender, now)
    finally:
        wire.nodes = saved
    link = {(addr(a), addr(b)), (addr(b), addr(a))}
    got.lost += [(to, dg) for frm, to, dg in got.hops if (frm, to) in link]
    got.hops = [(frm, to, dg) for frm, to, dg in got.hops if (frm, to) not in link]
    return got


# ---------------------------------------------------------------- outbound: dst_id and targets

OUTBOUND = {
    # forwarders, inner destination, expected dst_id, expected targets
    "internet, no forwarders: straight to the gateway": ((), INTERNET, "1.1", ["1.1"]),
    "tunnel address of another server: its own dst_id": ((), tun_ip("1.2"), "1.2", ["1.2"]),
    "tunnel address of the gateway": ((), tun_ip("1.1"), "1.1", ["1.1"]),
    "internet, forwarders 1.1 and 1.2: both, dst_id gateway": (("1.1", "1.2"), INTERNET, "1.1", ["1.1", "1.2"]),
    "server 1.2 via forwarders: dst_id kept": (("1.1", "1.2"), tun_ip("1.2"), "1.2", ["1.1", "1.2"]),
    "one forwarder that is not the gateway": (("1.2",), INTERNET, "1.1", ["1.2"]),
    "forwarder 1.3 carries traffic for 1.1": (("1.3",), tun_ip("1.1"), "1.1", ["1.3"]),
}


@pytest.mark.parametrize("forwarders, dst_ip, dst_id, targets", OUTBOUND.values(), ids=OUTBOUND.keys())
def test_outbound_dst_id_and_targets(forwarders, dst_ip, dst_id, targets):
    c = client(forwarders=forwarders)
    packet = udp(tun_ip("16.1"), dst_ip)
    out = c.from_tun([packet], T0)
    assert out.tun == []
    assert [a for _, a in out.sends] == [addr(t) for t in targets]
    assert len({d for d, _ in out.sends}) == 1            # the same datagram on every target
    h = header_of(out.sends[0][0])
    assert (h.src, h.dst, h.kind, h.ttl, h.path) == (pid("16.1"), pid(dst_id), KIND_DATA, DEFAULT_TTL, 0)
    assert c.table.get(pid(dst_id)).tx_packets == 1


def test_gateway_receives_and_writes_to_tun():
    c, s1 = client(), make_node("1.1")
    got = Wire(c, s1).originate(c, [UP], T0)
    assert got.tun["1.1"] == [UP]
    assert paths(s1, "16.1") == {addr("16.1"): "direct"}
    assert s1.table.get(pid("16.1")).up and s1.table.get(pid("16.1")).rx_packets == 1


def test_own_datagram_reflected_back_is_refused():
    """A datagram we sealed that comes back (reflected, or a loop) is never
    taken or relayed again: src == me is refused before the key lookup."""
    c = client()
    datagram = c.from_tun([UP], T0).sends[0][0]
    out = c.from_udp([(datagram, addr("1.1"))], T0 + 0.1)
    assert out.sends == [] and out.tun == []
    assert c.global_drops[DropReason.UNKNOWN_PEER] == 1


def test_not_routable_from_tun():
    s1 = make_node("1.1")                                 # a server without gateway
    for packet in [b"", b"\x00" * 40, b"\x45" + b"\x00" * 10, udp(tun_ip("1.1"), INTERNET),
                   udp(tun_ip("1.1"), tun_ip("77.7"))]:
        before = total_drops(s1)
        assert s1.from_tun([packet], T0).sends == []
        assert s1.global_drops[DropReason.NOT_ROUTABLE] == before + 1 == total_drops(s1)


# ---------------------------------------------------------------- upward through forwarders

@pytest.mark.parametrize("relayed_first", [False, True], ids=["direct first", "relayed first"])
def test_forwarders_carry_upward_and_the_gateway_delivers_once(relayed_first):
    c, s1, s2 = client(forwarders=("1.1", "1.2")), make_node("1.1"), make_node("1.2")
    wire = Wire(c, s1, s2)
    sends = c.from_tun([UP], T0).sends
    assert [a for _, a in sends] == [addr("1.1"), addr("1.2")]
    datagram = sends[0][0]
    order = [sends[1], sends[0]] if relayed_first else sends
    runs = [wire.run([s], "16.1", T0) for s in order]
    tun = [p for r in runs for p in r.tun["1.1"]]
    assert tun == [UP]                                     # exactly once
    # (the challenge of the new path is answered on both of 16.1's paths)
    assert data_drops(s1, "16.1", *runs) == {DropReason.DUPLICATE: 1}
    # 1.2 relayed it to 1.1: TTL-1, path byte 1, dst_id unchanged, the rest bit-identical
    carried = [dg for r in runs for frm, to, dg in r.hops if frm == addr("1.2")]
    relay = [dg for dg in carried if header_of(dg).kind == KIND_DATA]
    assert len(relay) == 1
    h = header_of(relay[0])
    assert (h.ttl, h.path, h.src, h.dst) == (DEFAULT_TTL - 1, 1, pid("16.1"), pid("1.1"))
    assert relay[0][2:] == datagram[2:]
    # everything else 1.2 carried is the challenge exchange (16.1's answer, direct first)
    assert all(header_of(dg).kind in (KIND_CHALLENGE, KIND_RESPONSE) for dg in carried if dg not in relay)
    assert s2.table.get(pid("16.1")).relayed_packets == len([dg for dg in carried if header_of(dg).src == pid("16.1")])
    assert s2.from_udp([(datagram, addr("16.1"))], T0).sends == []      # 1.2 relays once too
    assert drops(s2, "16.1") == {DropReason.DUPLICATE: 1}
    # what 1.1 learned depends on which copy came first (only first copies teach)
    assert paths(s1, "16.1") == ({addr("1.2"): "relayed"} if relayed_first else {addr("16.1"): "direct"})


# ---------------------------------------------------------------- downward

def downward_setup():
    """1.1 has learned 16.1 directly (at T0) and through forwarder 1.2 (at T0+5);
    1.2 learned 16.1 from its keepalive (at T0). 1.1 itself is configured with
    forwarder 1.3, which downward traffic must ignore."""
    c = client(forwarders=("1.1", "1.2"))
    s1, s2, s3 = make_node("1.1", forwarders=("1.3",)), make_node("1.2"), make_node("1.3")
    wire = Wire(c, s1, s2, s3)
    wire.log = [wire.tick(c, T0)]                          # keepalives; the direct copy arrives first
    assert paths(s2, "16.1") == {addr("16.1"): "direct"}
    # the direct link is down at T0+5: the direct copy is lost, and so are
    # 1.1's challenge of the new relayed path and 16.1's answer on the direct link
    second = c.from_tun([UP], T0 + 5).sends
    wire.log.append(run_with_link_down(wire, [second[1]], "16.1", T0 + 5, "16.1", "1.1"))
    assert wire.log[-1].tun["1.1"] == [UP]
    assert paths(s1, "16.1") == {addr("16.1"): "direct", addr("1.2"): "relayed"}
    assert [p.last_rx for p in s1.table.get(pid("16.1")).paths.values()] == [T0, T0 + 5]
    # both proven: each answered a challenge sent on it (through 1.2 for the relayed one)
    assert [p.proven for p in s1.table.get(pid("16.1")).paths.values()] == [True, True]
    return wire, c, s1, s2, s3


def test_downward_uses_every_live_path_never_the_forwarders():
    wire, c, s1, _s2, _s3 = downward_setup()
    out = s1.from_tun([DOWN], T0 + 6)
    assert sorted(a for _, a in out.sends) == sorted([addr("16.1"), addr("1.2")])
    assert addr("1.3") not in [a for _, a in out.sends]
    h = header_of(out.sends[0][0])
    assert (h.src, h.dst, h.path) == (pid("1.1"), pid("16.1"), 0)
    got = wire.run(out.sends, "1.1", T0 + 6)
    assert got.tun["16.1"] == [DOWN]
    assert got.targets("1.2") == [addr("16.1")]            # 1.2 carried its copy on to the client
    assert drops(c, "1.1") == {DropReason.DUPLICATE: 1}


def test_duplicates_keep_a_losing_path_alive_but_never_add_one():
    wire, c, s1, _s2, _s3 = downward_setup()
    # from now on the direct copy always wins; 1.2's copies still arrive, later
    for t in range(6, 30):
        wire.run(c.from_tun([UP], T0 + t).sends, "16.1", T0 + t)
    out = s1.from_tun([DOWN], T0 + 30)
    assert sorted(a for _, a in out.sends) == sorted([addr("16.1"), addr("1.2")])
    # a copy from an address that is no path of the peer teaches nothing
    datagram = c.from_tun([UP], T0 + 30).sends[0][0]
    assert s1.from_udp([(datagram, addr("16.1"))], T0 + 30).tun == [UP]
    before = paths(s1, "16.1")
    assert s1.from_udp([(datagram, ("203.0.113.66", 6666))], T0 + 30).tun == []
    assert paths(s1, "16.1") == before


def test_a_silent_path_is_not_used():
    _wire, _c, s1, _s2, _s3 = downward_setup()
    # the direct path was last used at T0, the relayed one at T0+5
    out = s1.from_tun([DOWN], T0 + PATH_LIFETIME + 0.5)
    assert [a for _, a in out.sends] == [addr("1.2")]
    out = s1.from_tun([DOWN], T0 + 5 + PATH_LIFETIME + 0.5)
    assert out.sends == []
    assert drops(s1, "16.1").get(DropReason.NO_PATH) == 1


NAT = ("198.51.100.161", 1040)        # the client's static address in 1.1's secrets.txt
DOWNWARD_LIFETIME = {
    # static address configured?, inactive_downward_static, client last heard (s ago), expected targets
    "learned path live": (False, False, 5, [addr("16.1")]),
    "learned path dead, no static": (False, False, 30, None),
    "static and learned, both live": (True, False, 5, [NAT, addr("16.1")]),
    "static while heard within PEER_LIFETIME": (True, False, 30, [NAT]),
    "static, silent > PEER_LIFETIME": (True, False, PEER_LIFETIME + 1, None),
    "static, silent, inactive_downward_static": (True, True, PEER_LIFETIME + 1, [NAT]),
    "static, never heard": (True, False, None, None),
    "static, never heard, inactive_downward_static": (True, True, None, [NAT]),
    "no static, silent, inactive_downward_static": (False, True, PEER_LIFETIME + 1, None),
}


@pytest.mark.parametrize("static, keep, silent_for, targets", DOWNWARD_LIFETIME.values(),
                         ids=DOWNWARD_LIFETIME.keys())
def test_downward_and_peer_lifetime(static, keep, silent_for, targets):
    where = {"1.1": addr("1.1"), **({"16.1": NAT} if static else {})}
    s1 = make_node("1.1", ids=("1.1", "16.1"), static=where, inactive_downward_static=keep)
    heard = T0
    if silent_for is not None:
        c = client()
        Wire(c, s1).originate(c, [UP], heard)
    now = heard + (silent_for or 0)
    s1.tick(now)                                           # prunes, marks the peer down
    out = s1.from_tun([DOWN], now)
    if targets is None:
        assert out.sends == []
        assert drops(s1, "16.1") == {DropReason.NO_PATH: 1}
    else:
        assert [a for _, a in out.sends] == targets
        assert drops(s1, "16.1") == {}


# ---------------------------------------------------------------- relays: split horizon, TTL

def test_split_horizon():
    """1.2 knows 16.1 directly and through 1.1; a datagram for 16.1 arriving
    from 1.1 goes on only on the direct path, never back to 1.1."""
    s2 = make_node("1.2")
    s2.from_udp([(make_datagram("16.1", "1.2", UP, seq=0), addr("16.1"))], T0)
    s2.from_udp([(relayed(make_datagram("16.1", "1.2", UP, seq=1)), addr("1.1"))], T0)
    assert paths(s2, "16.1") == {addr("16.1"): "direct", addr("1.1"): "relayed"}
    out = s2.from_udp([(make_datagram("1.1", "16.1", DOWN, session=b"s" * 8), addr("1.1"))], T0)
    assert [a for _, a in out.sends] == [addr("16.1")]
    # the only path is where it came from: nothing is sent back, it is counted
    out = s2.from_udp([(make_datagram("16.1", "1.1", UP, seq=2), addr("1.1"))], T0)
    assert out.sends == [] and out.tun == []
    s2b = make_node("1.2", ids=("1.2", "1.1", "16.1"), static={"1.2": addr("1.2")})
    s2b.from_udp([(relayed(make_datagram("1.1", "1.2", b"", kind=KIND_KEEPALIVE)), addr("16.1"))], T0)
    assert paths(s2b, "1.1") == {addr("16.1"): "relayed"}
    out = s2b.from_udp([(make_datagram("16.1", "1.1", UP, seq=3), addr("16.1"))], T0)
    assert out.sends == []
    assert drops(s2b, "16.1") == {DropReason.NO_PATH: 1}


TTL_CASES = {
    # TTL on arrival at relay 1.2, expected TTL of the relayed copy (None: dropped)
    "default": (DEFAULT_TTL, DEFAULT_TTL - 1),
    "two hops left": (2, 1),
    "last hop used up": (1, None),
    "already zero": (0, None),
    # a relay never sends a datagram on with more than MAX_TTL - 1 hops left
    "MAX_TTL": (MAX_TTL, MAX_TTL - 1),
    "above MAX_TTL": (MAX_TTL + 1, MAX_TTL - 1),
    "max": (255, MAX_TTL - 1),
}


@pytest.mark.parametrize("ttl_in, ttl_out", TTL_CASES.values(), ids=TTL_CASES.keys())
def test_ttl_at_a_relay(ttl_in, ttl_out):
    s2 = make_node("1.2")
    datagram = make_datagram("16.1", "1.1", UP, ttl=ttl_in)
    out = s2.from_udp([(datagram, addr("16.1"))], T0)
    if ttl_out is None:
        assert out.sends == []
        assert drops(s2, "16.1") == {DropReason.TTL: 1}
    else:
        assert [a for _, a in out.sends] == [addr("1.1")]
        assert header_of(out.sends[0][0]).ttl == ttl_out
        assert drops(s2, "16.1") == {}


@pytest.mark.parametrize("ttl", [0, 1])
def test_ttl_does_not_matter_at_the_destination(ttl):
    s1 = make_node("1.1")
    out = s1.from_udp([(make_datagram("16.1", "1.1", UP, ttl=ttl), addr("16.1"))], T0)
    assert out.tun == [UP]


def test_a_relay_loop_ends():
    """Three relays misconfigured in a ring (each forwards to the next): the
    datagram dies at the first relay it comes back to (its dedup), or at TTL 0."""
    ring = ["1.2", "1.3", "16.2"]
    nodes = [make_node(me, forwarders=(ring[(i + 1) % 3],), static=EVERYONE) for i, me in enumerate(ring)]
    got = Wire(*nodes).run([(make_datagram("16.1", "1.1", UP), addr("1.2"))], "16.1", T0)
    assert len(got.hops) == 4                               # 16.1 -> 1.2 -> 1.3 -> 16.2 -> 1.2
    assert sum(sum(n.table.get(pid("16.1")).drops.values()) for n in nodes) == 1
    assert drops(nodes[0], "16.1") == {DropReason.DUPLICATE: 1}
    # with a TTL of 3 the same ring stops one hop earlier
    nodes = [make_node(me, forwarders=(ring[(i + 1) % 3],), static=EVERYONE) for i, me in enumerate(ring)]
    got = Wire(*nodes).run([(make_datagram("16.1", "1.1", UP, ttl=3), addr("1.2"))], "16.1", T0)
    assert len(got.hops) == 3
    assert drops(nodes[2], "16.1") == {DropReason.TTL: 1}


# ---------------------------------------------------------------- loop guard

GATEWAY_PUBLIC = addr("1.1")[0]


@pytest.mark.parametrize("packet", [udp(tun_ip("16.1"), GATEWAY_PUBLIC, dport=1040),
                                    udp(GATEWAY_PUBLIC, INTERNET)], ids=["inner dst", "inner src"])
def test_loop_guard_from_tun(packet):
    c = client(forwarders=("1.1", "1.2"))
    for i in range(1, 4):
        out = c.from_tun([packet], T0 + i)
        # the copy for 1.1 would go back into the tunnel; 1.2's is fine
        assert [a for _, a in out.sends] == [addr("1.2")]
        assert drops(c, "1.1") == {DropReason.LOOP: i}
    assert len([n for n in c.notices if "loop" in n]) == 1


def test_loop_guard_single_target_drops():
    c = client()
    packet = udp(tun_ip("16.1"), GATEWAY_PUBLIC, dport=1040)
    for _ in range(3):
        assert c.from_tun([packet], T0).sends == []
    assert drops(c, "1.1")[DropReason.LOOP] == 3
    assert len([n for n in c.notices if "loop" in n]) == 1


def test_loop_guard_counts_one_drop_per_packet():
    c = client()
    for i in range(1, 3):
        c.from_tun([udp(tun_ip("16.1"), GATEWAY_PUBLIC, dport=1040)], T0)
        assert drops(c, "1.1") == {DropReason.LOOP: i}
    # and a relay that loops counts LOOP once, not also NO_PATH; later drops still count
    s2 = make_node("1.2")
    looped = udp(tun_ip("16.1"), GATEWAY_PUBLIC, dport=1040)
    s2.from_udp([(make_datagram("16.1", "1.1", looped, seq=0), addr("16.1"))], T0)
    assert drops(s2, "16.1") == {DropReason.LOOP: 1}
    s2.from_udp([(make_datagram("16.1", "1.1", UP, seq=1), addr("1.1"))], T0)   # split horizon: no path
    assert drops(s2, "16.1") == {DropReason.LOOP: 1, DropReason.NO_PATH: 1}


def test_loop_guard_at_a_relay():
    s2 = make_node("1.2")
    inner_packet = udp(tun_ip("16.1"), GATEWAY_PUBLIC, dport=1040)
    out = s2.from_udp([(make_datagram("16.1", "1.1", inner_packet), addr("16.1"))], T0)
    assert out.sends == []
    assert drops(s2, "16.1").get(DropReason.LOOP) == 1
    assert len([n for n in s2.notices if "loop" in n]) == 1


def test_ipv6_inside_and_as_underlay():
    gw6 = ("2001:db8::1", 1040)
    c = client(static={"1.1": gw6, "1.2": addr("1.2"), "1.3": addr("1.3")})
    # 16.1's IPv6 source is a network configured for it (its tunnel address is IPv4)
    s1 = make_node("1.1", peer_networks={pid("16.1"): (ipaddress.ip_network("fd00::16:0/112"),)})
    packet = udp6("fd00::16:1", "2001:4860:4860::8888", dport=53)
    out = c.from_tun([packet], T0)
    assert [a for _, a in out.sends] == [gw6]               # off-net IPv6 goes to the gateway
    assert header_of(out.sends[0][0]).dst == pid("1.1")
    trust(s1, c.session, ("16.1",))
    got = s1.from_udp([(out.sends[0][0], ("2001:db8::16", 1040))], T0)
    assert got.tun == [packet]
    assert paths(s1, "16.1") == {("2001:db8::16", 1040): "direct"}
    # the new path is challenged at the IPv6 address it came from
    assert [(header_of(d).kind, a) for d, a in got.sends] == [(KIND_CHALLENGE, ("2001:db8::16", 1040))]
    # loop guard with an IPv6 underlay: the gateway's own address inside the tunnel
    looped = udp6("fd00::16:1", "2001:db8::1", dport=1040)
    assert c.from_tun([looped], T0).sends == []
    assert drops(c, "1.1") == {DropReason.LOOP: 1}


# ---------------------------------------------------------------- client to client

C2C = {
    "16.2 unknown to 16.1: via the gateway": (SERVERS, None, "1.1", addr("1.1")),
    "16.2 known but never heard: via the gateway": (SERVERS + ("16.2",), None, "1.1", addr("1.1")),
    "16.2 with a static address never heard: via the gateway": (SERVERS + ("16.2",), {"16.2": addr("16.2")},
                                                                 "1.1", addr("1.1")),
    "16.2 heard recently: straight to it": (SERVERS + ("16.2",), "heard", "16.2", addr("16.2")),
}


@pytest.mark.parametrize("ids, extra, dst_id, target", C2C.values(), ids=C2C.keys())
def test_client_to_client_dst_id(ids, extra, dst_id, target):
    static = {t: addr(t) for t in SERVERS}
    if isinstance(extra, dict):
        static.update(extra)
    c1 = client(ids=ids, static=static)
    if extra == "heard":
        # 16.2's keepalive teaches 16.1 a path; 16.1 challenges it and 16.2 answers, which proves it
        c2 = client("16.2", ids=ids + ("16.1",), static=static)
        Wire(c1, c2).run([(make_datagram("16.2", "16.1", b"", kind=KIND_KEEPALIVE), addr("16.1"))], "16.2", T0)
        assert c1.table.get(pid("16.2")).paths[addr("16.2")].proven
    out = c1.from_tun([udp(tun_ip("16.1"), tun_ip("16.2"))], T0)
    assert [a for _, a in out.sends] == [target]
    assert header_of(out.sends[0][0]).dst == pid(dst_id)


def test_two_clients_talk_through_the_server():
    c1, c2 = client("16.1"), client("16.2")
    s1 = make_node("1.1")
    wire = Wire(c1, c2, s1)
    wire.tick(c2, T0)                                      # 16.2's keepalive: 1.1 learns where it is
    packet = udp(tun_ip("16.1"), tun_ip("16.2"), data=b"peer to peer")
    got = wire.originate(c1, [packet], T0)
    assert got.tun["1.1"] == [packet]                      # 1.1's kernel routes it back into the tunnel
    got = wire.originate(s1, got.tun["1.1"], T0)
    assert got.tun["16.2"] == [packet]
    assert header_of(got.hops[0][2]).dst == pid("16.2")


# ---------------------------------------------------------------- forwarder mode

def test_probes_tell_which_forwarder_delivers():
    """A client whose gateway and forwarders send it nothing still learns,
    from the challenges it sends with its keepalives, which of its ways
    works: through 1.2 yes, through 1.3 (down) no; status shows both."""
    from alpaca.status import format_status
    c = client(forwarders=("1.2", "1.3"))
    f = make_node("1.2", mode="forwarder")
    s1 = make_node("1.1")
    wire = Wire(c, f, s1)                   # 1.3 is not on the wire: all it is sent is lost
    for i in range(4):
        wire.tick(c, T0 + i)
    snap = c.snapshot(T0 + 4)
    by_peer = {p["id"]: {x["address"]: x for x in p["paths"]} for p in snap["peers"]}
    via_12, via_13 = by_peer["1.1"][f"{addr('1.2')[0]}:{addr('1.2')[1]}"], \
        by_peer["1.1"][f"{addr('1.3')[0]}:{addr('1.3')[1]}"]
    assert via_12["delivers"] is True and via_12["probe_loss"] == 0
    assert via_13["delivers"] is False and via_13["learned"] == "probed" and not via_13["proven"]
    # the forwarder itself answers its probes, so it is up (not "never heard")
    up = {p["id"]: p["up"] for p in snap["peers"]}
    assert up["1.2"] is True and up["1.3"] is False
    # lost probes count once they are given up (CHALLENGE_LIFETIME)
    wire.tick(c, T0 + 20)
    snap = c.snapshot(T0 + 20)
    via_13 = {x["address"]: x for x in next(p for p in snap["peers"] if p["id"] == "1.1")["paths"]}[
        f"{addr('1.3')[0]}:{addr('1.3')[1]}"]
    assert via_13["probe_loss"] == 1.0 and via_13["probes"] >= 3
    text = format_status({**snap, "uptime": 20, "net": "10.0", "tun": "tun0", "listen": "0.0.0.0:655"})
    assert "never answered; DOES NOT DELIVER" in text and "; delivers" in text

def test_forwarder_mode():
    c = client(forwarders=("1.2",))
    f = make_node("1.2", mode="forwarder")
    s1 = make_node("1.1")
    wire = Wire(c, f, s1)
    # data addressed to the forwarder itself has nowhere to go
    out = f.from_udp([(make_datagram("16.1", "1.2", UP), addr("16.1"))], T0)
    assert out.tun == [] and data_only(out.sends) == []
    assert drops(f, "16.1") == {DropReason.NO_TUN: 1}
    # (only the challenge of the path it came on)
    assert [(header_of(d).kind, a) for d, a in out.sends] == [(KIND_CHALLENGE, addr("16.1"))]
    # keepalives teach the forwarder (directly) and the gateway (through it) the client's paths
    got = wire.tick(c, T0 + 1)
    kinds = [(header_of(d).kind, header_of(d).dst, to) for frm, to, d in got.hops if frm == addr("16.1")]
    assert sorted(k for k in kinds if k[0] == KIND_KEEPALIVE) == sorted([(KIND_KEEPALIVE, pid("1.1"), addr("1.2")),
                                                                        (KIND_KEEPALIVE, pid("1.2"), addr("1.2"))])
    # besides: probes of both ways (challenges) and answers to challenges
    assert {k[0] for k in kinds} <= {KIND_KEEPALIVE, KIND_CHALLENGE, KIND_RESPONSE}
    assert all(not t for t in got.tun.values())
    assert paths(f, "16.1") == {addr("16.1"): "direct"}
    assert paths(s1, "16.1") == {addr("1.2"): "relayed"}
    # so traffic flows both ways through the forwarder
    assert wire.originate(c, [UP], T0 + 2).tun["1.1"] == [UP]
    got = wire.originate(s1, [DOWN], T0 + 2)
    assert got.tun["16.1"] == [DOWN]
    assert [(frm, to) for frm, to, d in got.hops if header_of(d).kind == KIND_DATA] == [
        (addr("1.1"), addr("1.2")), (addr("1.2"), addr("16.1"))]


def test_keepalive_schedule():
    c = client(forwarders=("1.1", "1.2"))
    expected = sorted([(pid("1.1"), addr("1.1")), (pid("1.1"), addr("1.2")), (pid("1.2"), addr("1.2"))])
    sent_at = []
    for step in range(600):                                # 60 s in 0.1 s ticks
        now = T0 + step / 10
        out = c.tick(now)
        assert c.next_deadline() > now
        if out.sends:
            sent_at.append(now)
            # to the gateway through every forwarder, and to each forwarder that is not the gateway
            # (a keepalive and a probe, a challenge, on each way)
            for kind in (KIND_KEEPALIVE, KIND_CHALLENGE):
                assert sorted((header_of(d).dst, a) for d, a in out.sends if header_of(d).kind == kind) == expected
            assert len(out.sends) == 2 * len(expected)
    assert sent_at[0] == T0
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sent_at)]
    assert all(0 < g <= KEEPALIVE_INTERVAL for g in gaps), gaps   # paths never expire while idle
    assert gaps[-1] == KEEPALIVE_INTERVAL and len(sent_at) < 30   # ... and it settles down


# ---------------------------------------------------------------- duplicates

def test_duplicate_copies_are_released_by_tick():
    c = client(duplicate=2, duplicate_delay=0.01)
    s1 = make_node("1.1")
    c.tick(T0)                                             # the first keepalives, out of the way
    out = c.from_tun([UP], T0)
    assert len(out.sends) == 1
    original = out.sends[0]
    assert data_only(c.tick(T0 + 0.005).sends) == []
    assert data_only(c.tick(T0 + 0.01).sends) == [original]
    assert data_only(c.tick(T0 + 0.015).sends) == []
    assert data_only(c.tick(T0 + 0.02).sends) == [original]
    assert data_only(c.tick(T0 + 1).sends) == []
    got = Wire(c, s1).run([original] * 3, "16.1", T0 + 0.02)
    assert got.tun["1.1"] == [UP]
    assert drops(s1, "16.1") == {DropReason.DUPLICATE: 2}


def test_duplicate_without_delay_and_through_forwarders():
    c = client(forwarders=("1.1", "1.2"), duplicate=1, duplicate_delay=0)
    out = c.from_tun([UP], T0)
    assert [a for _, a in out.sends] == [addr("1.1"), addr("1.2")] * 2
    assert len({d for d, _ in out.sends}) == 1
    s1, s2 = make_node("1.1"), make_node("1.2")
    got = Wire(c, s1, s2).run(out.sends, "16.1", T0)
    assert got.tun["1.1"] == [UP]
    # the direct copy, and 1.2's only relay
    assert data_drops(s1, "16.1", got) == {DropReason.DUPLICATE: 2}
    assert drops(s2, "16.1") == {DropReason.DUPLICATE: 1}


EARLY_COPY = {
    "TCP SYN": (tcp(tun_ip("16.1"), INTERNET, flags=SYN), 1),
    "TCP SYN-ACK": (tcp(tun_ip("16.1"), INTERNET, flags=SYN | ACK), 1),
    "DNS query": (udp(tun_ip("16.1"), INTERNET, 40000, 53), 1),
    "DNS answer": (udp(tun_ip("16.1"), INTERNET, 53, 40000), 1),
    "TCP ACK": (tcp(tun_ip("16.1"), INTERNET, flags=ACK), 0),
    "TCP data": (tcp(tun_ip("16.1"), INTERNET, flags=PSH | ACK, data=b"x" * 100), 0),
    "UDP 443": (udp(tun_ip("16.1"), INTERNET, 40000, 443), 0),
}


@pytest.mark.parametrize("packet, extra", EARLY_COPY.values(), ids=EARLY_COPY.keys())
def test_syn_and_dns_get_one_early_copy(packet, extra):
    c = client()
    c.tick(T0)
    out = c.from_tun([packet], T0)
    assert len(out.sends) == 1
    assert data_only(c.tick(T0 + SYN_DNS_COPY_DELAY / 2).sends) == []
    assert data_only(c.tick(T0 + SYN_DNS_COPY_DELAY).sends) == out.sends * extra
    assert data_only(c.tick(T0 + 1).sends) == []


# ---------------------------------------------------------------- unauthenticated input

FRESH_SESSION = b"f" * 8


def established():
    """A gateway that already knows 16.1 (direct and relayed paths, both
    proven, replay state) and has verified the session of `fresh` below."""
    _wire, c, s1, _s2, _s3 = downward_setup()
    trust(s1, FRESH_SESSION, ("16.1",))
    return c, s1


def guarded_state(node) -> dict:
    """peer_state, plus what the challenges and the shard layer keep: none
    of it may change on unauthenticated input. The node's log lines are
    left out (the test compares them on their own)."""
    state = peer_state(node)
    for peer_id, p in node.table.peers.items():
        state[peer_id].update(
            proven={a: (x.proven, x.credit) for a, x in p.paths.items()},
            floors={dst: dict(w.floors) for dst, w in p.replay.items()},
            verified={s: list(v) for s, v in p.verified.items()},
            challenges=dict(p.challenges), next_challenge=p.next_challenge, responses=list(p.responses),
            relay_windows=p.relay_windows)
    r = node.reassembly
    state["reassembly"] = (list(r.slots), dict(r.per_peer), dict(r.peer_bytes), r.bytes,
                           {k: list(v) for k, v in r.done.items()}, {k: list(v) for k, v in node.loss.tally.items()})
    state["loss"] = copy.deepcopy({k: v for k, v in vars(node.loss).items()})
    state["node"] = (node.session, node._ts, node._seq, len(node._timers))
    return state


def _flip(datagram: bytes, i: int) -> bytes:
    b = bytearray(datagram)
    b[i] ^= 0x40
    return bytes(b)


def noise(n: int) -> bytes:
    return random.Random(n).randbytes(n)           # reproducible "random" bytes


def fresh(seq: int) -> bytes:
    return make_datagram("16.1", "1.1", UP, ts=T0 + 6, seq=seq, session=FRESH_SESSION)


UNAUTHENTICATED = {
    "empty": b"",
    "one byte short of a keepalive": noise(OVERHEAD - 1),
    "random keepalive-sized": noise(OVERHEAD),
    "random 200": noise(200),
    "random 1500": noise(1500),
    "zeros": bytes(100),
    "truncated by one": fresh(1)[:-1],
    "header only": fresh(2)[:HEADER_SIZE],
    "first byte cut": fresh(3)[1:],
    "one byte appended": fresh(4) + b"\0",
    "wrong group": make_datagram("16.1", "1.1", UP, ts=T0 + 6, group="another"),
    "wrong pre-shared key": make_datagram("16.1", "1.1", UP, ts=T0 + 6, keys={"16.1": "not-" + psk("16.1")}),
    "unknown src": make_datagram("16.9", "1.1", UP, ts=T0 + 6),
    "unknown dst": make_datagram("16.1", "16.9", UP, ts=T0 + 6),
    "to nobody we know, relayed": relayed(make_datagram("16.9", "16.1", UP, ts=T0 + 6)),
    **{f"bit flip at byte {i}": _flip(fresh(10 + k), i)
       for k, i in enumerate((2, 3, 4, 6, 10, 20, 25, 26, 40, -16, -1))},
}


@pytest.mark.parametrize("data", UNAUTHENTICATED.values(), ids=UNAUTHENTICATED.keys())
def test_unauthenticated_input_changes_no_peer_state(data):
    _c, s1 = established()
    before, global_before = guarded_state(s1), sum(s1.global_drops.values())
    notices = len(s1.notices)
    for source in (addr("16.1"), addr("1.2"), ("203.0.113.66", 6666)):
        out = s1.from_udp([(data, source)], T0 + 6)
        assert out.sends == [] and out.tun == []          # not even a challenge
    assert guarded_state(s1) == before
    assert sum(s1.global_drops.values()) == global_before + 3
    assert set(s1.global_drops) <= {DropReason.MALFORMED, DropReason.WRONG_VERSION, DropReason.UNKNOWN_PEER,
                                    DropReason.AUTH_FAILURE}
    # the one trace besides global counters: input whose unmasked version
    # nibble is not ours (most random bytes) gets the rate-limited line about
    # another wire version, at most once a minute
    logged = s1.notices[notices:]
    assert len(logged) <= 1 and all(n.startswith("datagrams of wire version") for n in logged)
    assert not logged or s1.global_drops[DropReason.WRONG_VERSION]


def test_a_wrong_group_shows_as_malformed():
    """docs/operations.md troubleshooting: the group keys the header mask, so
    another group's datagrams unmask to random bytes: `malformed` (about one
    in 16 `wrong_version`), not `auth_failure` as a wrong key would be."""
    _c, s1 = established()
    for seq in range(400):
        s1.from_udp([(make_datagram("16.1", "1.1", UP, ts=T0 + 6, seq=seq, group="another"), addr("16.1"))],
                    T0 + 6)
    drops = s1.global_drops
    assert drops[DropReason.MALFORMED] > 0.8 * 400 and drops[DropReason.AUTH_FAILURE] == 0, drops


def test_authenticated_but_pad_longer_than_the_plaintext():
    _c, s1 = established()
    before = guarded_state(s1)
    header = Header(DEFAULT_TTL, 0, KIND_DATA, pid("16.1"), pid("1.1"), FRESH_SESSION, int(T0 + 6), 0,
                    pad=len(UP) + 1)
    datagram = seal(derive_group_key(GROUP), pair_key("16.1", "1.1"), header, UP)
    out = s1.from_udp([(datagram, addr("16.1"))], T0 + 6)
    assert out.tun == [] and out.sends == []
    assert s1.global_drops[DropReason.MALFORMED] == 1
    assert guarded_state(s1) == before


def test_the_fresh_datagrams_above_are_valid():
    # the controls: unmodified, the same datagrams do get in and do change state
    _c, s1 = established()
    before = guarded_state(s1)
    assert s1.from_udp([(fresh(1), ("203.0.113.66", 6666))], T0 + 6).tun == [UP]
    assert guarded_state(s1) != before


# ---------------------------------------------------------------- replay

def test_replayed_datagram_reaches_tun_once():
    c, s1 = client(), make_node("1.1")
    trust(s1, c.session, ("16.1",))                        # (its session answered a challenge before)
    captured = c.from_tun([UP, UP], T0).sends               # two sends of the same inner packet
    assert captured[0][0] != captured[1][0]                 # ... are two different datagrams
    assert s1.from_udp([(captured[0][0], addr("16.1"))], T0).tun == [UP]
    assert s1.from_udp([(captured[0][0], addr("16.1"))], T0 + 1).tun == []
    assert s1.from_udp([(captured[0][0], ("203.0.113.66", 6666))], T0 + 2).tun == []
    assert drops(s1, "16.1") == {DropReason.DUPLICATE: 2}
    assert paths(s1, "16.1") == {addr("16.1"): "direct"}   # a replay teaches no path
    later = T0 + REPLAY_WINDOW + 1
    assert s1.from_udp([(captured[0][0], addr("16.1"))], later).tun == []
    assert s1.from_udp([(captured[1][0], addr("16.1"))], later).tun == []   # never delivered, too old now
    assert drops(s1, "16.1") == {DropReason.DUPLICATE: 2, DropReason.REPLAY: 2}


def test_a_restarted_receiver_refuses_what_was_captured_before():
    """No replay state survives a restart. A restarted receiver takes from a
    session only what it sealed after proving itself live to this very
    receiver (a challenge answered, docs/protocol.md §5), so nothing
    captured before the restart gets in, whatever its timestamp."""
    c = client(trust_test_session=False)
    first = make_node("1.1", now=T0 - 5, trust_test_session=False)
    Wire(c, first, trusted=False).tick(c, T0)              # keepalive, challenge, answer: c's session proven
    captured = c.from_tun([UP], T0).sends[0][0]
    assert first.from_udp([(captured, addr("16.1"))], T0).tun == [UP]

    restarted = make_node("1.1", now=T0 + 0.5, trust_test_session=False)
    wire = Wire(c, restarted, trusted=False)
    # replayed from the attacker's own address: refused; the challenge goes
    # there (nobody answers it), the restarted receiver knows no other path
    got = wire.run([(captured, addr("1.1"))], ("203.0.113.66", 6666), T0 + 1)
    assert got.tun["1.1"] == []
    assert [(to, header_of(d).kind) for to, d in got.lost] == [(("203.0.113.66", 6666), KIND_CHALLENGE)]
    assert drops(restarted, "16.1") == {DropReason.UNVERIFIED: 1}
    assert restarted.table.get(pid("16.1")).verified == {}
    sealed_before_the_answer = c.from_tun([UP], T0 + 1).sends[0][0]
    # replayed from 16.1's address: the challenge reaches 16.1, which answers
    # it; still refused, before and after its session is proven
    got = wire.run([(captured, addr("1.1"))], "16.1", T0 + 1.5)
    assert got.tun["1.1"] == []
    assert (addr("1.1"), addr("16.1"), KIND_CHALLENGE) in [(f, t, header_of(d).kind) for f, t, d in got.hops]
    assert c.session in restarted.table.get(pid("16.1")).verified
    assert restarted.from_udp([(captured, addr("16.1"))], T0 + 1.5).tun == []
    # (a datagram sealed before the answer, arriving late, is refused the same way)
    assert restarted.from_udp([(sealed_before_the_answer, addr("16.1"))], T0 + 1.5).tun == []
    assert drops(restarted, "16.1") == {DropReason.UNVERIFIED: 2, DropReason.REPLAY: 2}
    # what 16.1 seals after its answer gets in
    assert wire.originate(c, [UP], T0 + 1.5).tun["1.1"] == [UP]


@pytest.mark.parametrize("prunes", [1, 3])
@pytest.mark.parametrize("ahead", [REPLAY_WINDOW + 1, 2 * REPLAY_WINDOW - 1, 20, 86400])
def test_receiver_clock_jumping_ahead_and_back_does_not_reopen_the_window(ahead, prunes):
    c, s1 = client(trust_test_session=False), make_node("1.1", trust_test_session=False)
    Wire(c, s1, trusted=False).tick(c, T0)                 # c's session proven to s1
    captured = c.from_tun([UP], T0).sends[0][0]
    assert s1.from_udp([(captured, addr("16.1"))], T0).tun == [UP]
    for t in (0, 5, 10)[:prunes]:                          # a wrong clock step (bad NTP, VM resume) ...
        s1.tick(T0 + ahead + t)                            # ... and the prune timer runs meanwhile
    before = drops(s1, "16.1")
    # the clock is put right again; the attacker replays the captured datagram
    assert s1.from_udp([(captured, addr("16.1"))], T0 + 0.5).tun == []
    assert s1.from_udp([(captured, ("203.0.113.66", 6666))], T0 + 0.6).tun == []
    after = drops(s1, "16.1")
    refused = {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}
    assert set(refused) <= {DropReason.UNVERIFIED, DropReason.REPLAY} and sum(refused.values()) == 2
    # and 16.1 is not locked out: what it seals in a later second gets in
    assert Wire(c, s1, trusted=False).originate(c, [UP], T0 + 1.5).tun["1.1"] == [UP]


def test_replay_state_is_kept_per_destination():
    """The pair key (16.1, 1.1) is known to 1.1 too, so 1.1 could forge "16.1 -> 1.1"
    datagrams; at relay 1.2 such forgeries must not touch 16.1's traffic to 1.2."""
    s2 = make_node("1.2")
    for k in range(20):                                    # forged sessions, as 1.1 could make them
        # (from an address other than 1.1's: sent from there they would not be
        # relayed at all, split horizon, and open no window)
        s2.from_udp([(make_datagram("16.1", "1.1", UP, session=bytes([k]) * 8), addr("16.9"))], T0)
    assert drops(s2, "16.1").get(DropReason.TOO_MANY_SESSIONS)
    trust(s2, b"real-one", ("16.1",))                      # 16.1's real session, proven to 1.2
    keepalive = make_datagram("16.1", "1.2", b"", kind=KIND_KEEPALIVE, session=b"real-one")
    before = s2.table.get(pid("16.1")).rx_packets
    s2.from_udp([(keepalive, addr("16.1"))], T0)
    assert s2.table.get(pid("16.1")).rx_packets == before + 1
    assert paths(s2, "16.1") == {addr("16.1"): "direct"}


def test_a_relay_learns_no_path_from_what_it_only_relays():
    s2 = make_node("1.2")
    out = s2.from_udp([(make_datagram("16.1", "1.1", UP), addr("16.1"))], T0)
    assert [a for _, a in out.sends] == [addr("1.1")]
    assert paths(s2, "16.1") == {}
    assert s2.table.get(pid("16.1")).relayed_packets == 1


def test_a_restarted_sender_is_accepted_by_the_receiver():
    """A sender that restarts (a new random session, in the same second) is
    challenged on its first datagram and taken as soon as it answered."""
    s1 = make_node("1.1", trust_test_session=False)
    sessions = set()
    for restart in range(3):
        now = T0 + restart * 0.3                           # (challenges go to a peer at most every 0.25 s)
        c = client(now=now, trust_test_session=False)
        wire = Wire(c, s1, trusted=False)
        datagram = c.from_tun([UP], now).sends[0][0]
        sessions.add(header_of(datagram).session)
        got = wire.run([(datagram, addr("1.1"))], "16.1", now)
        assert got.tun["1.1"] == []                        # an unproven session: challenged ...
        assert header_of(datagram).session in s1.table.get(pid("16.1")).verified   # ... and it answered
        assert wire.originate(c, [UP], now).tun["1.1"] == [UP]
    assert len(sessions) == 3
    assert drops(s1, "16.1") == {DropReason.UNVERIFIED: 3}


def nonce_of(datagram: bytes):
    h = header_of(datagram)
    return (h.src, h.dst, h.session, h.ts, h.seq)


def test_sender_clock_stepping_back_gives_a_new_session():
    c = client()
    clock = ([T0 + i / 100 for i in range(150)] + [T0 - 10 + i / 100 for i in range(150)]
             + [T0 + 0.5] * 20 + [T0 - 10.5] * 20 + [T0 - 0.2] * 20 + [T0 + 30] * 5 + [T0 - 60] * 5)
    nonces, sessions = [], []
    for now in clock:
        datagram = c.from_tun([UP], now).sends[0][0]
        nonces.append(nonce_of(datagram))
        h = header_of(datagram)
        sessions.append(h.session)
        assert abs(h.ts - int(now)) <= 1                  # timestamps stay close to the clock
    assert len(set(nonces)) == len(nonces)
    assert sessions[149] != sessions[150]                  # the 10 s step back started a new session
    assert len(set(sessions)) >= 3
    assert any("clock stepped back" in n for n in c.notices)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=60))
def test_nonces_never_repeat_whatever_the_clock_does(offsets):
    c = client()
    out = c.from_tun([UP] * 1, T0)
    seen = {nonce_of(out.sends[0][0])}
    for off in offsets:
        for d, _ in c.from_tun([UP, UP], T0 + off).sends:
            n = nonce_of(d)
            assert n not in seen
            seen.add(n)
        for d, _ in c.tick(T0 + off).sends:               # keepalives share the sequence
            n = nonce_of(d)
            assert n not in seen
            seen.add(n)


# ---------------------------------------------------------------- padding

@pytest.mark.parametrize("size, wire_size", [(28, 200), (199, 200), (200, 200), (201, 201), (500, 500)])
def test_padding(size, wire_size):
    c = client(forwarders=("1.1", "1.2"), padding=200)
    s1, s2 = make_node("1.1"), make_node("1.2")
    packet = udp(tun_ip("16.1"), INTERNET, data=b"p" * (size - 28))
    assert len(packet) == size
    out = c.from_tun([packet], T0)
    assert {len(d) for d, _ in out.sends} == {OVERHEAD + wire_size}
    assert header_of(out.sends[0][0]).pad == wire_size - size
    got = Wire(c, s1, s2).run(out.sends, "16.1", T0)
    assert got.tun["1.1"] == [packet]                      # unpadded, also after a relay


def test_padding_hides_keepalives_too():
    c = client(padding=200)
    sends = c.tick(T0).sends
    assert {len(d) for d, _ in sends if header_of(d).kind == KIND_KEEPALIVE} == {OVERHEAD + 200}
    # (the probes that go with them are challenges, never padded: a fixed
    # size that says nothing; their one byte of padding says what we can do)
    assert {len(d) for d, _ in sends if header_of(d).kind != KIND_KEEPALIVE} == {OVERHEAD + 16 + 1}


def test_no_padding_by_default():
    c = client()
    out = c.from_tun([UP], T0)
    assert len(out.sends[0][0]) == OVERHEAD + len(UP)


# ---------------------------------------------------------------- live reload (apply_peers)

def test_apply_peers():
    ids = ("1.1", "1.2", "16.1")
    s1 = make_node("1.1", ids=ids, trust_test_session=False)
    c1, c2 = client("16.1", trust_test_session=False), client("16.2", trust_test_session=False)
    wire = Wire(c1, c2, s1, trusted=False)
    wire.tick(c1, T0)                                      # 16.1 proves its session (challenge, answer)
    p2 = udp(tun_ip("16.2"), INTERNET)
    early_c2 = c2.from_tun([p2], T0).sends[0][0]
    assert wire.originate(c1, [UP], T0).tun["1.1"] == [UP]
    assert s1.from_udp([(early_c2, addr("16.2"))], T0).tun == []
    assert s1.global_drops[DropReason.UNKNOWN_PEER] == 1
    kept = s1.table.get(pid("16.1"))
    state = guarded_state(s1)[pid("16.1")]

    # add 16.2 at T0+1: once it has proven its session, its datagrams get in
    assert s1.apply_peers(entries(ids + ("16.2",)), T0 + 1) == ([pid("16.2")], [], [])
    assert any("peers added: 16.2" in n for n in s1.notices)
    wire.tick(c2, T0 + 1)
    assert c2.session in s1.table.get(pid("16.2")).verified
    assert wire.originate(c2, [p2], T0 + 2).tun["1.1"] == [p2]
    assert s1.table.get(pid("16.1")) is kept and guarded_state(s1)[pid("16.1")] == state
    # (one captured before it was added is not: it was sealed before 16.2 proved its session)
    assert s1.from_udp([(early_c2, addr("16.2"))], T0 + 2).tun == []
    assert drops(s1, "16.2") == {DropReason.UNVERIFIED: 1, DropReason.REPLAY: 1}

    # unchanged 16.1 keeps counters, paths, verified sessions and replay state across reloads
    s1.apply_peers(entries(ids + ("16.2",)), T0 + 2)
    assert s1.table.get(pid("16.1")) is kept and guarded_state(s1)[pid("16.1")] == state
    assert wire.originate(c1, [UP], T0 + 2).tun["1.1"] == [UP]
    state = guarded_state(s1)[pid("16.1")]

    # 16.2 changes its key: old-key datagrams fail, new-key ones pass, its state starts afresh
    new_keys = {"16.2": "rotated-" + psk("16.2")}
    assert s1.apply_peers(entries(ids + ("16.2",), keys=new_keys), T0 + 3) == ([], [pid("16.2")], [])
    assert s1.table.get(pid("16.2")).rx_packets == 0
    assert s1.table.get(pid("16.2")).verified == {}
    auth_failures = s1.global_drops[DropReason.AUTH_FAILURE]
    assert s1.from_udp([(c2.from_tun([p2], T0 + 4).sends[0][0], addr("16.2"))], T0 + 4).tun == []
    assert s1.global_drops[DropReason.AUTH_FAILURE] == auth_failures + 1
    c2b = client("16.2", keys=new_keys, trust_test_session=False)
    wire = Wire(c1, c2b, s1, trusted=False)
    wire.tick(c2b, T0 + 4)
    assert wire.originate(c2b, [p2], T0 + 4).tun["1.1"] == [p2]
    assert guarded_state(s1)[pid("16.1")] == state

    # remove 16.1: cut off, both ways
    assert s1.apply_peers(entries(("1.1", "1.2", "16.2"), keys=new_keys), T0 + 5) == ([], [], [pid("16.1")])
    unknown = s1.global_drops[DropReason.UNKNOWN_PEER]
    assert s1.from_udp([(c1.from_tun([UP], T0 + 6).sends[0][0], addr("16.1"))], T0 + 6).tun == []
    assert s1.global_drops[DropReason.UNKNOWN_PEER] == unknown + 1
    assert s1.from_tun([DOWN], T0 + 6).sends == []
    assert s1.global_drops[DropReason.NOT_ROUTABLE] == 1
    # 16.2 was not disturbed by removing 16.1
    assert wire.originate(c2b, [p2], T0 + 6).tun["1.1"] == [p2]


def test_snapshot_is_plain_data():
    import json
    wire, _c, s1, _s2, _s3 = downward_setup()
    snap = s1.snapshot(T0 + 6)
    json.dumps(snap)
    peer = next(p for p in snap["peers"] if p["id"] == "16.1")
    assert peer["up"] and peer["rx_packets"] == 3      # a keepalive per way (direct, through 1.2), and UP
    assert peer["drops"] == {r.value: n for r, n in drops(s1, "16.1").items()}
    assert data_drops(s1, "16.1", *wire.log) == {}     # (each way's keepalive is sealed apart: no copies)
    assert {p["learned"] for p in peer["paths"]} == {"direct", "relayed"}
    assert all(p["proven"] for p in peer["paths"])
    assert all(p["id"] != "1.1" for p in snap["peers"])
    assert (snap["reassembling"], snap["reassembly_bytes"]) == (0, 0)


def test_a_client_cannot_use_another_peers_tunnel_address():
    """Like WireGuard's allowed IPs: a packet from below (a client of ours)
    must carry its own tunnel address if its source is in the tunnel net;
    packets from above (a server routing client to client) are not checked."""
    s1 = make_node("1.1", ids=("1.1", "16.1", "16.2"))
    c2 = make_node("16.2", ids=("1.1", "16.2"), gateway="1.1")
    trust(s1, c2.session, ("16.2",))                       # (sessions proven both ways)
    trust(c2, s1.session, ("1.1",))
    victim = guarded_state(s1)[pid("16.1")]
    spoofed = c2.from_tun([udp(tun_ip("16.1"), tun_ip("1.1"))], T0).sends[0][0]
    assert s1.from_udp([(spoofed, addr("16.2"))], T0).tun == []
    assert drops(s1, "16.2") == {DropReason.SPOOFED: 1}
    assert guarded_state(s1)[pid("16.1")] == victim          # nothing is counted for the peer it posed as
    own = c2.from_tun([udp(tun_ip("16.2"), tun_ip("1.1"))], T0).sends[0][0]
    assert len(s1.from_udp([(own, addr("16.2"))], T0).tun) == 1
    # downward: the server forwards 16.1's packet to 16.2 with its own key
    relayed = s1.from_tun([udp(tun_ip("16.1"), tun_ip("16.2"))], T0)
    assert relayed.sends and len(c2.from_udp([(relayed.sends[0][0], addr("1.1"))], T0).tun) == 1


def test_a_stale_datagram_opens_no_replay_window():
    """Found by the fuzz run: a datagram outside the window must not leave an
    empty window behind (nor charge a relay-window slot) on its way to REPLAY."""
    relay = make_node("1.1")
    relay.from_udp([(make_datagram("16.1", "1.2", udp(tun_ip("16.1"), tun_ip("1.2")), ts=T0 - 60),
                     addr("16.1"))], T0)
    peer = relay.table.get(pid("16.1"))
    assert peer.drops == {DropReason.REPLAY: 1}
    assert pid("1.2") not in peer.replay


def test_a_destination_outside_the_net_waits_for_the_hosts_next_hop_never_the_host():
    """docs/protocol.md §6 "Route lookup": the core never asks the host
    mid-packet. A packet to a destination it has no answer for is held;
    the daemon asks the kernel after the batch and hands the answer back,
    which sends the held packets (in order) where the kernel's routing said."""
    client = make_node("16.1", gateway="1.1")
    client.asks_next_hops = True
    dst = socket.inet_aton("192.0.2.5")
    out = client.from_tun([udp(tun_ip("16.1"), "192.0.2.5", data=b"one"),
                           udp(tun_ip("16.1"), "192.0.2.5", data=b"two")], T0)
    assert not out.sends and list(client.unresolved) == [dst]
    out = client.learn_next_hops({dst: pid("1.2")}, T0)          # a policy route names 1.2
    assert [a for _, a in out.sends] == [addr("1.2"), addr("1.2")] and not client.unresolved
    assert [header_of(d).dst for d, _ in out.sends] == [pid("1.2")] * 2
    # known now: straight out, nothing held
    out = client.from_tun([udp(tun_ip("16.1"), "192.0.2.5")], T0)
    assert [a for _, a in out.sends] == [addr("1.2")] and not client.unresolved
    # "no route through the tunnel" is an answer too: the configured gateway
    other = socket.inet_aton("198.51.100.9")
    client.from_tun([udp(tun_ip("16.1"), "198.51.100.9")], T0)
    assert [a for _, a in client.learn_next_hops({other: None}, T0).sends] == [addr("1.1")]
    # a route change: asked again
    client.forget_next_hops()
    assert not client.from_tun([udp(tun_ip("16.1"), "192.0.2.5")], T0).sends and list(client.unresolved) == [dst]
    # bounded: past HELD_PACKETS a packet goes to the gateway rather than wait
    packets = [udp(tun_ip("16.1"), f"203.0.113.{i % 250}") for i in range(HELD_PACKETS + 10)]
    out = client.from_tun(packets, T0)
    assert client._held_count == HELD_PACKETS and len(out.sends) == 11
    # a node that does not ask (server, forwarder, the core alone): the gateway at once
    plain = make_node("16.1", gateway="1.1")
    assert [a for _, a in plain.from_tun([udp(tun_ip("16.1"), "192.0.2.5")], T0).sends] == [addr("1.1")]


def _icmp_unreachable(packet: bytes) -> tuple[str, str, bytes]:
    """(source, destination, quoted packet) of an ICMP host unreachable; checks its checksums."""
    assert packet[0] == 0x45 and packet[9] == 1 and checksum(packet[:20]) == 0
    assert packet[20:22] == b"\x03\x01" and checksum(packet[20:]) == 0
    return socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), packet[28:]


def test_a_tunnel_address_no_peer_has_gets_an_icmp_host_unreachable_at_once():
    """docs/protocol.md §6: as WireGuard does, the sender learns at once
    (ping: "Destination Host Unreachable", connect(): EHOSTUNREACH), rate-limited."""
    server, client = make_node("1.1"), make_node("16.1", gateway="1.1")
    wire = Wire(server, client)
    # from this host: back through the TUN, from the unreachable address
    # (one of ours would be a martian source to the kernel)
    probe = udp(tun_ip("1.1"), "10.17.16.99")
    out = server.from_tun([probe], T0)
    assert not out.sends and server.global_drops[DropReason.NOT_ROUTABLE] == 1
    (answer,) = out.tun
    assert _icmp_unreachable(answer) == ("10.17.16.99", tun_ip("1.1"), probe)
    # from a client, through its gateway: back through the tunnel, from the gateway
    probe = udp(tun_ip("16.1"), "10.17.16.99")
    d = wire.originate(client, [probe], T0)
    assert d.tun["1.1"] == [probe]                 # the gateway's kernel routes it back into its TUN ...
    d = wire.originate(server, d.tun["1.1"], T0)   # ... where no peer has 16.99
    (answer,) = d.tun["16.1"]
    assert _icmp_unreachable(answer) == (tun_ip("1.1"), tun_ip("16.1"), probe)
    # never an error for an error, nor for multicast
    assert not server.from_tun([answer], T0).tun
    assert not server.from_tun([udp(tun_ip("1.1"), "224.0.0.251")], T0 + 1).tun
    # at most UNREACHABLE_BURST at once, UNREACHABLE_PER_SECOND after that
    burst = server.from_tun([udp(tun_ip("1.1"), "10.17.16.99")] * 50, T0 + 10).tun
    assert len(burst) == UNREACHABLE_BURST
    assert len(server.from_tun([udp(tun_ip("1.1"), "10.17.16.99")] * 50, T0 + 10.5).tun) == UNREACHABLE_PER_SECOND // 2


def test_an_ipv6_tunnel_address_routes_to_its_peer_like_an_ipv4_one():
    """Peer a.b is <net6>::a:b: the same rules as for x.y.a.b (docs/protocol.md §6)."""
    from alpaca.protocol.ids import group_prefix6
    prefix = group_prefix6("test")
    s1, s2 = make_node("1.1", net6=prefix), make_node("1.2", net6=prefix)
    c1, c2 = make_node("16.1", gateway="1.1", net6=prefix), make_node("16.2", gateway="1.1", net6=prefix)
    wire = Wire(s1, s2, c1, c2)
    v6 = {n: str(s1.net.address6(pid(n))) for n in ("1.1", "1.2", "16.1", "16.2")}
    to_s2 = udp6(v6["16.1"], v6["1.2"])
    assert wire.originate(c1, [to_s2], T0).tun["1.2"] == [to_s2]          # a server: straight to it
    to_c2 = udp6(v6["16.1"], v6["16.2"])
    assert wire.originate(c1, [to_c2], T0).tun["1.1"] == [to_c2]          # a client: through the gateway
    back = udp6(v6["1.1"], v6["16.1"])
    assert wire.originate(s1, [back], T0).tun["16.1"] == [back]
    outside = udp6(v6["16.1"], "2001:db8::1")
    assert wire.originate(c1, [outside], T0).tun["1.1"] == [outside]      # out through the gateway


def test_only_authenticated_senders_are_heard():
    """Output.heard names the addresses whose datagram for us passed its MAC,
    session proof and replay window: the host learns nothing else from a
    sender (the local address to answer it from, host/udp.py)."""
    server = make_node("1.1")
    good = make_datagram("16.1", "1.1", udp(tun_ip("16.1"), tun_ip("1.1")), seq=1)
    forged = make_datagram("16.1", "1.1", b"x" * 40, seq=2, key=bytes(32))
    assert server.from_udp([(forged, ("203.0.113.9", 1040))], T0).heard == set()
    assert server.from_udp([(good, ("198.51.100.7", 1040))], T0).heard == {("198.51.100.7", 1040)}
    assert server.from_udp([(good, ("203.0.113.9", 1040))], T0).heard == set()     # a replay


def _icmpv6_unreachable(packet: bytes) -> tuple[str, str, bytes]:
    """(source, destination, quoted packet) of an ICMPv6 address unreachable; checks its checksum."""
    assert packet[0] >> 4 == 6 and packet[6] == 58 and int.from_bytes(packet[4:6], "big") == len(packet) - 40
    pseudo = packet[8:40] + (len(packet) - 40).to_bytes(4, "big") + bytes(3) + bytes((58,))
    assert packet[40:42] == b"\x01\x03" and checksum(pseudo + packet[40:]) == 0
    return (socket.inet_ntop(socket.AF_INET6, packet[8:24]), socket.inet_ntop(socket.AF_INET6, packet[24:40]),
            packet[48:])


def test_an_ipv6_tunnel_address_no_peer_has_gets_an_icmpv6_address_unreachable():
    from alpaca.protocol.ids import group_prefix6
    prefix = group_prefix6("test")
    server, client = make_node("1.1", net6=prefix), make_node("16.1", gateway="1.1", net6=prefix)
    wire = Wire(server, client)
    v6 = {n: str(server.net.address6(pid(n))) for n in ("1.1", "16.1", "16.99")}
    probe = udp6(v6["1.1"], v6["16.99"])
    (answer,) = server.from_tun([probe], T0).tun                 # from this host: through the TUN
    assert _icmpv6_unreachable(answer) == (v6["16.99"], v6["1.1"], probe)
    probe = udp6(v6["16.1"], v6["16.99"])
    d = wire.originate(client, [probe], T0)                      # from a client, through its gateway
    (answer,) = wire.originate(server, d.tun["1.1"], T0).tun["16.1"]
    assert _icmpv6_unreachable(answer) == (v6["1.1"], v6["16.1"], probe)
    from alpaca.protocol.inner import unreachable
    assert unreachable(answer, server.net.address6(pid("1.1")).packed) is None      # never an error for an error
