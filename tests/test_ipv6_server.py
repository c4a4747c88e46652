"""Tier 3: a server forwards and NATs IPv6 (config `net6`), like IPv4.

World: server 1.1 (s1) and clients 16.1 (c1) and 16.2 (c2), gateway 1.1, on
one bridge; behind s1 a second link to "x", an internet host with only a
global IPv6 address (2001:db8:99::1) and no route to the tunnel.
"""

from __future__ import annotations

import signal

import pytest

from alpaca.lab.daemons import PY, SOURCE, Mesh
from alpaca.lab.mesh import secrets_line
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for
from alpaca.protocol.ids import TunnelNet, group_prefix6

pytestmark = pytest.mark.root

NET6 = TunnelNet((10, 17), group_prefix6("test"))
C1, C2 = str(NET6.address6(0x1001)), str(NET6.address6(0x1002))
X, S1_UPLINK = "2001:db8:99::1", "2001:db8:99::2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path_factory.mktemp("ipv6srv"))
    try:
        ip = {name: tb.add_host(name, n) for name, n in (("s1", 1), ("c1", 16), ("c2", 17))}
        keys = {peer: mesh.key(peer) for peer in ("1.1", "16.1", "16.2")}
        server = secrets_line("1.1", keys["1.1"], ip["s1"])
        clients = [secrets_line(p, keys[p], None) for p in ("16.1", "16.2")]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, [server, *clients])
        for name, peer, line in (("c1", "16.1", clients[0]), ("c2", "16.2", clients[1])):
            mesh.add(name, 0, {"id": peer, "mode": "client", "gateway": "1.1"}, [server, line])
        tb.add_link("s1", "x", S1_UPLINK, X, prefixlen=64)
        # a server that takes its IPv6 setup from router advertisements (the namespace default is 1 too)
        sh(tb, "s1", "echo 1 > /proc/sys/net/ipv6/conf/eth0/accept_ra")
        mesh.start_all()
        for client in ("c1", "c2"):
            assert wait_for(lambda: tb.run(client, ["ping", "-n", "-c", "1", "-W", "1", "10.17.1.1"])
                            .returncode == 0, 15), mesh.peers[client].log_text()
            # (the IPv6 internet: the client's own IPv6 default route into the tunnel, tests/test_ipv6_client.py)
        yield mesh
    finally:
        mesh.close()


def sh(tb: Testbed, host: str, cmd: str) -> str:
    r = tb.run(host, ["sh", "-c", cmd])
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def ping6(mesh: Mesh, host: str, address: str) -> str:
    r = mesh.tb.run(host, ["ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "2", address], timeout=20)
    return r.stdout


def server_state(tb: Testbed) -> dict:
    """What the server daemon changes on its host, IPv6 side."""
    rules = [l for l in sh(tb, "s1", "ip6tables-legacy-save").splitlines() if "alpaca-tunnel" in l]
    routes = sh(tb, "s1", "ip -6 route show")
    return {"rules": rules,
            "forwarding": sh(tb, "s1", "cat /proc/sys/net/ipv6/conf/all/forwarding").strip(),
            "accept_ra": sh(tb, "s1", "cat /proc/sys/net/ipv6/conf/eth0/accept_ra").strip(),
            "default_accept_ra": sh(tb, "s1", "cat /proc/sys/net/ipv6/conf/default/accept_ra").strip(),
            "tunnel_route": str(NET6.network6) in routes}


def test_client_to_client_over_ipv6_through_the_server(world):
    for host, address in (("c1", C2), ("c2", C1)):
        out = ping6(world, host, address)
        assert " 0% packet loss" in out, (host, out)
    world.transfer("c1", "c2", C2, size=2 << 20)          # SHA-256 checked


def test_an_ipv6_only_internet_host_through_the_servers_nat6(world):
    """x has no route to the tunnel: it answers because s1 masquerades
    the client's tunnel address to its uplink address."""
    assert " 0% packet loss" in ping6(world, "c1", X)
    assert world.source_seen("c1", "x", X) == S1_UPLINK
    state = server_state(world.tb)
    assert state["forwarding"] == "1" and state["accept_ra"] == "2" and state["default_accept_ra"] == "2"
    assert any("MASQUERADE" in l and str(NET6.network6) in l for l in state["rules"]), state


def test_stopping_leaves_no_ipv6_rule_sysctl_or_route_behind(world):
    """SIGTERM undoes everything; after SIGKILL, `alpaca-tunnel cleanup` does."""
    s1 = world.peers["s1"]
    clean = {"rules": [], "forwarding": "0", "accept_ra": "1", "default_accept_ra": "1", "tunnel_route": False}
    assert s1.stop(signal.SIGTERM) == 0
    assert server_state(world.tb) == clean
    s1.start()
    assert wait_for(lambda: server_state(world.tb)["rules"], 10), s1.log_text()
    assert wait_for(lambda: s1.control_socket.exists(), 10)
    assert s1.stop(signal.SIGKILL) == -9
    left = server_state(world.tb)
    assert left["rules"] and left["forwarding"] == "1" and left["accept_ra"] == "2"
    r = s1.run([PY, "-m", "alpaca", "-C", str(s1.config_path), "cleanup"], cwd=SOURCE)
    assert r.returncode == 0, r.stderr
    state = server_state(world.tb)
    assert state == {**clean, "tunnel_route": state["tunnel_route"]}
    # (a SIGKILLed daemon's TUN goes with its process; its route with it)
    assert wait_for(lambda: not server_state(world.tb)["tunnel_route"], 5)
