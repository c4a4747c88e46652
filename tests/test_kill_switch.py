"""The kill switch (docs/operations.md "Kill switch"): a client daemon that took the default route
and died leaves routes that block its traffic instead of letting it leave through the uplink.

    c1 (client 16.1) --bridge-- s1 (server 1.1)
                       \\------- wan (172.31.77.254, c1's and s1's original gateway; "internet" 198.51.100.1)

While c1's daemon runs, 198.51.100.1 is reached through the tunnel and s1's NAT; while it is dead
it could be reached straight through c1's uplink: that is the leak. An iptables-legacy counter on
c1's OUTPUT -o eth0 -d 198.51.100.1 counts what leaves in the clear (tunnel datagrams go to s1).
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from alpaca.host import routes
from alpaca.lab.daemons import SOURCE, Mesh
from alpaca.lab.testbed import wait_for

INTERNET = "198.51.100.1"
WAN = "172.31.77.254"
LEAK_RULE = ["OUTPUT", "-o", "eth0", "-d", INTERNET]


# ---------------------------------------------------------------- tier 1: the plan
def test_kill_switch_plans_an_unreachable_default_behind_the_tunnels():
    on = routes.ClientRoutes("tun9", "10.17.1.1", ["192.0.2.1"], [], kill_switch=True)
    off = routes.ClientRoutes("tun9", "10.17.1.1", ["192.0.2.1"], [])
    plan = {r.why: r for r in on._plan([], 7, None).values()}
    assert set(plan) == {"tunnel default", "kill switch"}
    assert [r.why for r in off._plan([], 7, None).values()] == ["tunnel default"]
    block, tunnel = plan["kill switch"], plan["tunnel default"]
    assert (block.table, block.dst_len, block.type) == (routes.TABLE, 0, routes.RTN_UNREACHABLE)
    assert block.metric > tunnel.metric          # only once the TUN's route is gone
    assert block.nl()["type"] == routes.RTN_UNREACHABLE and "gateway" not in block.nl() and "oif" not in block.nl()
    assert block.nl(delete=True)["type"] == routes.RTN_UNREACHABLE      # the kernel deletes only that type
    assert block.text() == f"unreachable default table {routes.TABLE} metric {routes.KILL_SWITCH_METRIC} proto 97"
    assert not block.satisfied_by(routes.Route(routes.TABLE, "0.0.0.0", 0, None, metric=block.metric))


def test_kill_switch_is_on_by_default(tmp_path):
    from alpaca.config import load_config
    path = tmp_path / "config.json"
    path.write_text('{"id": "16.1", "gateway": "1.1"}')
    assert load_config(path).kill_switch is True


# ---------------------------------------------------------------- tier 3: real daemons
@pytest.fixture
def world(testbed, tmp_path, request):
    """s1, c1 and wan as drawn above; c1's config has request.param as kill_switch (None: the default)."""
    mesh = Mesh(testbed, tmp_path)
    s1_ip = testbed.add_host("s1", 1)
    testbed.add_host("c1", 16)
    testbed.add_host("wan", 254)
    testbed.run("wan", ["ip", "addr", "add", f"{INTERNET}/32", "dev", "lo"], check=True)
    for host in ("c1", "s1"):
        testbed.run(host, ["ip", "route", "add", "default", "via", WAN], check=True)
    testbed.run("c1", ["iptables-legacy", "-A", *LEAK_RULE], check=True)
    mesh.before = {"rules": testbed.run("c1", ["ip", "-4", "rule"]).stdout,
                   "routes": testbed.run("c1", ["ip", "-4", "route", "show", "table", "all"]).stdout}
    everyone = [mesh.line("1.1", s1_ip), mesh.line("16.1", None)]
    mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, everyone)
    extra = {} if request.param is None else {"kill_switch": request.param}
    mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1", **extra}, everyone)
    mesh.s1_ip = s1_ip
    try:
        mesh.start_all()
        yield mesh
    finally:
        mesh.close()        # stops the daemons; the testbed fixture removes the namespaces


def ping(tb, dst: str, count: int = 1) -> bool:
    return tb.run("c1", ["ping", "-n", "-c", str(count), "-i0.2", "-W1", dst]).returncode == 0


def leaked(tb) -> int:
    """Packets to INTERNET that left c1 through its uplink (the counter of LEAK_RULE)."""
    out = tb.run("c1", ["iptables-legacy", "-L", "OUTPUT", "-v", "-n", "-x"], check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if INTERNET in line)


def tagged(tb) -> list[str]:
    """Our rules and routes in c1 (tag proto 97), one line each."""
    lines = (tb.run("c1", ["ip", "-4", "rule"]).stdout.splitlines()
             + tb.run("c1", ["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines())
    return [line for line in lines if "proto 97" in line]


def kill(tb, client) -> None:
    client.stop(signal.SIGKILL)
    assert wait_for(lambda: tb.run("c1", ["ip", "link", "show", "alpaca"]).returncode != 0, 5)
    client.control_socket.unlink(missing_ok=True)


def cleanup(client, **env) -> str:
    r = client.run([sys.executable, "-m", "alpaca", "-C", str(client.config_path), "cleanup"],
                   env={**os.environ, **env}, cwd=SOURCE)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return r.stdout


def start(mesh, client) -> None:
    client.start()
    assert wait_for(client.control_socket.exists, 10), client.log_text()[-2000:]
    assert wait_for(lambda: ping(mesh.tb, INTERNET), 15), client.log_text()[-2000:]


@pytest.mark.root
@pytest.mark.parametrize("world", [None], indirect=True)       # kill_switch as by default
def test_killed_client_blocks_until_back_and_cleanup_or_stop_lifts_it(world):
    tb, c1 = world.tb, world.peers["c1"]
    assert wait_for(lambda: ping(tb, INTERNET), 15), c1.log_text()[-2000:]
    assert "dev alpaca" in tb.run("c1", ["ip", "route", "get", INTERNET]).stdout
    assert f"unreachable default table {routes.TABLE}" in "\n".join(tagged(tb))
    before = leaked(tb)
    assert before == 0       # the tunnel carries it

    kill(tb, c1)
    assert not ping(tb, INTERNET, 3)
    r = tb.run("c1", ["ip", "route", "get", INTERNET])
    assert r.returncode != 0 and "No route to host" in r.stderr, r.stdout + r.stderr     # EHOSTUNREACH
    assert ping(tb, world.s1_ip)                      # the server's underlay address still answers
    assert ping(tb, WAN)                                 # and the LAN
    # systemd's ExecStopPost after a crash: the block stays
    out = cleanup(c1, SERVICE_RESULT="signal", EXIT_CODE="killed", EXIT_STATUS="KILL")
    assert "kill switch" in out, out
    assert not ping(tb, INTERNET)
    assert leaked(tb) == 0

    start(world, c1)                                  # traffic is back, through the tunnel
    assert leaked(tb) == 0
    ours = tagged(tb)
    assert len(ours) == len(set(ours)) == 4, ours        # 2 rules, tunnel default, unreachable default

    kill(tb, c1)
    assert not ping(tb, INTERNET)
    cleanup(c1)                                          # by hand (no SERVICE_RESULT): the way back
    assert tagged(tb) == []
    assert ping(tb, INTERNET) and leaked(tb) > 0         # no tunnel now: the uplink, as the user chose

    start(world, c1)
    assert c1.stop(signal.SIGTERM) == 0                  # a requested stop removes everything
    assert tagged(tb) == []
    assert tb.run("c1", ["ip", "-4", "rule"]).stdout == world.before["rules"]
    assert tb.run("c1", ["ip", "-4", "route", "show", "table", "all"]).stdout == world.before["routes"]
    assert "Traceback" not in c1.log_text()


@pytest.mark.root
@pytest.mark.parametrize("world", [False], indirect=True)
def test_without_kill_switch_a_killed_client_leaks_as_before(world):
    tb, c1 = world.tb, world.peers["c1"]
    assert wait_for(lambda: ping(tb, INTERNET), 15), c1.log_text()[-2000:]
    assert "unreachable" not in "\n".join(tagged(tb))
    kill(tb, c1)
    assert ping(tb, INTERNET) and leaked(tb) > 0         # fail-open: out through the uplink
    cleanup(c1, SERVICE_RESULT="signal")                 # ExecStopPost removes everything
    assert tagged(tb) == []
