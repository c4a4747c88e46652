"""Tier 1: the ip6 column and paths of both address families in the core,
the peer list (secrets.txt -> PeerEntry, check), status formatting.
Tier 2: the underlay's two sockets on loopback (alpaca/host/underlay.py).
The real daemons are in tests/test_ipv6_underlay.py."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from alpaca.host.udp import Udp, UdpError
from alpaca.host.underlay import Underlay, planned_sockets
from alpaca.peerlist import cross_problems, peer_entries, underlay_endpoints, underlay_hosts
from alpaca.protocol.drops import DropReason
from alpaca.protocol.peers import PeerEntry
from alpaca.secrets import parse_secrets
from alpaca.status import format_status
from tests.protocol_helpers import T0, addr, make_node, pid, psk, trust, tun_ip, udp

V6 = ("2001:db8::11", 1040)           # 1.1's IPv6 underlay address


def dual_entries(static6: dict[str, tuple] | None = None, static4=("1.1",)) -> dict[int, PeerEntry]:
    static6 = {"1.1": V6} if static6 is None else static6
    ids = ("1.1", "16.1")
    return {pid(t): PeerEntry(psk(t), addr(t) if t in static4 else None, static6.get(t)) for t in ids}


def pair(**kw):
    gw = make_node("1.1", peer_entries=dual_entries(**kw))
    client = make_node("16.1", peer_entries=dual_entries(**kw), gateway="1.1")
    return gw, client


# ---------------------------------------------------------------- core

def test_a_peer_with_ip_and_ip6_is_sent_every_datagram_on_both():
    gw, client = pair()
    trust(gw, client.session)
    peer = client.table.get(pid("1.1"))
    assert {a: p.static for a, p in peer.paths.items()} == {addr("1.1"): True, V6: True}
    sends = client.from_tun([udp(tun_ip("16.1"), tun_ip("1.1"))], T0).sends
    assert sorted(a for _, a in sends) == sorted([addr("1.1"), V6])
    assert sends[0][0] == sends[1][0]            # one datagram, two paths: the receiver keeps the first
    got = [gw.from_udp([(d, a)], T0) for d, a in sends]
    assert len(got[0].tun) == 1 and not got[1].tun
    assert gw.table.get(pid("16.1")).drops[DropReason.DUPLICATE] == 1


def test_each_way_gets_a_keepalive_of_its_own_so_the_gateway_learns_both_families():
    gw, client = pair()
    trust(gw, client.session)
    keepalives = [s for s in client.tick(T0).sends if s[1] in (addr("1.1"), V6)]
    assert len(keepalives) >= 2 and keepalives[0][0] != keepalives[1][0]
    src4, src6 = ("192.0.2.161", 1040), ("2001:db8::161", 1040)
    out4 = gw.from_udp([(keepalives[0][0], src4)], T0)
    out6 = gw.from_udp([(keepalives[1][0], src6)], T0)
    assert out4.heard == {src4} and out6.heard == {src6}     # the host learns reply sources of both
    paths = gw.table.get(pid("16.1")).paths
    assert set(paths) == {src4, src6}
    for path in paths.values():
        path.proven = True          # (as if each had answered its challenge: tests/test_shard_security.py)
    sends = gw.from_tun([udp(tun_ip("1.1"), tun_ip("16.1"))], T0).sends
    assert sorted(a for _, a in sends) == [src4, src6]      # downward: both families at once


def test_a_peer_with_only_ip6_is_reached_over_ipv6_only():
    _, client = pair(static4=())
    assert list(client.table.get(pid("1.1")).paths) == [V6]
    sends = client.from_tun([udp(tun_ip("16.1"), tun_ip("1.1"))], T0).sends
    assert [a for _, a in sends] == [V6]


def test_an_ipv6_source_teaches_a_path_only_after_authentication():
    gw, client = pair()
    trust(gw, client.session)
    datagram = client.from_tun([udp(tun_ip("16.1"), tun_ip("1.1"))], T0).sends[0][0]
    roamed = ("2001:db8:5::9", 40000)
    forged = bytearray(datagram)
    forged[-1] ^= 1
    out = gw.from_udp([(bytes(forged), roamed)], T0)
    assert not out.heard and roamed not in gw.table.get(pid("16.1")).paths
    out = gw.from_udp([(datagram, roamed)], T0)
    assert out.heard == {roamed}
    path = gw.table.get(pid("16.1")).paths[roamed]
    assert not path.relayed and not path.proven          # challenged before it carries more than it brought


def test_status_shows_each_paths_family():
    gw, client = pair()
    snap = client.snapshot(T0)
    paths = {p["address"]: p["family"] for p in snap["peers"][0]["paths"]}
    assert paths == {"192.0.2.1:1040": "ipv4", "[2001:db8::11]:1040": "ipv6"}
    status = {**snap, "uptime": 1.0, "net": "10.17", "tun": "alpaca", "listen": "0.0.0.0:1040, [::]:1040"}
    text = format_status(status)
    assert "path [2001:db8::11]:1040" in text and "path 192.0.2.1:1040" in text
    assert max(len(line) for line in text.splitlines()) <= 80, text


# ---------------------------------------------------------------- secrets.txt, check

SECRETS = """\
1.1 aaaaaaaaaaaaaaaaaaaaaaaaaaaa 192.0.2.1 2001:DB8::0:11 1041
1.2 bbbbbbbbbbbbbbbbbbbbbbbbbbbb null 2001:db8::12
1.3 cccccccccccccccccccccccccccc vpn.example.com
16.1 dddddddddddddddddddddddddddd
"""


def config(**kw):
    base = dict(id=pid("16.1"), port=1040, forwarders=(pid("1.2"),), gateway_in_use=pid("1.1"),
                secret_file="secrets.txt")
    return SimpleNamespace(**{**base, **kw})


def test_the_ip6_column_becomes_a_second_static_address_written_as_sockets_report_it():
    secrets, problems = parse_secrets(SECRETS)
    assert not problems
    entries = peer_entries(secrets, 1040, lambda host: "198.51.100.3" if host == "vpn.example.com" else host)
    assert entries[pid("1.1")].static_addrs == (("192.0.2.1", 1041), ("2001:db8::11", 1041))
    assert entries[pid("1.2")].static_addrs == (("2001:db8::12", 1040),)
    assert entries[pid("1.3")].static_addrs == (("198.51.100.3", 1040),)
    assert underlay_hosts(config(), entries) == ["192.0.2.1", "198.51.100.3", "2001:db8::11", "2001:db8::12"]
    # a forwarder with only an IPv6 address has an address
    assert cross_problems(config(), secrets) == []


def test_check_lists_the_underlay_endpoints_of_both_families():
    secrets, _ = parse_secrets(SECRETS)
    lines = underlay_endpoints(config(), secrets)
    assert lines == [
        "peer 1.1 underlay: 192.0.2.1:1041 (IPv4) and [2001:db8::11]:1041 (IPv6) (both used at once)",
        "peer 1.2 underlay: [2001:db8::12]:1040 (IPv6)",
        "peer 1.3 underlay: vpn.example.com:1040 (IPv4, host name)"]
    assert "[::]:1040 (IPv6" in planned_sockets("0.0.0.0", 1040)
    assert planned_sockets("2001:db8::1", 1040) == "UDP socket on [2001:db8::1]:1040 (IPv6 only)"


# ---------------------------------------------------------------- the underlay's sockets (loopback)

def recv(u: Underlay, family: int, timeout: float = 3.0) -> list:
    fd = u.socks[family].fd
    got, deadline = [], time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        got = u.recv_batch(8, fd)
        time.sleep(0.001)
    return got


@pytest.fixture
def underlay():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    u = Underlay("0.0.0.0", 0)
    if u.problem:
        u.close()
        pytest.skip(u.problem)
    yield u
    u.close()


def test_two_sockets_on_one_port_each_family_plain_addresses(underlay):
    port = underlay.socks[socket.AF_INET].sock.getsockname()[1]
    assert underlay.socks[socket.AF_INET6].sock.getsockname()[1] == port
    assert underlay.endpoints() == [f"0.0.0.0:{port}", f"[::]:{port}"]
    assert underlay.socks[socket.AF_INET6].sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    peer4 = Udp("127.0.0.1", 0)
    peer6 = Udp("::1", 0, v6only=True)
    try:
        peer4.send_batch([(b"four", ("127.0.0.1", port))])
        peer6.send_batch([(b"six", ("::1", port))])
        from4 = ("127.0.0.1", peer4.sock.getsockname()[1])
        from6 = ("::1", peer6.sock.getsockname()[1])
        assert recv(underlay, socket.AF_INET) == [(b"four", from4)]
        assert recv(underlay, socket.AF_INET6) == [(b"six", from6)]
        # IPV6_PKTINFO noted; remembered only for an authenticated sender (confirm)
        assert underlay.reply_source(from6) is None
        underlay.confirm({from6})
        assert underlay.reply_source(from6) == "::1"
        # each datagram leaves on the socket of its family; GSO trains on IPv6 too
        train = [bytes([i]) * 1200 for i in range(6)]
        underlay.send_batch([(b"back4", from4)] + [(d, from6) for d in train])
        assert [d for d, _ in recv(underlay_peer(peer4), None)] == [b"back4"]
        got, deadline = [], time.monotonic() + 3
        while len(got) < 6 and time.monotonic() < deadline:
            got += [bytes(d) for d, _ in peer6.recv_batch(64)]
        assert got == train and underlay.send_errors == 0
    finally:
        peer4.close()
        peer6.close()


def underlay_peer(udp: Udp):
    """A single Udp seen through recv()'s interface."""
    return SimpleNamespace(socks={None: udp}, recv_batch=lambda n, fd: udp.recv_batch(n))


def test_a_host_without_ipv6_runs_on_ipv4_with_one_problem(monkeypatch):
    def factory(listen, port, v6only=False):
        if ":" in listen:
            raise UdpError("cannot open a UDP socket for ::: Address family not supported by protocol")
        return Udp(listen, port)
    u = Underlay("0.0.0.0", 0, socket_factory=factory)
    try:
        assert list(u.socks) == [socket.AF_INET]
        assert "no IPv6 underlay" in u.problem and "IPv4 only" in u.problem
        u.send_batch([(b"x", ("2001:db8::1", 1040))])        # no socket for it: not sent, no error
        assert u.send_errors == 0
    finally:
        u.close()


def test_one_configured_address_opens_only_its_family():
    u = Underlay("127.0.0.1", 0)
    try:
        assert list(u.socks) == [socket.AF_INET] and u.problem is None
    finally:
        u.close()


def test_the_flood_filter_goes_on_the_ipv4_socket_with_the_ipv4_addresses(underlay):
    assert underlay.filter_known({"127.0.0.1", "2001:db8::1", "192.0.2.1"}, unknown_one_in=0)
    assert underlay.filtered == 2 and underlay.socks[socket.AF_INET6].filtered is None
    assert not underlay.filter_known(None) and underlay.filtered is None
