"""Tier 1: what source a peer's packets may carry (node.Node._spoofed).

A client (a peer below us) may send only from its own tunnel address or
from the networks configured for it (`peers.<id>.networks`), IPv4 and IPv6
alike, like WireGuard's AllowedIPs; anything else is dropped and counted as
`spoofed` against it. A server above us routes for others and is not checked.
"""

from __future__ import annotations

import ipaddress

from protocol_helpers import T0, Wire, make_node, pid, tcp, tun_ip, udp, udp6

from alpaca.protocol.drops import DropReason


def pair(**server_settings):
    client = make_node("16.1", gateway="1.1")
    server = make_node("1.1", **server_settings)
    return client, server, Wire(client, server)


def spoofed(server) -> int:
    return server.table.get(pid("16.1")).drops[DropReason.SPOOFED]


def test_a_client_may_send_from_its_own_tunnel_address():
    client, server, wire = pair()
    packet = udp(tun_ip("16.1"), "8.8.8.8")
    assert wire.originate(client, [packet], T0).tun["1.1"] == [packet]
    assert spoofed(server) == 0


def test_a_source_outside_the_tunnel_net_is_spoofed_unless_configured():
    client, server, wire = pair()
    internet = udp("203.0.113.5", "8.8.8.8")
    lan = tcp("192.168.5.7", "8.8.8.8")
    v6 = udp6("2001:db8:5::7", "2001:4860:4860::8888")
    got = wire.originate(client, [internet, lan, v6], T0)
    assert got.tun["1.1"] == []
    assert spoofed(server) == 3
    # the networks configured for 16.1 (a LAN it routes, IPv4 and IPv6) get in
    nets = (ipaddress.ip_network("192.168.5.0/24"), ipaddress.ip_network("2001:db8:5::/48"))
    client, server, wire = pair(peer_networks={pid("16.1"): nets})
    got = wire.originate(client, [internet, lan, v6], T0)
    assert got.tun["1.1"] == [lan, v6]
    assert spoofed(server) == 1


def test_each_packet_of_a_fec_batch_is_checked_on_its_own():
    client = make_node("16.1", gateway="1.1", fec=(1, 2))
    server = make_node("1.1")
    wire = Wire(client, server)
    good, bad = udp(tun_ip("16.1"), "8.8.8.8"), udp("203.0.113.5", "8.8.8.8")
    got = wire.originate(client, [good, bad, good], T0)
    assert got.tun["1.1"] == [good, good]
    assert spoofed(server) == 1


def test_a_server_routing_for_others_is_not_checked():
    client, server, wire = pair()
    wire.tick(client, T0)               # the server learns (and proves) the client's path
    from_internet = udp("8.8.8.8", tun_ip("16.1"), sport=53, dport=40000)
    assert wire.originate(server, [from_internet], T0).tun["16.1"] == [from_internet]
    assert client.table.get(pid("1.1")).drops[DropReason.SPOOFED] == 0


def test_a_client_may_send_from_its_own_tunnel_ipv6_address_and_no_other():
    from alpaca.protocol.ids import group_prefix6
    prefix = group_prefix6("test")
    client = make_node("16.1", gateway="1.1", net6=prefix)
    server = make_node("1.1", net6=prefix)
    wire = Wire(client, server)
    own = udp6(str(server.net.address6(pid("16.1"))), "2001:4860:4860::8888")
    other = udp6(str(server.net.address6(pid("16.2"))), "2001:4860:4860::8888")
    assert wire.originate(client, [own, other], T0).tun["1.1"] == [own]
    assert spoofed(server) == 1
