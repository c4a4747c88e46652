"""Tier 1: path MTU found by probes, and messages sized to it (docs/protocol.md §6 "Path MTU").

A way that loses datagrams above some size without saying so (a PMTU black
hole) is found by padded challenges; what is sent on it is then cut into
shards that fit, and arrives.
"""

from __future__ import annotations

import random

from protocol_helpers import T0, addr, header_of, make_node, name, tcp, trust, tun_ip, udp

from alpaca.protocol import pmtu
from alpaca.protocol.constants import KIND_CHALLENGE, VNET_HDR_SIZE, ZERO_VNET
from alpaca.protocol.pmtu import FULL, LIMITED, SEARCHING, UNKNOWN, PathMtu

FULL_SIZE = 1452        # max_datagram at the default mtu 1400


def run_rounds(mtu: PathMtu, passes, now: float, until: float, small_answered: bool = True) -> list[list[int]]:
    """Drive `mtu` from now to until in 0.25 s steps over a way that carries
    the sizes `passes(size)` says; the rounds it sent."""
    rounds, small_at = [], -1e18
    while now < until:
        sizes = mtu.step(FULL_SIZE, small_at, now)
        if sizes:
            rounds.append(sizes)
            if small_answered:
                small_at = now
            for size in sizes:
                if passes(size):
                    mtu.answer(size)
        now += 0.25
    return rounds


def test_a_way_that_carries_full_size_is_probed_once_then_rarely():
    mtu = PathMtu()
    rounds = run_rounds(mtu, lambda size: True, T0, T0 + 60)
    assert mtu.state == FULL and mtu.limit is None
    assert rounds[0] == [FULL_SIZE]
    assert rounds == [[FULL_SIZE]] * 2                  # then one every CONFIRM (30 s)


def test_a_black_hole_is_found_and_searched_down_to_the_size_that_passes():
    mtu = PathMtu()
    rounds = run_rounds(mtu, lambda size: size <= 1372, T0, T0 + 15)
    assert mtu.state == LIMITED
    assert 1372 - pmtu.PRECISION <= mtu.limit <= 1372
    # FAILURES full-size rounds, then a few search rounds of at most SPREAD sizes, each within the range
    assert rounds[:pmtu.FAILURES] == [[FULL_SIZE]] * pmtu.FAILURES
    search = rounds[pmtu.FAILURES:]
    assert 1 <= len(search) <= 4 and all(len(r) <= pmtu.SPREAD for r in search)
    assert all(pmtu.FLOOR < s < FULL_SIZE for r in search for s in r)


def test_nothing_is_concluded_while_the_small_challenges_go_unanswered_too():
    mtu = PathMtu()
    run_rounds(mtu, lambda size: False, T0, T0 + 30, small_answered=False)
    assert mtu.state == UNKNOWN and mtu.limit is None


def test_a_limited_way_tries_full_size_again_and_takes_it_when_it_passes():
    mtu = PathMtu()
    run_rounds(mtu, lambda size: size <= 1300, T0, T0 + 15)
    assert mtu.state == LIMITED
    rounds = run_rounds(mtu, lambda size: size <= 1300, T0 + 15, T0 + 15 + pmtu.RAISE + 1)
    assert rounds == [[FULL_SIZE]] and mtu.state == LIMITED           # one raise probe a RAISE
    run_rounds(mtu, lambda size: True, T0 + 16 + pmtu.RAISE, T0 + 17 + 2 * pmtu.RAISE)
    assert mtu.state == FULL and mtu.limit is None


def test_a_search_resumes_after_a_round_that_proved_nothing():
    mtu = PathMtu()
    run_rounds(mtu, lambda size: size <= 1400, T0, T0 + 4.1)
    assert mtu.state == SEARCHING
    run_rounds(mtu, lambda size: False, T0 + 4.25, T0 + 8, small_answered=False)
    assert mtu.state == SEARCHING
    run_rounds(mtu, lambda size: size <= 1400, T0 + 8, T0 + 20)
    assert mtu.state == LIMITED and 1400 - pmtu.PRECISION <= mtu.limit <= 1400


# ---------------------------------------------------------------- nodes over a black hole

def deliver(nodes: dict, sends, frm, now: float, limit: int, tun: list) -> None:
    """Datagrams over `limit` bytes vanish (no ICMP error); the rest arrive."""
    queue = [(d, frm, to) for d, to in sends]
    while queue:
        d, frm_, to = queue.pop(0)
        if len(d) > limit or to not in nodes:
            continue
        out = nodes[to].from_udp([(d, frm_)], now)
        tun.extend(out.tun)
        queue += [(d2, to, to2) for d2, to2 in out.sends]


def black_hole_pair(limit: int, **settings):
    client = make_node("16.1", gateway="1.1", vnet=True, **settings)
    server = make_node("1.1", vnet=True, **settings)
    for a, b in ((client, server), (server, client)):
        trust(b, a.session, (name(a),))
    return client, server, {addr("16.1"): client, addr("1.1"): server}


def learn(client, nodes, limit: int, seconds: float = 10.0) -> float:
    """Big traffic from the client while it ticks: it probes and adapts."""
    packet = ZERO_VNET + tcp(tun_ip("16.1"), tun_ip("1.1"), data=bytes(1360))
    now = T0
    while now < T0 + seconds:
        deliver(nodes, client.from_tun([packet], now).sends, addr("16.1"), now, limit, [])
        deliver(nodes, client.tick(now).sends, addr("16.1"), now, limit, [])
        now += 0.25
    return now


def test_a_node_finds_the_black_hole_and_then_every_datagram_fits_and_arrives():
    limit = 1372        # an underlay MTU of 1400 on an IPv4 path
    client, server, nodes = black_hole_pair(limit)
    now = learn(client, nodes, limit)
    path = client.snapshot(now)["peers"][0]["paths"][0]
    assert path["path_mtu"] == LIMITED and limit - pmtu.PRECISION <= path["max_datagram"] <= limit
    assert any("black hole" in n and "mtu 13" in n for n in client.notices)
    probes = [d for d, _ in client.tick(now).sends if header_of(d).kind == KIND_CHALLENGE]
    assert all(len(d) <= FULL_SIZE for d in probes)
    # a full-MTU plain packet, a full-MTU vnet one and a super-packet: all in datagrams <= the limit
    big = tcp(tun_ip("16.1"), tun_ip("1.1"), data=random.Random(1).randbytes(1360))
    superp = bytes([1, 1]) + (40).to_bytes(2, "little") + (1360).to_bytes(2, "little") + bytes(4) \
        + tcp(tun_ip("16.1"), tun_ip("1.1"), data=random.Random(2).randbytes(30000))
    small = ZERO_VNET + udp(tun_ip("16.1"), tun_ip("1.1"))
    for packet in (ZERO_VNET + big, bytes([1, 0, 0, 0, 0, 0, 20, 0, 16, 0]) + big, superp, small):
        sends = client.from_tun([packet], now).sends
        assert sends and all(len(d) <= path["max_datagram"] for d, _ in sends)
        tun = []
        deliver(nodes, sends, addr("16.1"), now, limit, tun)
        assert tun == [packet]
        now += 0.01
    # a small packet still goes whole
    assert len(client.from_tun([small], now).sends) == 1


def test_a_full_size_way_is_not_split_and_an_idle_one_is_not_probed():
    client, server, nodes = black_hole_pair(10_000)
    now = learn(client, nodes, 10_000, seconds=3)
    assert client.snapshot(now)["peers"][0]["paths"][0]["path_mtu"] == FULL
    packet = ZERO_VNET + tcp(tun_ip("16.1"), tun_ip("1.1"), data=bytes(1360))
    assert [len(d) for d, _ in client.from_tun([packet], now).sends] == [FULL_SIZE - VNET_HDR_SIZE]
    idle, _, _ = black_hole_pair(10_000)
    sends = [d for t in range(20) for d, _ in idle.tick(T0 + t).sends]
    assert all(len(d) < pmtu.FLOOR for d in sends)          # keepalives and small challenges only


def test_plain_packets_without_vnet_are_split_too():
    limit = 1300
    client = make_node("16.1", gateway="1.1")
    server = make_node("1.1")
    for a, b in ((client, server), (server, client)):
        trust(b, a.session, (name(a),))
    nodes = {addr("16.1"): client, addr("1.1"): server}
    packet = tcp(tun_ip("16.1"), tun_ip("1.1"), data=bytes(1360))
    now = T0
    while now < T0 + 10:
        deliver(nodes, client.from_tun([packet], now).sends, addr("16.1"), now, limit, [])
        deliver(nodes, client.tick(now).sends, addr("16.1"), now, limit, [])
        now += 0.25
    sends = client.from_tun([packet], now).sends
    assert len(sends) == 2 and all(len(d) <= limit for d, _ in sends)
    tun = []
    deliver(nodes, sends, addr("16.1"), now, limit, tun)
    assert tun == [packet]
