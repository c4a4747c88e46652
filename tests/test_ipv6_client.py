"""Tier 3: a client that takes the default route takes it for IPv6 too (docs/operations.md "Client
routing", "IPv6"): into the tunnel when the tunnel carries IPv6, blocked when it does not (block_ipv6),
and the kill switch blocks it while the daemon is dead. Nothing IPv6 leaves on the uplink outside the tunnel.

    s1 (server 1.1), c1 (client 16.1, net6 auto), c2 (client 16.2, net6 "off") and wan on one bridge:
    IPv4 172.31.77.0/24 (the tunnel's underlay) and IPv6 2001:db8:77::/64 (the LAN). wan is everyone's
    original gateway, IPv4 and IPv6, and holds the "internet" address 2001:db8:99::1.

Through the tunnel c1's IPv6 reaches 2001:db8:99::1 from s1's address (s1's NAT6); straight out of its
uplink it would come from c1's own: that is the leak. An AF_PACKET watcher on c1's (c2's) uplink
(alpaca.lab.ipv6_capture) sees every IPv6 packet there; pings to wan's LAN address show that it sees them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess

import pytest

from alpaca.host import routes
from alpaca.lab.daemons import PY, SOURCE, Mesh, lab_module
from alpaca.lab.ipv6_capture import parse
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root

INTERNET6 = "2001:db8:99::1"
LAN6 = ipaddress.IPv6Network("2001:db8:77::/64")
WAN6 = "2001:db8:77::254"
HOSTS6 = {"s1": "2001:db8:77::1", "c1": "2001:db8:77::16", "c2": "2001:db8:77::17", "wan": WAN6}
WAN4 = "172.31.77.254"
TAG = f"proto {routes.ALPACA_RTPROTO}"


def sh(tb: Testbed, host: str, cmd: str) -> str:
    r = tb.run(host, ["sh", "-c", cmd])
    assert r.returncode == 0, f"{host}: {cmd}: {r.stderr}"
    return r.stdout


def ipv6_state(tb: Testbed, host: str) -> str:
    """IPv6 routes (not the local table: link-local addresses come and go), rules and ip6tables rules."""
    routes6 = [line for line in sh(tb, host, "ip -6 route show table all").splitlines(True)
               if " table local " not in line]
    rules6 = [line for line in sh(tb, host, "ip6tables-legacy-save").splitlines(True) if "alpaca-tunnel" in line]
    return "".join(routes6) + sh(tb, host, "ip -6 rule show") + "".join(rules6)


def tagged6(tb: Testbed, host: str) -> list[str]:
    return [line for line in ipv6_state(tb, host).splitlines() if TAG in line]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path_factory.mktemp("ipv6client"))
    try:
        ip = {name: tb.add_host(name, n) for name, n in (("s1", 1), ("c1", 16), ("c2", 17), ("wan", 254))}
        for host, address in HOSTS6.items():
            sh(tb, host, f"ip -6 addr add {address}/64 dev eth0 nodad")
            if host != "wan":
                sh(tb, host, f"ip route add default via {WAN4} && ip -6 route add default via {WAN6}")
        sh(tb, "wan", f"ip -6 addr add {INTERNET6}/128 dev lo")
        everyone = [mesh.line("1.1", ip["s1"]), mesh.line("16.1", None), mesh.line("16.2", None)]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, everyone)
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, everyone[:2])
        mesh.add("c2", 17, {"id": "16.2", "mode": "client", "gateway": "1.1", "net6": "off"},
                 [everyone[0], everyone[2]])
        mesh.before = {host: ipv6_state(tb, host) for host in ("c1", "c2")}
        mesh.start_all()
        for client in ("c1", "c2"):
            assert wait_for(lambda: ping(tb, client, "10.17.1.1"), 15), mesh.peers[client].log_text()
        yield mesh
    finally:
        mesh.close()


def ping(tb: Testbed, host: str, address: str, count: int = 1) -> subprocess.CompletedProcess | None:
    """A successful ping, or None."""
    r = tb.run(host, ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", address], timeout=20)
    return r if r.returncode == 0 else None


@contextlib.contextmanager
def uplink_capture(tb: Testbed, host: str):
    """The IPv6 packets on host's eth0 while the block runs: a list, filled when it ends."""
    seen: list = []
    proc = tb.popen(host, lab_module("alpaca.lab.ipv6_capture", "eth0"), stdout=subprocess.PIPE, text=True,
                    cwd=SOURCE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield seen
    finally:
        tb.stop(proc)
        seen += [s for s in map(parse, proc.stdout.read().splitlines()) if s is not None]


def leaks(seen: list) -> list:
    """Packets on the uplink to or from beyond the LAN (link-local and multicast are the LAN's too)."""
    def beyond(address: str) -> bool:
        a = ipaddress.IPv6Address(address)
        return not (a in LAN6 or a.is_link_local or a.is_multicast or a.is_unspecified)
    return [s for s in seen if beyond(s.src) or beyond(s.dst)]


def lan_control(tb: Testbed, host: str) -> None:
    """Traffic to the link itself: it works, and the watcher must see it (assert_watched)."""
    assert ping(tb, host, WAN6, 2)


def assert_watched(seen: list) -> None:
    """The watcher saw lan_control's pings: it does see what leaves the uplink."""
    assert any(s.dst == WAN6 and s.outgoing for s in seen), seen[:20]


def connect_error(tb: Testbed, host: str) -> str:
    """Why a TCP connection from host to INTERNET6 fails ("" if it does not)."""
    r = tb.run(host, [PY, "-c", (
        "import socket\n"
        f"try: socket.create_connection(('{INTERNET6}', 5003), 3)\n"
        "except OSError as e: print(e.strerror)")])
    return r.stdout.strip()


# ---------------------------------------------------------------- the tunnel carries IPv6
def test_ipv6_goes_through_the_server_and_never_out_of_the_uplink(world):
    tb = world.tb
    with uplink_capture(tb, "c1") as seen:
        out = ping(tb, "c1", INTERNET6, 3)
        assert out and " 0% packet loss" in out.stdout
        assert world.source_seen("c1", "wan", INTERNET6) == HOSTS6["s1"]           # through the tunnel and s1's NAT6
        world.transfer("c1", "wan", INTERNET6, size=1 << 20)    # SHA-256 compared
        tb.run("c1", ["ping", "-n", "-c", "1", "-W", "1", "2001:db8:aa::1"])   # nobody: still not the uplink
        lan_control(tb, "c1")
    assert_watched(seen)
    assert leaks(seen) == []
    route = sh(tb, "c1", f"ip -6 route get {INTERNET6}")
    assert f"dev alpaca table {routes.TABLE} {TAG}" in route, route


def test_check_explains_the_ipv6_plan(world):
    for host, expected in (("c1", "IPv6: into the tunnel via fd"), ("c2", "IPv6: the tunnel carries none")):
        daemon = world.peers[host]
        r = daemon.run([PY, "-m", "alpaca", "-C", str(daemon.config_path), "check"], cwd=SOURCE)
        assert r.returncode == 0, r.stderr
        assert expected in r.stdout and "rule IPv6 32600: from all not fwmark 0x414c lookup 16716" in r.stdout, \
            r.stdout
    assert "route IPv6 unreachable default table 16716 metric 16716" in r.stdout


# ---------------------------------------------------------------- net6 "off": block_ipv6
def test_without_ipv6_in_the_tunnel_ipv6_is_blocked_not_leaked(world):
    tb, c2 = world.tb, world.peers["c2"]
    with uplink_capture(tb, "c2") as seen:
        r = tb.run("c2", ["ping", "-n", "-c", "1", "-W", "2", INTERNET6])
        assert r.returncode != 0 and "No route to host" in r.stdout + r.stderr, r.stdout + r.stderr
        assert connect_error(tb, "c2") == "No route to host"     # at once, not after a timeout
        lan_control(tb, "c2")                            # the LAN stays reachable
    assert_watched(seen)
    assert leaks(seen) == []
    # block_ipv6 false: the daemon leaves IPv6 alone, and it leaves through the uplink (as chosen)
    config = json.loads(c2.config_path.read_text())
    c2.config_path.write_text(json.dumps({**config, "block_ipv6": False}))
    try:
        assert c2.stop() == 0
        assert ipv6_state(tb, "c2") == world.before["c2"]
        c2.start()
        assert wait_for(c2.control_socket.exists, 10), c2.log_text()[-2000:]
        assert wait_for(lambda: ping(tb, "c2", "10.17.1.1"), 15)
        assert tagged6(tb, "c2") == []
        with uplink_capture(tb, "c2") as seen:
            assert ping(tb, "c2", INTERNET6) and world.source_seen("c2", "wan", INTERNET6) == HOSTS6["c2"]
            lan_control(tb, "c2")
        assert_watched(seen)
        assert any(s.dst == INTERNET6 for s in leaks(seen))       # (what the watcher calls a leak)
    finally:
        c2.config_path.write_text(json.dumps(config))


# ---------------------------------------------------------------- stop, crash, restart
def kill(world, name: str) -> None:
    daemon = world.peers[name]
    assert daemon.stop(signal.SIGKILL) == -9
    assert wait_for(lambda: world.tb.run(name, ["ip", "link", "show", "alpaca"]).returncode != 0, 5)
    daemon.control_socket.unlink(missing_ok=True)


def start(world, name: str) -> None:
    daemon = world.peers[name]
    daemon.start()
    assert wait_for(daemon.control_socket.exists, 10), daemon.log_text()[-2000:]
    assert wait_for(lambda: ping(world.tb, name, INTERNET6), 15), daemon.log_text()[-2000:]


def test_sigterm_and_sigkill_leave_no_ipv6_route_or_rule_and_the_kill_switch_blocks(world):
    tb, c1 = world.tb, world.peers["c1"]
    assert len(tagged6(tb, "c1")) == 2 + 2, tagged6(tb, "c1")    # 2 rules, tunnel default, kill switch
    assert c1.stop(signal.SIGTERM) == 0
    assert ipv6_state(tb, "c1") == world.before["c1"]

    start(world, "c1")
    kill(world, "c1")
    with uplink_capture(tb, "c1") as seen:                       # dead daemon: blocked, not leaked
        r = tb.run("c1", ["ping", "-n", "-c", "1", "-W", "2", INTERNET6])
        assert r.returncode != 0 and "No route to host" in r.stdout + r.stderr, r.stdout + r.stderr
        assert connect_error(tb, "c1") == "No route to host"
        lan_control(tb, "c1")
    assert_watched(seen)
    assert leaks(seen) == []
    assert len(tagged6(tb, "c1")) == 2 + 1                       # the TUN's route went with the TUN
    r = c1.run([PY, "-m", "alpaca", "-C", str(c1.config_path), "cleanup"], cwd=SOURCE,
               env={**os.environ, "SERVICE_RESULT": "signal"})      # systemd's ExecStopPost after the crash
    assert r.returncode == 0 and len(tagged6(tb, "c1")) == 3, r.stdout + r.stderr      # the block stays

    start(world, "c1")                                           # back: one copy of each
    ours = tagged6(tb, "c1")
    assert len(ours) == len(set(ours)) == 4, ours
    assert c1.stop(signal.SIGTERM) == 0
    assert ipv6_state(tb, "c1") == world.before["c1"]

    start(world, "c1")
    kill(world, "c1")
    r = c1.run([PY, "-m", "alpaca", "-C", str(c1.config_path), "cleanup"], cwd=SOURCE)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert ipv6_state(tb, "c1") == world.before["c1"]
    start(world, "c1")          # (as the other tests found it)
    assert "Traceback" not in c1.log_text()
