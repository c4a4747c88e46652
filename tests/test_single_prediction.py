"""Tier 1: the receive fast path for whole datagrams (inbound._Single).

After a whole data datagram from an address is taken, the next one from
there is expected to carry the same header but its seq; when it does, only
the parsing is skipped. Its AEAD, the replay window, the source check and
the path bookkeeping are the full path's, and a change of the peer list
forgets every prediction (a removed or re-keyed peer gets nothing through).
"""

from __future__ import annotations

from protocol_helpers import T0, Wire, addr, entries, full_path_of, make_node, pid, tun_ip, udp

from alpaca.protocol.constants import HEADER_SIZE
from alpaca.protocol.drops import DropReason

FROM = addr("16.1")


def proven_pair(monkeypatch):
    """A client and a server that proved the client's path; the server's
    full-path receives are recorded (the datagrams it parsed)."""
    client, server = make_node("16.1", gateway="1.1"), make_node("1.1")
    Wire(client, server).tick(client, T0)
    full_path = full_path_of(server, monkeypatch)
    return client, server, full_path


def sealed(client, packets, now=T0 + 0.1) -> list[bytes]:
    out = [d for p in packets for d, a in client.from_tun([p], now).sends]
    assert len(out) == len(packets)       # one whole datagram each
    return out


def packets(n: int, source: str = tun_ip("16.1")) -> list[bytes]:
    return [udp(source, "8.8.8.8", data=b"x" * (20 + i)) for i in range(n)]


def test_a_stream_of_whole_datagrams_is_parsed_once_and_delivered_whole(monkeypatch):
    client, server, full_path = proven_pair(monkeypatch)
    sent = packets(20)
    datagrams = sealed(client, sent)
    out = server.from_udp([(d, FROM) for d in datagrams], T0 + 0.1)
    assert out.tun == sent and out.heard == {FROM}
    assert full_path == datagrams[:1]
    peer = server.table.get(pid("16.1"))
    assert peer.rx_packets >= 20 and sum(peer.drops.values()) == 0
    assert server.last_data[pid("16.1")] == T0 + 0.1


def test_a_predicted_datagram_is_still_authenticated_replay_checked_and_source_checked(monkeypatch):
    client, server, full_path = proven_pair(monkeypatch)
    first, second, third = sealed(client, packets(3))
    server.from_udp([(first, FROM)], T0 + 0.1)
    forged = bytearray(second)
    forged[HEADER_SIZE + 5] ^= 1                     # the predicted header, a changed ciphertext
    out = server.from_udp([(bytes(forged), FROM)], T0 + 0.1)
    assert out.tun == [] and server.global_drops[DropReason.AUTH_FAILURE] == 1
    out = server.from_udp([(second, FROM), (second, FROM), (first, FROM)], T0 + 0.1)
    assert len(out.tun) == 1
    assert server.table.get(pid("16.1")).drops[DropReason.DUPLICATE] == 2
    spoofed = sealed(client, packets(1, source="203.0.113.5"))
    out = server.from_udp([(spoofed[0], FROM), (third, FROM)], T0 + 0.1)
    assert len(out.tun) == 1 and server.table.get(pid("16.1")).drops[DropReason.SPOOFED] == 1
    assert third not in full_path and spoofed[0] not in full_path


def test_a_removed_or_rekeyed_peer_gets_nothing_through_a_prediction(monkeypatch):
    client, server, _ = proven_pair(monkeypatch)
    datagrams = sealed(client, packets(3))
    assert len(server.from_udp([(datagrams[0], FROM)], T0 + 0.1).tun) == 1
    server.apply_peers(entries(ids=("1.1", "1.2", "1.3", "16.2")), T0 + 0.1)
    assert server.from_udp([(datagrams[1], FROM)], T0 + 0.1).tun == []
    assert server.global_drops[DropReason.UNKNOWN_PEER] == 1

    client, server, _ = proven_pair(monkeypatch)
    datagrams = sealed(client, packets(3))
    assert len(server.from_udp([(datagrams[0], FROM)], T0 + 0.1).tun) == 1
    server.apply_peers(entries(keys={"16.1": "a-new-key-for-16.1-" + "z" * 30}), T0 + 0.1)
    assert server.from_udp([(datagrams[1], FROM)], T0 + 0.1).tun == []
    assert server.global_drops[DropReason.AUTH_FAILURE] == 1


def test_predictions_are_bounded(monkeypatch):
    from alpaca.protocol import inbound
    monkeypatch.setattr(inbound, "SINGLES_LIMIT", 4)
    client, server, _ = proven_pair(monkeypatch)
    for i, datagram in enumerate(sealed(client, packets(10))):
        frm = ("192.0.2.161", 2000 + i)         # the client from ever new ports (a NAT rebinding)
        server.table.get(pid("16.1")).prove(frm, False, T0 + 0.1)
        server.from_udp([(datagram, frm)], T0 + 0.1)
        assert len(server._singles) <= 4
