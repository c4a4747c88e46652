"""Tier 3: real daemons in network namespaces, real TUN devices, real traffic.

Topology (alpaca.lab.worlds.mesh4_world): servers 1.1 and 1.2, client 16.1 with gateway 1.1
and forwarders [1.1, 1.2], client 16.2 with gateway 1.1, all on one bridge.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from alpaca.lab.daemons import PY

from alpaca.lab.testbed import wait_for

pytestmark = pytest.mark.root
TOOLS = Path(__file__).parent / "tools"


def ping(peer, address: str, count: int = 10, interval: float = 0.05):
    r = peer.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", address], timeout=60)
    received = int(re.search(r"(\d+) received", r.stdout).group(1)) if "received" in r.stdout else 0
    return r, received


def test_ping_through_forwarders_without_duplicates(mesh4):
    c1 = mesh4.peers["c1"]
    # both ways to the gateway proven (until then a way carries no more than
    # it brought, so a copy may not go): status says so per path
    via_12 = f"{mesh4.ip['s2']}:1040"
    assert wait_for(lambda: any(p["address"] == via_12 and p["proven"] and p.get("delivers")
                                for p in c1.peer_status("1.1")["paths"]), 15), c1.peer_status("1.1")
    r, received = ping(c1, "10.17.1.1", count=20)
    assert received == 20, r.stdout
    # both paths carry every packet, so both ends see copies; none reach ping
    assert "DUP!" not in r.stdout
    # the gateway got a second copy of each through forwarder 1.2
    s1 = mesh4.peers["s1"].peer_status("16.1")
    assert s1["drops"].get("duplicate", 0) >= 20, s1


def test_tcp_transfer_checksum(mesh4):
    """8 MiB over TCP from client 16.1 to server 1.1 arrive intact."""
    mesh4.transfer("c1", "s1", "10.17.1.1", size=8 << 20)


def test_client_to_client_through_server(mesh4):
    r, received = ping(mesh4.peers["c1"], "10.17.16.2", count=5)
    assert received == 5, r.stdout
    r, received = ping(mesh4.peers["c2"], "10.17.16.1", count=5)
    assert received == 5, r.stdout


@pytest.mark.parametrize("cut", ["1.1", "1.2"])
def test_survives_cutting_one_path(mesh4, cut):
    """Client 16.1 reaches its gateway directly and through forwarder 1.2:
    dropping either path at the client loses nothing."""
    c1 = mesh4.peers["c1"]
    ip = mesh4.ip["s1" if cut == "1.1" else "s2"]
    rules = [["-I", "INPUT", "-s", ip, "-j", "DROP"], ["-I", "OUTPUT", "-d", ip, "-j", "DROP"]]
    for rule in rules:
        c1.run(["iptables-legacy", *rule], check=True)
    try:
        r, received = ping(c1, "10.17.1.1", count=20)
        assert received == 20, r.stdout
        assert "DUP!" not in r.stdout
        if cut == "1.1":
            paths = mesh4.peers["s1"].peer_status("16.1")["paths"]
            assert any(p["learned"] == "relayed" and p["address"].startswith(mesh4.ip["s2"]) for p in paths), paths
    finally:
        for rule in rules:
            c1.run(["iptables-legacy", "-D", *rule[1:]], check=True)


def test_replay_and_garbage_never_reach_tun(mesh4):
    s1, c2 = mesh4.peers["s1"], mesh4.peers["c2"]
    # capture real datagrams from 16.2 arriving at 1.1 (16.2 has no forwarders,
    # so no copies of its own reach 1.1 and the duplicate counts below are exact)
    sniffer = mesh4.tb.popen("s1", [PY, str(TOOLS / "sniff_datagrams.py"), "eth0", "1040", "20", "10",
                                    mesh4.ip["c2"]],
                             stdout=__import__("subprocess").PIPE, text=True)
    assert sniffer.stdout.readline().strip() == "ready"
    ping(c2, "10.17.1.1", count=5)
    captured = [bytes.fromhex(line) for line in sniffer.stdout.read().split()]
    sniffer.wait(15)
    assert captured
    time.sleep(0.5)   # let in-flight copies settle
    before_tun = mesh4.tb.link_stats("s1", "alpaca")["rx_packets"]
    before = s1.peer_status("16.2")
    before_global = s1.status()["drops"]
    garbage = [os.urandom(n) for n in (0, 1, 41, 42, 43, 100, 1400)] * 10
    flipped = []
    for d in captured[:5]:
        for i in range(2, len(d), 7):
            b = bytearray(d)
            b[i] ^= 0x40
            flipped.append(bytes(b))
    r = c2.run([PY, str(TOOLS / "send_udp.py"), mesh4.ip["s1"], "1040"],
               input="\n".join(x.hex() for x in captured + garbage + flipped + captured), timeout=30)
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    after = s1.peer_status("16.2")
    assert mesh4.tb.link_stats("s1", "alpaca")["rx_packets"] == before_tun
    # only keepalives (one per 4 s) may have been accepted meanwhile
    assert after["rx_packets"] - before["rx_packets"] <= 2
    replays = sum(after["drops"].get(k, 0) - before["drops"].get(k, 0) for k in ("duplicate", "replay"))
    assert replays == 2 * len(captured)
    after_global = s1.status()["drops"]
    unauth = sum(after_global.get(k, 0) - before_global.get(k, 0) for k in ("malformed", "wrong_version", "auth_failure", "unknown_peer"))
    assert unauth == len(garbage) + len(flipped)
    # the daemon survives and still carries traffic
    assert s1.proc.poll() is None
    r, received = ping(c2, "10.17.1.1", count=3)
    assert received == 3, r.stdout
    assert "Traceback" not in s1.log_text()


def test_a_policy_route_to_another_peer_carries_a_connections_first_packet(mesh4):
    """docs/protocol.md §6 "Route lookup": a user rule sends 192.0.2.0/24
    to server 1.2 instead of the gateway 1.1. The core holds a packet to a
    new destination until the daemon has asked the kernel, so the very
    first ping already goes to 1.2 (through 1.1 it would die: 1.1 has no
    route to 192.0.2.5; 1.2 has it on its loopback)."""
    c1, s2 = mesh4.peers["c1"], mesh4.peers["s2"]
    added = []
    try:
        for host, argv in (("s2", ["addr", "add", "192.0.2.5/32", "dev", "lo"]),
                           ("c1", ["route", "add", "default", "via", "10.17.1.2", "dev", "alpaca", "table", "200"]),
                           ("c1", ["rule", "add", "to", "192.0.2.0/24", "lookup", "200", "pref", "1000"])):
            mesh4.peers[host].run(["ip", *argv], check=True)
            added.append((host, argv))
        before = s2.peer_status("16.1")["rx_packets"]
        r, received = ping(c1, "192.0.2.5", count=1)
        assert received == 1, r.stdout
        assert s2.peer_status("16.1")["rx_packets"] > before
        r, received = ping(c1, "192.0.2.5", count=3)
        assert received == 3, r.stdout
    finally:
        for host, argv in reversed(added):
            mesh4.peers[host].run(["ip", argv[0], "del", *argv[2:]])


def test_a_tunnel_address_no_peer_has_is_refused_at_once(mesh4):
    """docs/protocol.md §6: ICMP host unreachable, as WireGuard answers; a
    client's connect() fails at once instead of after its SYN timeouts."""
    r = mesh4.peers["c1"].run(["ping", "-n", "-c", "1", "-W", "3", "10.17.16.99"], timeout=10)
    assert r.returncode != 0 and "From 10.17.1.1" in r.stdout and "Destination Host Unreachable" in r.stdout, r.stdout
    r = mesh4.peers["s1"].run(["ping", "-n", "-c", "1", "-W", "3", "10.17.16.99"], timeout=10)
    assert "From 10.17.16.99" in r.stdout and "Destination Host Unreachable" in r.stdout, r.stdout
    connect = ("import socket, time\nt = time.monotonic()\n"
               "try:\n    socket.create_connection(('10.17.16.99', 80), timeout=10)\n"
               "except OSError as e:\n    print(e.errno, round(time.monotonic() - t, 1))")
    r = mesh4.peers["c1"].run([PY, "-c", connect], timeout=20)
    errno, seconds = r.stdout.split()
    assert errno == "113" and float(seconds) < 3, r.stdout       # EHOSTUNREACH
    # IPv6 (net6): ICMPv6 address unreachable, from the gateway and on the server itself
    from alpaca.protocol.ids import TunnelNet, group_prefix6
    nobody6 = str(TunnelNet((10, 17), group_prefix6("test")).address6(0x1063))      # 16.99
    for peer in ("c1", "s1"):
        r = mesh4.peers[peer].run(["ping", "-6", "-n", "-c", "1", "-W", "3", nobody6], timeout=10)
        assert r.returncode != 0 and "Address unreachable" in r.stdout, (peer, r.stdout)


def test_ipv6_inside_the_tunnel_between_a_client_and_its_gateway(mesh4):
    """Every peer has <net6>::a:b on its TUN (net6 "auto": a unique local
    /64 from the group), and IPv6 packets route by the ID in it."""
    from alpaca.protocol.ids import TunnelNet, group_prefix6
    net = TunnelNet((10, 17), group_prefix6("test"))
    s1_v6, c1_v6 = str(net.address6(0x0101)), str(net.address6(0x1001))
    assert mesh4.peers["c1"].peer_status("1.1")["address6"] == s1_v6
    for peer, address in (("c1", s1_v6), ("s1", c1_v6)):
        r = mesh4.peers[peer].run(["ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "2", address], timeout=20)
        assert " 0% packet loss" in r.stdout, (peer, r.stdout, r.stderr)
    r = mesh4.peers["c1"].run([PY, "-c", f"import socket; s = socket.create_connection(('{s1_v6}', 22), 3)"])
    assert "refused" in r.stderr.lower(), r.stderr                 # TCP over IPv6 reaches 1.1's stack
