"""UDP super-packets (USO, docs/protocol.md §12).

Tier 1: alpaca.host.gso cuts a UDP super-packet into datagrams with
correct headers and checksums; a TUN on a kernel without USO falls back
to TSO and cuts what it is given. Tier 3: the kernel takes those datagrams
(and super-packets written whole), and numbered datagrams of several sizes,
written one by one and as UDP_SEGMENT writes, cross the standard mesh
intact and exactly once, over IPv4 and IPv6 inside the tunnel: between
offloaded peers (client 16.1, FEC 8:4, two paths: direct and through
forwarder 1.2) and to and from a peer with offloads off (16.2).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca.host import gso, tun
from alpaca.lab.daemons import SOURCE, Mesh, lab_module
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for
from alpaca.lab.worlds import lossy_pair, mesh4_world
from alpaca.protocol.ids import TunnelNet, group_prefix6
from alpaca.protocol.inner import checksum

TOOLS = Path(__file__).parent / "tools"


def super_packet(v: int, sizes: list[int], gso_size: int, ip_id: int = 0xFFFE) -> tuple[bytes, list[bytes]]:
    """A UDP super-packet as a TUN read hands it over (virtio_net_hdr, IP, UDP
    with only its pseudo-header sum, payload) and the payloads in it."""
    payloads = [bytes((n,)) * size for n, size in enumerate(sizes)]
    data = b"".join(payloads)
    udp = (1234).to_bytes(2, "big") + (443).to_bytes(2, "big") + (8 + len(data)).to_bytes(2, "big") + b"\xab\xcd"
    if v == 4:
        ip = (b"\x45\x00" + (28 + len(data)).to_bytes(2, "big") + ip_id.to_bytes(2, "big") + b"\x40\x00\x40\x11\0\0"
              + bytes((10, 17, 16, 1)) + bytes((10, 17, 1, 1)))
    else:
        ip = (b"\x60\0\0\0" + (8 + len(data)).to_bytes(2, "big") + b"\x11\x40"
              + bytes.fromhex("fd00000000000000" "0000000000001001") + bytes.fromhex("fd00" + "00" * 13 + "01"))
    vnet = bytes((1, gso.GSO_UDP_L4)) + (len(ip) + 8).to_bytes(2, "little") + gso_size.to_bytes(2, "little") \
        + len(ip).to_bytes(2, "little") + (6).to_bytes(2, "little")
    return vnet + ip + udp + data, payloads


def udp_checksum_ok(packet: bytes) -> bool:
    """The UDP checksum of an IP packet, by the textbook algorithm."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        pseudo = packet[12:20] + b"\0\x11" + packet[ihl + 4:ihl + 6]
    else:
        ihl = 40
        pseudo = packet[8:40] + b"\0\0" + packet[44:46] + b"\0\0\0\x11"
    return packet[ihl + 6:ihl + 8] != b"\0\0" and checksum(pseudo + packet[ihl:]) == 0


@pytest.mark.parametrize("v", [4, 6])
def test_a_udp_super_packet_is_cut_into_the_datagrams_written(v):
    packet, payloads = super_packet(v, [1200] * 5 + [333], 1200)
    assert gso.is_udp_gso(packet)
    cut = gso.segment_udp(packet)
    assert len(cut) == 6
    for n, (datagram, payload) in enumerate(zip(cut, payloads)):
        assert datagram[:10] == bytes(10)
        ip = datagram[10:]
        ihl = 20 if v == 4 else 40
        assert ip[ihl + 8:] == payload and udp_checksum_ok(ip)
        assert int.from_bytes(ip[ihl + 4:ihl + 6], "big") == 8 + len(payload)
        if v == 4:
            assert int.from_bytes(ip[2:4], "big") == len(ip) and checksum(ip[:20]) == 0
            assert int.from_bytes(ip[4:6], "big") == (0xFFFE + n) & 0xFFFF     # the ID counts up (and wraps)
        else:
            assert int.from_bytes(ip[4:6], "big") == len(ip) - 40


def test_what_is_not_a_udp_super_packet_is_not_cut():
    packet, _ = super_packet(4, [100] * 3, 100)
    assert not gso.is_udp_gso(bytes(10) + packet[10:])          # a plain packet
    assert not gso.is_udp_gso(b"\x01\x01" + packet[2:])         # TCP (TSO4)
    tcp = bytearray(packet)
    tcp[10 + 9] = 6
    assert gso.segment_udp(bytes(tcp)) is None
    assert gso.segment_udp(packet[:4] + b"\0\0" + packet[6:]) is None    # gso_size 0
    assert gso.segment_udp(packet[:10 + 24]) is None                       # truncated
    # a gso_size that would make one message more writes than any sender makes
    big, _ = super_packet(4, [1000] * 8, 1000)
    assert len(gso.segment_udp(big[:4] + (63).to_bytes(2, "little") + big[6:])) == 127
    assert gso.segment_udp(big[:4] + (62).to_bytes(2, "little") + big[6:]) is None


def datagrams(v: int, sizes: list[int], ip_id: int = 7, sport: int = 1234, partial: bool = False) -> list[bytes]:
    """TUN reads of one flow's datagrams: complete checksums and a zero
    virtio_net_hdr, or (partial) the checksum left to the receiver."""
    out = []
    for n, size in enumerate(sizes):
        packet, _ = super_packet(v, [size], max(size, 1), ip_id + n)
        cut = gso.segment_udp(packet)[0]
        cut = cut[:10 + (20 if v == 4 else 40)] + sport.to_bytes(2, "big") + cut[12 + (20 if v == 4 else 40):]
        fixed = gso.segment_udp(packet[:10] + cut[10:])[0]       # (its checksum again, for the new port)
        if partial:
            hdr = 28 if v == 4 else 48
            fixed = (bytes((1, 0, 0, 0, 0, 0)) + (hdr - 8).to_bytes(2, "little") + (6).to_bytes(2, "little")
                     + fixed[10:hdr + 8] + b"\x12\x34" + fixed[hdr + 10:])
        out.append(fixed)
    return out


def completed(super_packet: bytes) -> bytes:
    """The IP packet as a device that computes the partial checksum makes it."""
    start, offset = int.from_bytes(super_packet[6:8], "little"), int.from_bytes(super_packet[8:10], "little")
    ip = bytearray(super_packet[10:])
    ip[start + offset:start + offset + 2] = (0xFFFF - gso._sum(bytes(ip[start:]))).to_bytes(2, "big")
    return bytes(ip)


@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("partial", [False, True])
def test_one_flows_datagrams_are_joined_and_cut_back_to_the_same(v, partial):
    reads = datagrams(v, [1200] * 9 + [300], partial=partial)
    joined = gso.coalesce_udp(reads)
    assert len(joined) == 1 and gso.is_udp_gso(joined[0])
    assert int.from_bytes(joined[0][4:6], "little") == 1200
    ip = joined[0][10:]
    if v == 4:
        assert checksum(ip[:20]) == 0
    assert udp_checksum_ok(completed(joined[0]))             # the partial checksum is the pseudo header's
    assert gso.segment_udp(joined[0]) == datagrams(v, [1200] * 9 + [300])


def test_flows_are_joined_apart_and_the_rest_is_left_alone():
    a = datagrams(4, [500] * 3)
    b = datagrams(4, [800] * 2, sport=999)
    other = bytes(10) + b"\x45" + bytes(40)
    bad = bytearray(a[0])
    bad[-1] ^= 1                                            # a wrong checksum: not ours to mend
    reads = [a[0], b[0], other, a[1], b[1], bytes(bad), a[2]]
    out = gso.coalesce_udp(reads)
    # (the bad one is not of the run: the run goes on past it, as GRO's would)
    assert out[2:] == [other, bytes(bad)]
    assert gso.segment_udp(out[0]) == a and gso.segment_udp(out[1]) == b


def test_a_run_ends_at_a_shorter_or_longer_datagram_and_at_the_limits():
    out = gso.coalesce_udp(datagrams(4, [600, 600, 200, 600, 900]))
    assert [len(gso.segment_udp(p) or [p]) for p in out] == [3, 1, 1]
    empty = datagrams(4, [0, 0])
    assert gso.coalesce_udp(empty) == empty
    many = gso.coalesce_udp(datagrams(4, [1000] * 70))
    assert [len(gso.segment_udp(p)) for p in many] == [64, 6]
    big = gso.coalesce_udp(datagrams(4, [1472] * 50))
    assert all(len(p) - 10 <= gso.MAX_IP_PACKET for p in big) and len(big) == 2


def test_a_kernel_without_uso_gets_tso_and_its_tun_cuts_udp_super_packets(monkeypatch):
    calls = []

    def ioctl(fd, request, flags):
        calls.append(flags)
        if flags & (tun.TUN_F_USO4 | tun.TUN_F_USO6):
            raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(tun.fcntl, "ioctl", ioctl)
    device = tun.Tun.__new__(tun.Tun)
    read_end, device.fd = os.pipe()
    try:
        assert device._set_offloads(True) is False and calls[-1] == tun.TSO
        assert device._set_offloads(False) is False and calls[-1] == 0
        device.uso, device.name = False, "t0"
        packet, payloads = super_packet(4, [500] * 3, 500)
        assert device.write_batch([packet, bytes(10) + b"\x45"]) == 0
        written = os.read(read_end, 65536)
        assert len(written) == 3 * (10 + 28 + 500) + 11
    finally:
        os.close(read_end)
        os.close(device.fd)


def test_a_kernel_with_uso_gets_it_with_tso_or_not_at_all(monkeypatch):
    calls = []
    monkeypatch.setattr(tun.fcntl, "ioctl", lambda fd, request, flags: calls.append(flags))
    device = tun.Tun.__new__(tun.Tun)
    device.fd = -1
    assert device._set_offloads(True) is True and calls == [tun.TSO | tun.USO]
    assert device._set_offloads(False) is True and calls[-1] == 0


# ---------------------------------------------------------------- tier 3

@pytest.mark.root
@pytest.mark.parametrize("v", ["4", "6"])
def test_the_kernel_takes_udp_super_packets_whole_and_cut(testbed, v):
    testbed.add_host("h", 1)
    r = testbed.run("h", [sys.executable, str(TOOLS / "uso_roundtrip.py"), v], cwd=SOURCE,
                    env={**os.environ, "PYTHONPATH": str(SOURCE)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"uso": True, "super": True, "cut": 7, "cut_received": True,
                                    "whole_received": True, "fallback_received": True,
                                    "joined": True, "joined_received": True}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    with mesh4_world(tmp_path_factory.mktemp("uso"), c1={"fec": "8:4"}, c2={"offload": False}) as mesh:
        yield mesh


SIZES = {4: "64,1200,1372", 6: "64,1200,1352"}      # the largest: a full 1400-byte packet
COUNT = 300
PORT = 5301


def udp_transfer(mesh, sender: str, receiver: str, address: str, gso: int, rate: int = 3000,
                 lossy: bool = False) -> dict:
    """COUNT datagrams of each size in SIZES from sender to a checking sink on
    receiver: all of them intact and once (lossy: none corrupted or twice,
    at most 1 % missing, UDP having no retransmission to hide a lost message)."""
    sizes = SIZES[6 if ":" in address else 4]
    expected = COUNT * len(sizes.split(","))
    sink = mesh.tb.popen(receiver, lab_module("alpaca.lab.udp_sink", address, PORT, expected),
                         stdout=subprocess.PIPE, text=True, cwd=SOURCE)
    try:
        assert sink.stdout.readline().strip() == "ready"
        r = mesh.peers[sender].run(lab_module("alpaca.lab.udp_send", address, PORT, sizes, COUNT,
                                              "--gso", gso, "--rate", rate), timeout=60, cwd=SOURCE)
        assert r.returncode == 0, r.stderr
        sent = json.loads(r.stdout)
        got = json.loads(sink.stdout.readline())
        sink.wait(10)
    finally:
        if sink.poll() is None:
            mesh.tb.stop(sink)
    assert sent["sent"] == expected
    if lossy:
        assert got["bad"] == 0 and got["received"] == got["distinct"] >= 0.99 * expected, (sent, got)
    else:
        assert got == {"received": expected, "distinct": expected, "bad": 0, "sizes": sent["sizes"]}, (sent, got)
    return got


NET6 = TunnelNet((10, 17), group_prefix6("test"))      # the lab's group


@pytest.mark.root
@pytest.mark.parametrize("gso", [1, 16])
@pytest.mark.parametrize("sender,receiver,address", [
    ("c1", "s1", "10.17.1.1"),       # offloaded both ends, FEC, two paths
    ("s1", "c2", "10.17.16.2"),      # into a TUN without offloads
    ("c2", "s1", "10.17.1.1"),       # from a TUN without offloads
    ("c1", "s1", str(NET6.address6(0x0101))),       # IPv6 inside
    ("s1", "c2", str(NET6.address6(0x1002))),
])
def test_udp_datagrams_cross_intact_and_once(mixed, sender, receiver, address, gso):
    udp_transfer(mixed, sender, receiver, address, gso)


@pytest.mark.root
def test_udp_segment_writes_travel_as_super_packets(mixed):
    before = mixed.peers["c1"].peer_status("1.1")
    udp_transfer(mixed, "c1", "s1", "10.17.1.1", 16)
    after = mixed.peers["c1"].peer_status("1.1")
    messages = after["tx_packets"] - before["tx_packets"]
    # 16 datagrams per write: one message each (with some keepalive-sized ones)
    assert messages < 3 * COUNT / 16 * 2, (messages, before, after)
    assert "Traceback" not in mixed.peers["s1"].log_text()


@pytest.mark.root
def test_datagrams_written_one_by_one_are_joined_into_super_packets(mixed):
    before = mixed.peers["c1"].peer_status("1.1")
    udp_transfer(mixed, "c1", "s1", "10.17.1.1", 1, rate=0)     # a burst: reads of many datagrams
    after = mixed.peers["c1"].peer_status("1.1")
    messages = after["tx_packets"] - before["tx_packets"]
    assert messages < 3 * COUNT / 2, (messages, before, after)


INET = "172.31.200.2"


@pytest.fixture(scope="module")
def natted(tmp_path_factory):
    """Server 1.1 NATs client 16.1 out to "inet", a host that has no route to the tunnel."""
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path_factory.mktemp("uso-nat"))
    try:
        s1_ip = tb.add_host("s1", 1)
        tb.add_host("c1", 16)
        tb.add_link("s1", "inet", "172.31.200.1", INET)
        # the server's kernel computes every checksum toward inet itself, and
        # inet checks them: a wrong partial checksum would be dropped there
        tb.run("s1", ["ethtool", "-K", "eth1", "tx", "off"], check=True)
        tb.run("c1", ["ip", "route", "add", "default", "via", "172.31.77.254"], check=True)
        everyone = [mesh.line("1.1", s1_ip), mesh.line("16.1", None)]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, everyone)
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, everyone)
        mesh.start_all()
        assert wait_for(lambda: tb.run("c1", ["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 15)
        yield mesh
    finally:
        mesh.close()


@pytest.mark.root
@pytest.mark.parametrize("gso", [1, 16])
def test_udp_super_packets_leave_through_the_servers_nat_intact(natted, gso):
    # the server's kernel forwards each super-packet out of the TUN, NATs it
    # and cuts it, completing the checksums the client's TUN left partial
    udp_transfer(natted, "c1", "inet", INET, gso, rate=0)      # a burst: reads of many datagrams, joined
    errors = natted.tb.run("inet", ["nstat", "-az", "UdpInCsumErrors"]).stdout.split()
    assert errors[-2] == "0", errors


@pytest.mark.root
@pytest.mark.parametrize("gso", [1, 16])
def test_udp_super_packets_cross_a_lossy_path_with_fec(tmp_path, gso):
    # 5 % of the datagrams lost each way; the default `fec: "auto"` gives the
    # joined messages parity for it (a lost shard alone would lose them whole)
    with lossy_pair(tmp_path, 0.05, {}, {}) as mesh:
        assert wait_for(lambda: mesh.tb.run("c1", ["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 15)
        udp_transfer(mesh, "c1", "s1", "10.17.1.1", gso, rate=0 if gso == 1 else 3000, lossy=True)
        row = next(p for p in mesh.peers["s1"].status()["peers"] if p["id"] == "16.1")
        assert row["drops"].get("bad_shard", 0) == 0, row
