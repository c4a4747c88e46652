"""Tier 3: bulk spread over two lossy paths (docs/protocol.md §13 "Spreading").

A dual-stack pair (server 1.1 listed with ip and ip6, so the client has two
paths, one per family) whose underlay loses 30 % of the tunnel's datagrams
each way on both families (iptables-legacy and ip6tables-legacy statistic,
veth offloads off). The client's first transfer finds both paths lossy and
switches its bulk to spreading: each shard on one path, parity for one
path's loss. Then one family is cut in the middle of a transfer: the quiet
path gets no more blocks within SPREAD_HEARD, every shard goes on every
path again, and the connection carries on intact.
"""

from __future__ import annotations

import threading
import time

import pytest

from alpaca.lab.daemons import Mesh
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root

LOSS = ["INPUT", "-p", "udp", "--dport", "1040", "-m", "statistic", "--mode", "random",
        "--probability", "0.3", "-j", "DROP"]
TOOLS = ("iptables-legacy", "ip6tables-legacy")


@pytest.fixture
def lossy_dual_pair(tmp_path):
    tb = Testbed(unique_prefix(), families=("4", "6"))
    mesh = Mesh(tb, tmp_path)
    ruled = []
    try:
        tb.add_host("s1", 1)
        tb.add_host("c1", 16)
        server = mesh.line("1.1", tb.hosts["s1"], tb.hosts6["s1"])
        client = mesh.line("16.1", None)
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, [server, client])
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, [server, client])
        for host in ("s1", "c1"):
            tb.run(host, ["ethtool", "-K", "eth0", "gso", "off", "tso", "off", "gro", "off",
                          "tx-udp-segmentation", "off"])
            for tool in TOOLS:
                tb.run(host, [tool, "-I", *LOSS], check=True)
                ruled.append((host, tool))
        mesh.start_all()
        assert wait_for(lambda: {p["family"] for p in mesh.peers["s1"].peer_status("16.1")["paths"]}
                        == {"ipv4", "ipv6"}, 20)
        yield mesh
    finally:
        for host, tool in ruled:
            tb.run(host, [tool, "-D", *LOSS])
        mesh.close()


def test_two_lossy_paths_spread_bulk_and_a_path_lost_mid_transfer_loses_nothing(lossy_dual_pair):
    mesh = lossy_dual_pair
    c1 = mesh.peers["c1"]
    mesh.transfer("c1", "s1", "10.17.1.1", size=16 << 20)
    assert wait_for(lambda: c1.peer_status("1.1")["spread"], 5), c1.peer_status("1.1")
    peer = c1.peer_status("1.1")
    assert 0.15 < peer["loss"] < 0.5, peer              # one path's loss, not the union's ~9 %
    assert peer["parity"] >= 30, peer
    assert "bulk spread over 2 paths" in c1.log_text()

    # cut IPv6 both ways half a second into a transfer
    cut = [["INPUT", "-s", mesh.tb.hosts6["s1"], "-j", "DROP"], ["OUTPUT", "-d", mesh.tb.hosts6["s1"], "-j", "DROP"]]
    result: dict = {}

    def transfer() -> None:
        try:
            result["seconds"] = mesh.transfer("c1", "s1", "10.17.1.1", size=64 << 20)
        except Exception as e:          # (re-raised in the test's thread)
            result["error"] = e

    sender = threading.Thread(target=transfer)
    sender.start()
    try:
        time.sleep(0.5)
        for rule in cut:
            c1.run(["ip6tables-legacy", "-I", *rule], check=True)
        sender.join(120)
        counters = c1.run(["ip6tables-legacy", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    finally:
        sender.join(120)
        for rule in cut:
            c1.run(["ip6tables-legacy", "-D", *rule])
    if "error" in result:
        raise result["error"]
    dropped = int(next(line.split()[0] for line in counters.splitlines() if "DROP" in line and "0.3" not in line))
    assert result["seconds"] > 0.5 and dropped > 100, (result, counters)
