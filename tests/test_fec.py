"""Tier 1: forward error correction (docs/protocol.md §12 "FEC").

With FEC on, the packets of one TUN read to one peer are sealed together as
a batch and sent as shards with Reed-Solomon parity; super-packets get parity for
their own size. What the tests hold the core to: shards lost, reordered and
duplicated across two paths decode to exactly the original packets, in
order, once; a peer with FEC on and one with it off interoperate (receiving
needs no setting); and the loss the receiver reports is that of the union
of the paths, so a clean second path turns parity off and two lossy ones
get parity for their joint loss only.
"""

from __future__ import annotations

import random

from protocol_helpers import T0, addr, header_of, make_node, pid, tun_ip, udp
from test_fragments import acquainted, super_packet

from alpaca.protocol import fec as fragments
from alpaca.protocol import isal
from alpaca.protocol.constants import FLAG_BATCH, FLAG_FRAG, FLAG_ISAL, FLAG_VNET, KIND_DATA, KIND_REPORT
from alpaca.protocol.wire import peek_shard
from alpaca.protocol.drops import DropReason
from alpaca.protocol.constants import ZERO_VNET


def mesh(client_fec=fragments.AUTO, server_fec=fragments.AUTO):
    """Client 16.1 reaches server 1.1 on two paths: directly, and through forwarder 1.2."""
    client = make_node("16.1", gateway="1.1", forwarders=("1.1", "1.2"), vnet=True, fec=client_fec)
    forwarder = make_node("1.2", mode="forwarder")
    server = make_node("1.1", vnet=True, fec=server_fec)
    acquainted(client, forwarder, server)
    return client, forwarder, server


def over_two_paths(sends, forwarder, now, rng, loss_direct=0.0, loss_relayed=0.0):
    """What reaches 1.1 of the client's sends: (datagram, from) in random order,
    each path losing datagrams independently at its own rate."""
    arrivals = []
    for datagram, to in sends:
        if to == addr("1.1"):
            if rng.random() >= loss_direct:
                arrivals.append((datagram, addr("16.1")))
        elif rng.random() >= loss_relayed:
            for relayed, onward in forwarder.from_udp([(datagram, addr("16.1"))], now).sends:
                assert onward == addr("1.1")
                arrivals.append((relayed, addr("1.2")))
    rng.shuffle(arrivals)
    return arrivals


def packets(n: int, size: int = 1000, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [ZERO_VNET + udp(tun_ip("16.1"), tun_ip("1.1"), sport=40000 + i, data=rng.randbytes(size))
            for i in range(n)]


def test_a_batch_is_one_message_with_parity():
    client, _, _ = mesh(client_fec=(20, 10))
    sends = client.from_tun(packets(40), T0).sends
    direct = [d for d, to in sends if to == addr("1.1")]
    assert len(direct) * 2 == len(sends)                  # the same datagrams on both paths
    headers = [peek_shard(client.group_key, d) for d in direct]
    # one message: shard i carries the message's seq + i, the same everything else
    assert len({(h.src, h.dst, h.session, h.ts, h.flags) for h, _, _ in headers}) == 1
    assert len({(h.seq - sub.index, sub.k, sub.m, sub.length) for h, _, sub in headers}) == 1
    k, m = headers[0][2].k, headers[0][2].m
    assert sorted(sub.index for _, _, sub in headers) == list(range(k + m))
    assert len(direct) == k + m and m == fragments.ratio_parity((20, 10), k)
    # 50 % parity is heavy: ISA-L's codec (docs/protocol.md §12)
    assert headers[0][0].flags == FLAG_FRAG | FLAG_BATCH | FLAG_VNET | FLAG_ISAL


def test_shards_lost_reordered_and_duplicated_over_two_paths_decode_exactly_once():
    client, forwarder, server = mesh(client_fec=(20, 10))
    rng = random.Random(4)
    copies = 0
    for round_ in range(20):
        now = T0 + round_ * 0.01
        sent = packets(30, seed=round_) + [super_packet(20_000 + round_)]
        arrivals = over_two_paths(client.from_tun(sent, now).sends, forwarder, now, rng, 0.4, 0.4)
        arrivals += rng.sample(arrivals, len(arrivals) // 4)          # and some arrive twice
        # a relayed copy differs from the direct one only in TTL and path (bytes 0-1)
        copies += len(arrivals) - len({bytes(d[2:]) for d, _ in arrivals})
        got = [p for d, frm in arrivals for p in server.from_udp([(d, frm)], now).tun]
        # with 40 % loss on each path nearly everything decodes; never a
        # corrupted, reordered-within-a-message or twice-delivered packet
        # (the batch and the super-packet are two messages: either may be first)
        assert got in (sent, sent[30:] + sent[:30], sent[:30], sent[30:]), round_
    # every shard is a datagram of its own (seq + index): each copy after
    # the first, over either path, is a duplicate of the peer, and nothing
    # else was dropped (no message completed twice, no shard refused)
    assert copies > 0
    assert dict(server.table.get(pid("16.1")).drops) == {DropReason.DUPLICATE: copies}
    assert not server.global_drops


def test_peers_with_fec_on_and_off_interoperate():
    client, forwarder, server = mesh(client_fec=(20, 10), server_fec=None)
    out = client.from_tun(packets(3, size=100), T0)
    assert all(header_of(d).flags & FLAG_FRAG for d, _ in out.sends)
    arrivals = over_two_paths(out.sends, forwarder, T0, random.Random(1))
    assert server.from_udp(arrivals, T0).tun == packets(3, size=100)
    # the server sends plain datagrams, and the client takes them
    reply = ZERO_VNET + udp(tun_ip("1.1"), tun_ip("16.1"))
    back = server.from_tun([reply], T0).sends
    assert back and all(header_of(d).flags == 0 for d, _ in back)
    assert client.from_udp([(back[0][0], addr("1.1"))], T0).tun == [reply]


def test_a_batch_with_a_bad_length_is_dropped_and_counted():
    client, _, server = mesh()
    key = client.table.pair_key(client.me, server.me)
    entry = udp(tun_ip("16.1"), tun_ip("1.1"))
    plaintext = len(entry).to_bytes(2, "big") + entry + (500).to_bytes(2, "big") + b"short"
    datagram = client._seal(0, server.me, key, plaintext, T0, FLAG_BATCH)
    assert server.from_udp([(datagram, addr("16.1"))], T0).tun == []
    assert server.table.get(pid("16.1")).drops[DropReason.MALFORMED_BATCH] == 1


def run_with_reports(client, forwarder, server, rng, loss_direct, loss_relayed, seconds=4):
    """Bulk super-packets for a few seconds, with the server's loss reports fed back."""
    for i in range(seconds * 20):
        now = T0 + i * 0.05
        arrivals = over_two_paths(client.from_tun([super_packet(30_000)], now).sends, forwarder, now, rng,
                                  loss_direct, loss_relayed)
        server.from_udp(arrivals, now)
        reports = [d for d, _ in server.tick(now).sends if header_of(d).kind == KIND_REPORT]
        client.from_udp([(d, addr("1.1")) for d in reports], now)
    return next(p for p in client.snapshot(now)["peers"] if p["id"] == "1.1")


def test_a_clean_second_path_turns_parity_off():
    row = run_with_reports(*mesh(), random.Random(2), loss_direct=0.0, loss_relayed=0.3)
    assert row["loss"] is not None and row["loss"] < 0.001 and row["parity"] == 0, row


def test_two_lossy_paths_get_parity_for_their_joint_loss():
    row = run_with_reports(*mesh(), random.Random(3), loss_direct=0.3, loss_relayed=0.3)
    # 0.3 * 0.3 = 9 % of the union lost, not 30 % (nor 50 %+ from counting copies)
    assert 0.04 < row["loss"] < 0.16, row
    assert 0 < row["parity"] < fragments.parity_for(0.3, 47), row


def test_duplicate_copies_count_once_too():
    """`duplicate = 1` on one 30 % path: each shard goes twice, so 9 % of
    them are lost for good, and that is what parity is sized for."""
    client = make_node("16.1", gateway="1.1", vnet=True, duplicate=1, duplicate_delay=0.0)
    server = make_node("1.1", vnet=True)
    acquainted(client, server)
    rng = random.Random(6)
    for i in range(80):
        now = T0 + i * 0.05
        sends = client.from_tun([super_packet(30_000)], now).sends
        server.from_udp([(d, addr("16.1")) for d, _ in sends if rng.random() >= 0.3], now)
        reports = [d for d, _ in server.tick(now).sends if header_of(d).kind == KIND_REPORT]
        client.from_udp([(d, addr("1.1")) for d in reports], now)
    row = next(p for p in client.snapshot(now)["peers"] if p["id"] == "1.1")
    assert 0.04 < row["loss"] < 0.16, row


def test_every_message_with_parity_uses_isal_and_an_older_senders_zfec_still_decodes(monkeypatch):
    rng = random.Random(12)
    for ratio, older in (((20, 1), False), ((20, 10), False), ((4, 4), False), ((20, 1), True), ((4, 4), True)):
        if older:       # a sender of before 2026-12-03 chose zfec for light parity
            monkeypatch.setattr(fragments, "uses_isal", lambda k, m: False)
        client, _, server = mesh(client_fec=ratio)
        sent = packets(40, seed=ratio[1])
        sends = [d for d, to in client.from_tun(sent, T0).sends if to == addr("1.1")]
        header, _, sub = peek_shard(client.group_key, sends[0])
        k, m = sub.k, sub.m
        assert m > 0 and len(sends) == k + m
        assert bool(header.flags & FLAG_ISAL) == (not older), (ratio, k, m)
        lost = set(rng.sample(range(k), min(m, k)))           # data shards lost: parity must fill in
        index = [peek_shard(client.group_key, d)[2].index for d in sends]
        assert server.from_udp([(d, addr("16.1")) for d, i in zip(sends, index) if i not in lost], T0).tun == sent


def test_the_direct_decode_agrees_with_the_library_for_any_erasures(monkeypatch):
    """Whatever is missing, ISA-L called directly (fec._Isal._rebuild:
    an e x e inversion, one pass over the shards) rebuilds the message, and
    liberasurecode's decode is never called; where ISA-L cannot be loaded,
    the library decodes the same messages."""
    rng = random.Random(3)
    cases = []
    for trial in range(150):
        k = rng.choice([2, 10, 24, 40, 47, 47, 64, 128])
        m = rng.randint(1, min(60, 255 - k))
        length = rng.randint(16 * k, k * 1412)
        size = fragments.shard_size(length, k)
        body = rng.randbytes(length)
        shards, k2, _ = fragments.split(body, size, m, True)
        if k2 != k:
            continue
        missing = rng.randint(1, min(m, k))
        lost = set(rng.sample(range(k), missing)) | set(rng.sample(range(k, k + m), rng.randint(0, m - missing)))
        cases.append((k, m, size, length, body, {i: bytes(c) for i, c in enumerate(shards) if i not in lost}))
    assert isal.available()
    for k, m, size, length, body, arrived in cases:
        codec = fragments._codec(k, m, True)
        monkeypatch.setattr(codec.driver, "decode", None)       # any call fails the test
        assert fragments.decode(k, m, True, arrived, size, length) == body, (k, m, length, sorted(arrived))
        monkeypatch.undo()
    monkeypatch.setattr(isal, "_lib", None)
    fragments._codecs.clear()
    try:
        for k, m, size, length, body, arrived in cases[:20]:
            assert fragments.decode(k, m, True, arrived, size, length) == body
    finally:
        fragments._codecs.clear()       # (codecs that learnt "no ISA-L" must not outlive the test)


def test_a_shard_claiming_the_other_codec_fails_its_mac():
    """FLAG_ISAL is in the header the shard's MAC covers: a shard that claims
    the other codec than its message's is refused before it is kept, so no
    codec ever decodes with the wrong one."""
    client, _, server = mesh(client_fec=(20, 10))
    sent = packets(40)
    sends = [d for d, to in client.from_tun(sent, T0).sends if to == addr("1.1")]
    assert header_of(sends[0]).flags & FLAG_ISAL
    peer = server.table.get(pid("16.1"))
    server.from_udp([(sends[0], addr("16.1"))], T0)
    held = server.reassembly.bytes
    before = (dict(peer.drops), peer.rx_bytes)
    forged = bytearray(sends[1])
    forged[3] ^= FLAG_ISAL          # the header is XOR-masked: this flips the flag itself
    assert header_of(bytes(forged)).flags == header_of(sends[1]).flags ^ FLAG_ISAL
    server.from_udp([(bytes(forged), addr("16.1"))], T0)
    assert dict(server.global_drops) == {DropReason.AUTH_FAILURE: 1}
    assert (dict(peer.drops), peer.rx_bytes, server.reassembly.bytes) == (*before, held)
    # the genuine shard still counts, and the message decodes as sent
    assert server.from_udp([(d, addr("16.1")) for d in sends[1:]], T0).tun == sent
    # a whole datagram may not claim a codec at all: malformed before any key is used
    client2, _, server2 = mesh(client_fec=None)
    whole = [d for d, to in client2.from_tun(packets(1), T0).sends if to == addr("1.1")][0]
    assert header_of(whole).kind == KIND_DATA and not header_of(whole).flags & FLAG_FRAG
    forged = bytearray(whole)
    forged[3] ^= FLAG_ISAL
    assert server2.from_udp([(bytes(forged), addr("16.1"))], T0).tun == []
    assert dict(server2.global_drops) == {DropReason.MALFORMED: 1}


def both_ways(client, forwarder, server, rng, loss, seconds=4, relay_down=True, start=T0):
    """Bulk from the client for a few seconds, and what a receiver sends back
    (a reply per tick, its loss reports) on every path it has to the client,
    each path losing `loss` each way. Returns the client's last sends."""
    reply = ZERO_VNET + udp(tun_ip("1.1"), tun_ip("16.1"))
    # the ways through the forwarder, as the challenges of keepalives would have proven them
    forwarder.table.get(pid("16.1")).prove(addr("16.1"), False, start)
    client.table.get(pid("1.1")).prove(addr("1.2"), True, start)
    for i in range(seconds * 20):
        now = start + i * 0.05
        sends = client.from_tun([super_packet(30_000)], now).sends
        server.from_udp(over_two_paths(sends, forwarder, now, rng, loss, loss), now)
        back = []
        for datagram, to in server.from_tun([reply], now).sends + server.tick(now).sends:
            if rng.random() < loss:
                continue
            if to == addr("16.1"):
                back.append((datagram, addr("1.1")))
            elif relay_down:
                back.extend((d, addr("1.2")) for d, _ in forwarder.from_udp([(datagram, addr("1.1"))], now).sends)
        client.from_udp(back, now)
    return sends


def paths_of_shards(sends):
    """Shard index -> the targets it went to, for the data shards and parity of one message."""
    where = {}
    for datagram, to in sends:
        header, _, sub = peek_shard(mesh()[0].group_key, datagram)
        if header.kind == KIND_DATA and header.flags & FLAG_FRAG:
            where.setdefault((header.seq - sub.index, sub.index), []).append(to)
    return where


def test_two_lossy_paths_spread_bulk_each_shard_on_one_path():
    """Two paths that each lose 30 %: every byte twice would cost 2 x (k + m);
    each shard on one path, with parity for one path's loss, costs k + m'
    (docs/protocol.md §13 "Spreading")."""
    client, forwarder, server = mesh()
    sends = both_ways(client, forwarder, server, random.Random(7), 0.3)
    row = next(p for p in client.snapshot(T0 + 4)["peers"] if p["id"] == "1.1")
    assert row["spread"] and 0.2 < row["loss"] < 0.4, row
    where = paths_of_shards(sends)
    assert where and all(len(targets) == 1 for targets in where.values())
    on_direct = sum(targets == [addr("1.1")] for targets in where.values())
    assert abs(2 * on_direct - len(where)) <= 1                 # two equal blocks
    # and the parity is that of one path: the message still decodes at 30 %
    assert row["parity"] >= fragments.parity_for(0.25, 47)
    incomplete = server.table.get(pid("16.1")).drops.get(DropReason.INCOMPLETE, 0)
    assert incomplete <= 3, server.table.get(pid("16.1")).drops
    # one line for the switch; parity that wobbles by a shard per report is not logged each time
    assert sum("bulk spread over 2 paths" in n for n in client.notices) == 1
    assert sum("datagrams lost" in n for n in client.notices) <= 2, client.notices


def test_a_clean_path_keeps_bulk_on_every_path():
    client, forwarder, server = mesh()
    both_ways(client, forwarder, server, random.Random(8), 0.0)
    sends = client.from_tun([super_packet(30_000)], T0 + 4).sends
    assert not client.loss.spread
    assert all(sorted(t) == sorted([addr("1.1"), addr("1.2")]) for t in paths_of_shards(sends).values())


def test_spread_bulk_goes_on_every_path_again_when_a_path_falls_quiet():
    """A path the peer has not been heard on for SPREAD_HEARD gets no block
    of its own; with fewer than two paths left to spread over, every shard
    goes on every path, as before spreading (it may be the quiet one that
    still delivers)."""
    client, forwarder, server = mesh()
    rng = random.Random(9)
    both_ways(client, forwarder, server, rng, 0.3)
    assert pid("1.1") in client.loss.spread
    sends = both_ways(client, forwarder, server, rng, 0.3, seconds=1, relay_down=False, start=T0 + 4)
    assert pid("1.1") in client.loss.spread
    assert all(sorted(t) == sorted([addr("1.1"), addr("1.2")]) for t in paths_of_shards(sends).values())
