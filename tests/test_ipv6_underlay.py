"""Tier 3: the IPv6 underlay (docs/operations.md "IPv6 underlay").

1. The standard mesh (alpaca.lab.worlds.mesh4_world) on an underlay with no
   IPv4 at all: servers 1.1 and 1.2 listed only by their ip6 column. It
   works as the IPv4 mesh does (tests/test_mesh.py): direct, through
   forwarder 1.2, client to client through the gateway, TCP intact.
2. A dual-stack pair: server 1.1 listed with both ip and ip6, so client
   16.1 reaches it on two paths at once (one per family). Cutting either
   family in the middle of a TCP transfer loses nothing: the other path
   carries the same connection on (SHA-256 compared, one connection).
"""

from __future__ import annotations

import re

import pytest

from alpaca.lab.testbed import wait_for
from alpaca.lab.worlds import dual_stack_pair, mesh4_world

pytestmark = pytest.mark.root


def ping(peer, address: str, count: int = 10, interval: float = 0.05):
    r = peer.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", address], timeout=60)
    received = int(re.search(r"(\d+) received", r.stdout).group(1)) if "received" in r.stdout else 0
    return r, received


# ---------------------------------------------------------------- an IPv6-only underlay

@pytest.fixture(scope="module")
def mesh6(tmp_path_factory):
    with mesh4_world(tmp_path_factory.mktemp("mesh6"), families=("6",)) as mesh:
        yield mesh


def test_the_ipv6_only_underlay_has_no_ipv4_and_every_path_is_ipv6(mesh6):
    c1 = mesh6.peers["c1"]
    r = c1.run(["ip", "-4", "addr", "show", "dev", "eth0"])
    assert "inet " not in r.stdout, r.stdout
    s1_at = f"[{mesh6.tb.hosts6['s1']}]:1040"
    paths = c1.peer_status("1.1")["paths"]
    assert any(p["address"] == s1_at and p["learned"] == "static" for p in paths), paths
    assert all(p["family"] == "ipv6" for p in paths), paths
    # the server learned the client's IPv6 source (after authenticating it)
    learned = mesh6.peers["s1"].peer_status("16.1")["paths"]
    assert any(p["address"] == f"[{mesh6.tb.hosts6['c1']}]:1040" and p["learned"] == "direct"
               for p in learned), learned
    assert "[::]:1040" in c1.status()["listen"]


def test_ipv6_underlay_direct_and_through_the_forwarder(mesh6):
    """c1 reaches its gateway directly and through forwarder 1.2, both over
    IPv6: every ping arrives once, and the gateway sees the second copies."""
    c1 = mesh6.peers["c1"]
    via_12 = f"[{mesh6.tb.hosts6['s2']}]:1040"
    assert wait_for(lambda: any(p["address"] == via_12 and p["proven"] and p.get("delivers")
                                for p in c1.peer_status("1.1")["paths"]), 15), c1.peer_status("1.1")
    r, received = ping(c1, "10.17.1.1", count=20)
    assert received == 20 and "DUP!" not in r.stdout, r.stdout
    s1 = mesh6.peers["s1"].peer_status("16.1")
    assert s1["drops"].get("duplicate", 0) >= 20, s1


def test_ipv6_underlay_survives_cutting_the_direct_path(mesh6):
    """Dropping the direct IPv6 path between c1 and s1 leaves the way through
    forwarder 1.2, which s1 then knows as a relayed path."""
    c1 = mesh6.peers["c1"]
    ip = mesh6.tb.hosts6["s1"]
    rules = [["-I", "INPUT", "-s", ip, "-j", "DROP"], ["-I", "OUTPUT", "-d", ip, "-j", "DROP"]]
    for rule in rules:
        c1.run(["ip6tables-legacy", *rule], check=True)
    try:
        r, received = ping(c1, "10.17.1.1", count=20)
        assert received == 20 and "DUP!" not in r.stdout, r.stdout
        paths = mesh6.peers["s1"].peer_status("16.1")["paths"]
        assert any(p["learned"] == "relayed" and p["address"] == f"[{mesh6.tb.hosts6['s2']}]:1040"
                   for p in paths), paths
    finally:
        for rule in rules:
            c1.run(["ip6tables-legacy", "-D", *rule[1:]], check=True)


def test_ipv6_underlay_client_to_client_and_tcp(mesh6):
    r, received = ping(mesh6.peers["c1"], "10.17.16.2", count=5)
    assert received == 5, r.stdout
    r, received = ping(mesh6.peers["c2"], "10.17.16.1", count=5)
    assert received == 5, r.stdout
    mesh6.transfer("c2", "s1", "10.17.1.1", size=4 << 20)


# ---------------------------------------------------------------- dual stack: one family cut mid-transfer

@pytest.fixture
def dual_pair(tmp_path):
    with dual_stack_pair(tmp_path) as mesh:
        yield mesh


CUT_AFTER = 0.3       # seconds into the transfer


@pytest.mark.parametrize("cut", ["ipv4", "ipv6"])
def test_cutting_one_family_mid_transfer_keeps_the_connection(dual_pair, cut):
    mesh = dual_pair
    c1 = mesh.peers["c1"]
    tool, server = (("iptables-legacy", mesh.tb.hosts["s1"]) if cut == "ipv4"
                    else ("ip6tables-legacy", mesh.tb.hosts6["s1"]))
    seconds, dropped = mesh.transfer_cut("c1", "s1", "10.17.1.1", 48 << 20, tool, server, CUT_AFTER)
    # one connection carried all of it (the sink accepts one), and it was
    # still sending when the cut came: the rule dropped datagrams of it
    assert seconds > CUT_AFTER and dropped > 100, (seconds, dropped)
    families = {p["family"]: p for p in c1.peer_status("1.1")["paths"]}
    assert set(families) == {"ipv4", "ipv6"}, families
