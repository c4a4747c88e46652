"""Tier 3: real daemons over a path MTU black hole (docs/protocol.md §6 "Path MTU").

The server's port on the lab's bridge has MTU 1400: the veth drops bigger
frames from the server without a word (no ICMP at all), so its full-size datagrams
(1,452 bytes of UDP at the default `mtu` 1400, 1,480 on the wire) vanish
while keepalives and challenges pass: a black hole like PPPoE or a mobile
link behind a firewall that eats ICMP. The server finds it with its probes
and sends shards that fit, so TCP through the tunnel completes both ways.
"""

from __future__ import annotations

import pytest
from pyroute2 import NetNS

from alpaca.lab.daemons import PY, SOURCE, Mesh
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root

UNDERLAY_MTU = 1400
LARGEST_UDP = UNDERLAY_MTU - 28         # IPv4 and UDP headers


@pytest.fixture
def black_hole(tmp_path):
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path)
    try:
        ip = {"s1": tb.add_host("s1", 1), "c1": tb.add_host("c1", 16)}
        servers = [mesh.line("1.1", ip["s1"])]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, servers + [mesh.line("16.1", None)])
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, servers + [mesh.line("16.1", None)])
        for host in ("s1", "c1"):       # one frame per datagram, so the bridge judges each by its size
            tb.run(host, ["ethtool", "-K", "eth0", "gso", "off", "tso", "off", "gro", "off",
                          "tx-udp-segmentation", "off"])
        with NetNS(tb.hub) as hub:
            port = hub.link_lookup(ifname=f"{tb.prefix}v1")[0]       # s1's port on the bridge
            hub.link("set", index=port, mtu=UNDERLAY_MTU)
        mesh.start_all()
        assert wait_for(lambda: any(p["up"] for p in mesh.peers["s1"].status()["peers"]), 20)
        assert wait_for(lambda: mesh.peers["c1"].run(
            ["ping", "-n", "-c", "1", "-W", "1", "10.17.1.1"]).returncode == 0, 10)
        yield mesh
    finally:
        mesh.close()


def limit_of(daemon, peer_id: str) -> int | None:
    paths = daemon.peer_status(peer_id)["paths"]
    return min((p["max_datagram"] for p in paths if p.get("max_datagram")), default=None)


def test_tcp_over_a_path_mtu_black_hole_completes_and_status_shows_the_size(black_hole):
    mesh = black_hole
    s1 = mesh.peers["s1"]
    mesh.transfer("c1", "s1", "10.17.1.1", size=2 << 20)        # sha256-checked
    mesh.transfer("s1", "c1", "10.17.16.1", size=2 << 20)
    # (the bridge passes big frames towards s1; s1's big frames die at its port: the hole is s1 -> c1)
    assert LARGEST_UDP - 16 <= limit_of(s1, "16.1") <= LARGEST_UDP
    assert "path MTU black hole" in s1.log_text()
    text = s1.run([PY, "-m", "alpaca", "-C", str(s1.config_path), "status"], cwd=SOURCE).stdout
    assert "path MTU: datagrams of at most" in text, text

