"""AES-256-GCM where both ends have it, XChaCha20-Poly1305 otherwise
(docs/protocol.md §4 "AEAD"): negotiated per peer from the answers to
challenges, never assumed, and a datagram sealed with an AEAD the receiver
does not use is counted and named once, not silently lost."""

from __future__ import annotations

import pytest

from protocol_helpers import T0, Wire, addr, header_of, make_datagram, make_node, pair_key, pid, tcp, tun_ip
from test_fragments import super_packet

from alpaca.protocol.constants import CAP_AES, FLAG_AES, FLAG_FRAG, KIND_CHALLENGE, KIND_DATA, KIND_RESPONSE
from alpaca.protocol.crypto import aes_available, aes_key
from alpaca.protocol.drops import DropReason
from alpaca.protocol.wire import open_sealed

pytestmark = pytest.mark.skipif(not aes_available(), reason="this CPU has no AES instructions")


def acquainted(client_aes: bool, server_aes: bool, vnet: bool = False):
    """A client and its server that proved each other's sessions for real
    (keepalive, challenges and answers both ways)."""
    client = make_node("16.1", gateway="1.1", trust_test_session=False, aes=client_aes, vnet=vnet)
    server = make_node("1.1", trust_test_session=False, aes=server_aes, vnet=vnet)
    wire = Wire(client, server, trusted=False)
    wire.tick(client, T0)
    wire.tick(client, T0 + 1.1)     # (the first keepalive was unverified: the next one is taken)
    return client, server, wire


def data_flags(sends) -> set[int]:
    return {header_of(d).flags & FLAG_AES for d, _ in sends if header_of(d).kind == KIND_DATA}


def test_two_ends_with_aes_seal_data_with_it_both_ways():
    client, server, wire = acquainted(True, True, vnet=True)
    assert client.table.get(pid("1.1")).aes and server.table.get(pid("16.1")).aes
    packet = b"\0" * 10 + tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"x" * 100)
    out = client.from_tun([packet], T0 + 2)
    assert data_flags(out.sends) == {FLAG_AES}
    assert wire.run(out.sends, "16.1", T0 + 2).tun["1.1"] == [packet]
    big = super_packet()                             # shards: the message is sealed with AES too
    out = client.from_tun([big], T0 + 2)
    assert all(header_of(d).flags & FLAG_FRAG for d, _ in out.sends) and data_flags(out.sends) == {FLAG_AES}
    assert wire.run(out.sends, "16.1", T0 + 2).tun["1.1"] == [big]
    reply = b"\0" * 10 + tcp(tun_ip("1.1"), tun_ip("16.1"), data=b"y" * 100)
    out = server.from_tun([reply], T0 + 2)
    assert data_flags(out.sends) == {FLAG_AES}
    assert wire.run(out.sends, "1.1", T0 + 2).tun["16.1"] == [reply]
    assert client.snapshot(T0 + 2)["peers"][0]["aead"] == "aes-256-gcm"
    assert any("AES-256-GCM" in n for n in client.notices)


@pytest.mark.parametrize("client_aes, server_aes", [(True, False), (False, True)])
def test_an_end_without_aes_gets_xchacha_and_still_talks(client_aes, server_aes):
    client, server, wire = acquainted(client_aes, server_aes)
    # each end knows what the other announced; data needs both
    assert client.table.get(pid("1.1")).aes == server_aes and server.table.get(pid("16.1")).aes == client_aes
    packet = tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"x" * 100)
    out = client.from_tun([packet], T0 + 2)
    assert data_flags(out.sends) == {0}
    assert wire.run(out.sends, "16.1", T0 + 2).tun["1.1"] == [packet]
    reply = tcp(tun_ip("1.1"), tun_ip("16.1"), data=b"y" * 100)
    out = server.from_tun([reply], T0 + 2)
    assert data_flags(out.sends) == {0}
    assert wire.run(out.sends, "1.1", T0 + 2).tun["16.1"] == [reply]
    assert {p["aead"] for p in client.snapshot(T0 + 2)["peers"]} == {"xchacha20-poly1305"}


def test_aes_to_a_node_that_does_not_open_it_is_counted_and_named_once():
    """The server restarted with `aead: xchacha20poly1305`; the client still
    goes by its older answer until the next one."""
    client, server, wire = acquainted(True, False)
    client.table.get(pid("1.1")).aes = True
    frm = addr("16.1")
    for i in range(3):
        out = client.from_tun([tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"x" * 100)], T0 + 2)
        got = server.from_udp([(d, frm) for d, _ in out.sends], T0 + 2 + i)
        assert got.tun == [] and got.sends == []
    assert server.global_drops[DropReason.AEAD_UNSUPPORTED] == 3
    assert sum("AES-256-GCM" in n for n in server.notices) == 1
    # the client's next challenge is answered without AES: it switches back
    wire.tick(client, T0 + 5)
    assert not client.table.get(pid("1.1")).aes


def test_the_aead_flag_is_authenticated():
    """Set or cleared on the way (the header's flags are associated data),
    a datagram is an auth_failure, whichever AEAD sealed it."""
    client, server, wire = acquainted(True, True)
    for aes in (True, False):
        client.table.get(pid("1.1")).aes = aes
        out = client.from_tun([tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"x" * 100)], T0 + 2)
        flipped = bytearray(out.sends[0][0])
        flipped[3] ^= FLAG_AES          # flags byte, under the same mask
        before = server.global_drops[DropReason.AUTH_FAILURE]
        assert server.from_udp([(bytes(flipped), addr("16.1"))], T0 + 2).tun == []
        assert server.global_drops[DropReason.AUTH_FAILURE] == before + 1


def test_each_direction_and_each_session_has_its_own_aes_key():
    """Both directions of a pair and every restart share the pair key; the
    AES key is per sender session, so a (ts, seq) nonce is never reused."""
    pair = bytes(32)
    a_to_b = (0x1001).to_bytes(2, "big") + (0x0101).to_bytes(2, "big") + b"s" * 8
    b_to_a = (0x0101).to_bytes(2, "big") + (0x1001).to_bytes(2, "big") + b"s" * 8
    restarted = a_to_b[:4] + b"t" * 8
    keys = {aes_key(pair, a_to_b), aes_key(pair, b_to_a), aes_key(pair, restarted), pair}
    assert len(keys) == 4


def test_relayed_ways_keep_xchacha():
    """A relay authenticates what it passes on: only direct paths get AES."""
    client, server, wire = acquainted(True, True)
    peer = server.table.get(pid("16.1"))
    direct = [a for a, p in peer.paths.items() if not p.relayed]
    assert server._aead_flag(peer, direct) == FLAG_AES
    assert server._aead_flag(peer, direct + [("203.0.113.5", 1040)]) == 0     # a way it never came from
    peer.paths[direct[0]].relayed = True
    assert server._aead_flag(peer, direct) == 0


def test_an_older_challenger_gets_an_answer_no_bigger_than_its_challenge():
    """A challenge without padding (an older release) is answered without
    the capability byte, so the answer may still go back where it came from;
    a challenge of this release has the byte, and so has its answer."""
    server = make_node("1.1", aes=True)
    nonce = bytes(range(16))
    for pad, caps in ((0, None), (1, CAP_AES)):
        challenge = make_datagram("16.1", "1.1", nonce, ts=T0, seq=10 + pad, kind=KIND_CHALLENGE, pad=pad)
        out = server.from_udp([(challenge, addr("16.1"))], T0)
        [answer] = [d for d, a in out.sends if header_of(d).kind == KIND_RESPONSE and a == addr("16.1")]
        assert len(answer) == len(challenge)
        header = header_of(answer)
        plaintext = open_sealed(pair_key("16.1", "1.1"), header, answer)
        assert plaintext[:16] == nonce
        assert (plaintext[16] if header.pad else None) == caps


@pytest.mark.root
@pytest.mark.parametrize("client_aead, expected", [("auto", "aes-256-gcm"), ("xchacha20poly1305", "xchacha20-poly1305")])
def test_real_daemons_agree_on_the_aead(tmp_path, client_aead, expected):
    """Two daemons with the default config seal with AES-256-GCM; a client
    set to `aead: xchacha20poly1305` gets XChaCha20-Poly1305 both ways from
    a server that could do either. A 1 MiB transfer (super-packets as
    shards, sha256 checked) crosses either way, and nothing fails to open."""
    from alpaca.lab.worlds import lossy_pair
    with lossy_pair(tmp_path, 0.0, s1={}, c1={"aead": client_aead}) as mesh:
        mesh.transfer("c1", "s1", "10.17.1.1", size=1 << 20)
        for host, other in (("c1", "1.1"), ("s1", "16.1")):
            status = mesh.peers[host].status()
            peer = next(p for p in status["peers"] if p["id"] == other)
            assert peer["aead"] == expected, (host, peer)
            assert not {"auth_failure", "aead_unsupported"} & set(status["drops"]), status["drops"]


def test_forged_aes_datagrams_leave_no_key_behind():
    """A receiver derives the AES key of whatever session a forged header
    names, but keeps it only once a datagram under it authenticated."""
    from alpaca.protocol import crypto
    client, server, wire = acquainted(True, True)
    crypto._aes_keys.clear()
    for i in range(50):
        forged = bytearray(make_datagram("16.1", "1.1", b"x" * 60, ts=T0 + 2, seq=100 + i,
                                         session=bytes([i]) * 8))
        forged[3] ^= FLAG_AES                   # "sealed with AES" under the same mask: it is not
        server.from_udp([(bytes(forged), addr("16.1"))], T0 + 2)
    assert server.global_drops[DropReason.AUTH_FAILURE] == 50
    assert crypto._aes_keys == {}
    out = client.from_tun([tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"x" * 100)], T0 + 2)
    wire.run(out.sends, "16.1", T0 + 2)
    assert len(crypto._aes_keys) == 1           # the client's, sealing and opening alike
