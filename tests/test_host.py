"""Tier 3: what the daemon does to the host, checked from outside with iproute2
and iptables-legacy, in namespaces this test creates.

    c1 (client 16.1) --bridge-- s1 (server 1.1) --eth1-- inet (an "internet" host)

inet has no route to the tunnel net: it is reachable from c1 only through
s1's NAT. c1's main table has a default route via 172.31.77.254 (the
"original gateway", which need not exist for routing decisions).
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import sys
from pathlib import Path

import pytest

from alpaca.lab.daemons import Mesh
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root
INET = "172.31.200.2"
ORIG_GW = "172.31.77.254"
CHN_GW = "172.31.77.253"


def snapshot(tb: Testbed, host: str) -> dict:
    # iptables rules only (python-iptables leaves empty legacy tables behind,
    # which is the kernel keeping them loaded, not a rule of ours); IPv4 only
    # (IPv6 link-local routes come and go with link timing)
    save = tb.run(host, ["iptables-legacy-save"]).stdout
    return {"rules": tb.run(host, ["ip", "-4", "rule"]).stdout,
            "routes": tb.run(host, ["ip", "-4", "route", "show", "table", "all"]).stdout,
            "iptables": [l for l in save.splitlines() if l.startswith("-A")]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("host")
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp)
    try:
        s1_ip = tb.add_host("s1", 1)
        tb.add_host("c1", 16)
        tb.add_host("c2", 17)
        tb.add_link("s1", "inet", "172.31.200.1", INET)
        tb.run("c1", ["ip", "route", "add", "default", "via", ORIG_GW], check=True)
        chn = tmp / "chnroute.txt"
        chn.write_text("# test prefixes\n" + "\n".join(
            str(ipaddress.IPv4Network((0x64000000 + (i << 8), 24))) for i in range(3000)) + "\n")
        hooks = tmp / "hooks.log"
        hook_cmds = {f"{stage}_cmds": [f"echo {stage} $ALPACA_TUN $ALPACA_ID >> {hooks}"]
                     for stage in ("pre_up", "post_up", "pre_down", "post_down")}
        before = {h: snapshot(tb, h) for h in ("s1", "c1")}
        everyone = [mesh.line("1.1", s1_ip), mesh.line("16.1", None)]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server", **hook_cmds}, everyone)
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1", "local_routes": ["192.0.2.0/24"],
                            "chnroute": {"table": 100, "gateway": CHN_GW, "data": str(chn)}, **hook_cmds},
                 everyone)
        mesh.start_all()
        assert wait_for(lambda: tb.run("c1", ["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 15)
        mesh.before, mesh.hooks, mesh.s1_ip = before, hooks, s1_ip
        yield mesh
    finally:
        mesh.close()


def route_get(tb, host, dst) -> str:
    return tb.run(host, ["ip", "route", "get", dst]).stdout


def test_client_reaches_internet_through_server_nat(world):
    tb = world.tb
    r = tb.run("c1", ["ping", "-c3", "-i0.2", "-W1", INET])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dev alpaca" in route_get(tb, "c1", INET)
    nat = tb.run("s1", ["iptables-legacy", "-t", "nat", "-v", "-n", "-L", "POSTROUTING"]).stdout
    masq = [l for l in nat.splitlines() if "MASQUERADE" in l]
    assert len(masq) == 1 and int(masq[0].split()[0]) > 0, nat
    assert tb.run("s1", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"


def test_client_routes_keep_underlay_outside(world):
    tb = world.tb
    assert "dev alpaca" in route_get(tb, "c1", "8.8.8.8")
    assert f"via {ORIG_GW} dev eth0" in route_get(tb, "c1", "192.0.2.5")          # local_routes
    assert f"via {CHN_GW} dev eth0" in route_get(tb, "c1", "100.0.7.9")            # chnroute
    assert "dev eth0" in route_get(tb, "c1", world.s1_ip)                          # the server itself
    chn = tb.run("c1", ["ip", "route", "show", "table", "100"]).stdout.splitlines()
    assert len(chn) == 3000


def test_readded_default_route_is_taken_back(world):
    tb = world.tb
    tb.run("c1", ["ip", "route", "del", "default", "via", ORIG_GW], check=True)
    tb.run("c1", ["ip", "route", "add", "default", "via", "172.31.77.252"], check=True)
    try:
        assert wait_for(lambda: "via 172.31.77.252" in route_get(tb, "c1", "192.0.2.5"), 5)
        assert "dev alpaca" in route_get(tb, "c1", "8.8.8.8")
        log = world.peers["c1"].log_text()
        assert re.search(r"172\.31\.77\.252", log), log[-2000:]
    finally:
        tb.run("c1", ["ip", "route", "replace", "default", "via", ORIG_GW])
    assert wait_for(lambda: f"via {ORIG_GW}" in route_get(tb, "c1", "192.0.2.5"), 5)


def test_secrets_edit_admits_and_cuts_off_a_client(world):
    tb, s1 = world.tb, world.peers["s1"]
    c2 = world.add("c2", 17, {"id": "16.2", "mode": "client", "gateway": "1.1"},
                   [world.line("1.1", world.s1_ip), world.line("16.2", None)])
    c2.start()
    assert wait_for(lambda: c2.config_path.parent.joinpath("daemon.log").exists(), 5)
    assert tb.run("c2", ["ping", "-c2", "-W1", "10.17.1.1"]).returncode != 0
    c1_before = s1.peer_status("16.1")
    base = [world.line("1.1", world.s1_ip), world.line("16.1", None)]
    s1.write_secrets(base + [world.line("16.2", None)])
    assert wait_for(lambda: tb.run("c2", ["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 10)
    # the unchanged peer kept its counters and paths
    c1_after = s1.peer_status("16.1")
    assert c1_after["rx_packets"] >= c1_before["rx_packets"] and c1_after["paths"], c1_after
    s1.write_secrets(base)
    assert wait_for(lambda: tb.run("c2", ["ping", "-c2", "-W1", "10.17.1.1"]).returncode != 0, 10)
    assert "16.2" not in [p["id"] for p in s1.status()["peers"]]
    assert tb.run("c1", ["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0
    c2.stop()


def test_sighup_applies_live_config_and_names_the_rest(world):
    tb, c1 = world.tb, world.peers["c1"]
    cfg = json.loads(c1.config_path.read_text())
    original = dict(cfg)
    cfg["local_routes"] = cfg["local_routes"] + ["198.51.100.0/24"]
    cfg["mtu"] = 1300
    cfg["peers"] = {"1.1": {"fec": "4:1"}}
    c1.config_path.write_text(json.dumps(cfg))
    try:
        c1.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: f"via {ORIG_GW} dev eth0" in route_get(tb, "c1", "198.51.100.7"), 5)
        assert wait_for(lambda: c1.peer_status("1.1")["fec"] == "4:1", 5)
        assert wait_for(lambda: "need a restart (not applied): mtu" in c1.log_text(), 5), c1.log_text()[-2000:]
        assert "mtu 1400" in tb.run("c1", ["ip", "link", "show", "alpaca"]).stdout
    finally:
        c1.config_path.write_text(json.dumps(original))
        c1.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "dev alpaca" in route_get(tb, "c1", "198.51.100.7"), 5)


def test_sigkill_then_restart_leaves_one_copy(world):
    tb = world.tb
    for name in ("s1", "c1"):
        peer = world.peers[name]
        peer.stop(signal.SIGKILL)
        Path(json.loads(peer.config_path.read_text())["control_socket"]).unlink(missing_ok=True)
        peer.start()
    for name in ("s1", "c1"):
        sock = Path(json.loads(world.peers[name].config_path.read_text())["control_socket"])
        assert wait_for(sock.exists, 10), world.peers[name].log_text()[-2000:]
    save = tb.run("s1", ["iptables-legacy-save"]).stdout.splitlines()
    ours = [l for l in save if "alpaca-tunnel:alpaca" in l]
    assert len(ours) == 6 and len(set(ours)) == 6, ours       # alpaca/host/nat.py: 1 nat, 3 filter, 2 mangle
    rules = [l for l in tb.run("c1", ["ip", "rule"]).stdout.splitlines() if "proto 97" in l]
    assert len(rules) == 3 and len(set(rules)) == 3, rules
    assert len(tb.run("c1", ["ip", "route", "show", "table", "100"]).stdout.splitlines()) == 3000
    assert wait_for(lambda: tb.run("c1", ["ping", "-c1", "-W1", INET]).returncode == 0, 15)


def test_sigterm_restores_host_and_runs_hooks(world):
    tb = world.tb
    world.hooks.write_text("")
    for name in ("c1", "s1"):
        assert world.peers[name].stop(signal.SIGTERM) == 0
    for host in ("s1", "c1"):
        assert snapshot(tb, host) == world.before[host], host
    hooks = world.hooks.read_text().splitlines()
    assert "pre_down alpaca 16.1" in hooks and "post_down alpaca 16.1" in hooks
    assert "pre_down alpaca 1.1" in hooks and "post_down alpaca 1.1" in hooks
    for name in ("s1", "c1"):
        log = world.peers[name].log_text()
        assert "pre_up" in log and "post_up" in log and "Traceback" not in log


def test_tun_deleted_under_a_running_daemon_exits_with_one_line(testbed, tmp_path):
    mesh = Mesh(testbed, tmp_path)
    ip = testbed.add_host("s1", 1)
    s1 = mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, [mesh.line("1.1", ip)])
    mesh.start_all()
    r = testbed.run("s1", ["ip", "link", "del", "alpaca"])
    assert r.returncode == 0, r.stderr
    code = s1.proc.wait(10)
    assert code == 1
    log = s1.log_text()
    assert "TUN device 'alpaca' is gone" in log and "Traceback" not in log, log[-2000:]
    # the rules it added are gone too (the stack unwound)
    save = testbed.run("s1", ["iptables-legacy-save"])
    assert save.returncode == 0 and "alpaca-tunnel" not in save.stdout


def test_server_copied_config_and_chnroute_following_the_original_gateway(testbed, tmp_path):
    """A server whose config names itself as gateway (copied from a client) starts, says once
    that it ignores it, and serves; a client with chnroute gateway "original" sends the
    chnroute prefixes via the namespace's default gateway, and they move when it changes."""
    tb, mesh = testbed, Mesh(testbed, tmp_path)
    s1_ip = tb.add_host("s1", 1)
    tb.add_host("c1", 16)
    tb.run("c1", ["ip", "route", "add", "default", "via", ORIG_GW], check=True)
    chn = tmp_path / "chnroute.txt"
    chn.write_text("100.0.7.0/24\n100.0.8.0/24\n100.0.9.0/24\n")
    everyone = [mesh.line("1.1", s1_ip), mesh.line("16.1", None)]
    s1 = mesh.add("s1", 1, {"id": "1.1", "mode": "server", "gateway": "1.1"}, everyone)
    c1 = mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1",
                             "chnroute": {"table": 100, "gateway": "original", "data": str(chn)}}, everyone)
    mesh.start_all()
    assert wait_for(lambda: tb.run("c1", ["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 15)
    assert s1.log_text().count("gateway '1.1' is this server's own id") == 1, s1.log_text()[-2000:]

    def chn_routes() -> list[str]:
        return tb.run("c1", ["ip", "route", "show", "table", "100"]).stdout.splitlines()
    assert wait_for(lambda: len(chn_routes()) == 3 and all(f"via {ORIG_GW} dev eth0" in r for r in chn_routes()), 5)
    assert f"via {ORIG_GW} dev eth0" in route_get(tb, "c1", "100.0.8.9")
    assert "dev alpaca" in route_get(tb, "c1", "100.0.10.1")        # not listed: the tunnel
    check = tb.run("c1", [sys.executable, "-m", "alpaca", "-C", str(c1.config_path), "check"])
    assert f"via the original gateway (now via {ORIG_GW} dev eth0)" in check.stdout, check.stdout + check.stderr

    # DHCP moves the default gateway: the chnroute prefixes follow
    new_gw = "172.31.77.252"
    tb.run("c1", ["ip", "route", "replace", "default", "via", new_gw], check=True)
    assert wait_for(lambda: all(f"via {new_gw} dev eth0" in r for r in chn_routes()), 5), chn_routes()
    assert len(chn_routes()) == 3 and f"via {new_gw} dev eth0" in route_get(tb, "c1", "100.0.8.9")
    assert "dev alpaca" in route_get(tb, "c1", "8.8.8.8")
    # stop: they go with the rest
    c1.stop()
    assert chn_routes() == []
    assert "Traceback" not in c1.log_text() + s1.log_text()
