"""Tier 3: a multi-homed server answers each client from the address the
client sent to (IP_PKTINFO, alpaca/host/udp.py).

    c2 (16.2) ----------- bridge ---- s1 (1.1) eth0: 172.31.77.1, secondary 172.31.77.101
                            |
    c1 (16.1) --- r (NAT) --+   r: 172.31.77.254 on the bridge, 10.99.0.1 towards c1

Client 16.1 knows the server at its secondary address 172.31.77.101 and
reaches it through r, which masquerades. A reply from the primary address
(the kernel's choice of source for 172.31.77.254) matches no connection on
r and is dropped there, so without the reply source the tunnel is dead
(0 of 5 pings). Client 16.2 knows the primary address at the same time: the
server keeps listening on all of its addresses.
"""

from __future__ import annotations

import re

import pytest

from alpaca.lab.daemons import Mesh
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root

SECONDARY = "172.31.77.101"


def sh(tb: Testbed, host: str, *argv: str) -> None:
    r = tb.run(host, list(argv))
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr}"


def ping(peer, address: str, count: int) -> int:
    r = peer.run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", address], timeout=60)
    return int(re.search(r"(\d+) received", r.stdout).group(1)) if "received" in r.stdout else 0


@pytest.fixture
def behind_nat(tmp_path):
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path)
    try:
        primary = tb.add_host("s1", 1)
        sh(tb, "s1", "ip", "addr", "add", f"{SECONDARY}/24", "dev", "eth0")
        tb.add_host("r", 254)
        tb.add_link("r", "c1", "10.99.0.1", "10.99.0.2")
        tb.hosts["c1"] = "10.99.0.2"                    # not on the bridge: Mesh.add leaves it so
        sh(tb, "c1", "ip", "route", "add", "default", "via", "10.99.0.1")
        sh(tb, "r", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(tb, "r", "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
        c1, c2 = mesh.line("16.1", None), mesh.line("16.2", None)
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, [mesh.line("1.1", primary), c1, c2])
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, [mesh.line("1.1", SECONDARY), c1])
        mesh.add("c2", 17, {"id": "16.2", "mode": "client", "gateway": "1.1"}, [mesh.line("1.1", primary), c2])
        mesh.start_all()
        yield mesh
    finally:
        mesh.close()        # the namespaces go, and the NAT rule with r's


def test_a_client_behind_nat_at_the_secondary_address_gets_replies_from_it(behind_nat):
    mesh = behind_nat
    s1, c1, c2 = mesh.peers["s1"], mesh.peers["c1"], mesh.peers["c2"]
    # the daemons run: the server has proven client 16.2's session (a round trip)
    assert wait_for(lambda: s1.peer_status("16.2")["up"], 15), s1.status()["peers"]
    # a client takes the server's datagrams only from the second after its
    # start on (replay floor): the first answered ping says the way is open
    for client in (c2, c1):
        wait_for(lambda: ping(client, "10.17.1.1", 1) == 1, 15)
    assert ping(c2, "10.17.1.1", 5) == 5
    assert ping(c1, "10.17.1.1", 5) == 5, (c1.peer_status("1.1"), s1.peer_status("16.1"))
    # the server's status names the address each path is answered from
    paths = {p["id"]: p["paths"] for p in s1.status()["peers"]}
    assert [p["local"] for p in paths["16.1"]] == [SECONDARY], paths
    assert [p["local"] for p in paths["16.2"]] == [mesh.tb.hosts["s1"]], paths
    assert [p["address"] for p in c1.peer_status("1.1")["paths"]] == [f"{SECONDARY}:1040"]
