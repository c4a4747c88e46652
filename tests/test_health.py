"""Tier 3: an idle tunnel does not look dead, and `status --check` tells a
monitoring system OK from CRITICAL (docs/operations.md "Monitoring"), with
real daemons: a server s1 and a client c1 whose gateway it is."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from alpaca.lab.daemons import PY, SOURCE, Mesh, secrets_line
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for
from alpaca.protocol.constants import KEEPALIVE_INTERVAL
from alpaca.protocol.crypto import genkey
from alpaca.protocol.health import LIVE_WITHIN

pytestmark = pytest.mark.root


def make_pair(tmp_path, wrong_key: bool = False) -> Mesh:
    """s1 (1.1) and c1 (16.1), not started. wrong_key: s1's line for 16.1
    carries another key than c1's own (the pair key comes from the bigger ID's)."""
    mesh = Mesh(Testbed(unique_prefix()), tmp_path)
    ip = mesh.tb.add_host("s1", 1)
    mesh.tb.add_host("c1", 16)
    server = mesh.line("1.1", ip)
    client_at_server = secrets_line("16.1", genkey(), None) if wrong_key else mesh.line("16.1", None)
    mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, [server, client_at_server])
    mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, [server, mesh.line("16.1", None)])
    return mesh


@pytest.fixture
def pair(tmp_path):
    mesh = make_pair(tmp_path)
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture
def rejected_pair(tmp_path):
    mesh = make_pair(tmp_path, wrong_key=True)
    try:
        yield mesh
    finally:
        mesh.close()


def check(mesh: Mesh, name: str) -> subprocess.CompletedProcess:
    peer = mesh.peers[name]
    return peer.run([PY, "-m", "alpaca", "-C", str(peer.config_path), "status", "--check"], cwd=SOURCE)


def test_an_idle_healthy_pair_is_ok_on_both_sides(pair):
    mesh = pair
    mesh.start_all()
    r = wait_for(lambda: (r := check(mesh, "c1")).returncode == 0 and r, 10)
    assert r, check(mesh, "c1").stdout
    time.sleep(10)          # no traffic: only keepalives and their probes
    r = check(mesh, "c1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ALPACA OK - ") and "gateway 1.1 " in r.stdout and len(r.stdout.splitlines()) == 1
    gateway = mesh.peers["c1"].peer_status("1.1")
    assert gateway["role"] == "gateway" and gateway["state"] in ("idle", "active") and gateway["up"], gateway
    # the server hears the idle client's keepalives: it is alive there too
    server = mesh.peers["s1"].status()
    assert server["health"]["code"] == 0
    client = next(p for p in server["peers"] if p["id"] == "16.1")
    assert client["role"] is None and client["state"] in ("idle", "active"), client
    assert check(mesh, "s1").returncode == 0
    table = mesh.peers["c1"].run([PY, "-m", "alpaca", "-C", str(mesh.peers["c1"].config_path), "status"],
                                 cwd=SOURCE).stdout
    assert re.search(r"^peer 1\.1 \(10\.17\.1\.1\) gateway (idle|active), last packet", table, re.M), table


def test_a_killed_server_is_critical_on_the_client_within_the_threshold(pair):
    mesh = pair
    mesh.start_all()
    assert wait_for(lambda: check(mesh, "c1").returncode == 0, 10), check(mesh, "c1").stdout
    mesh.peers["s1"].stop(signal.SIGKILL)
    # the last answer came at most one keepalive before the kill; LIVE_WITHIN after it: unreachable
    r = wait_for(lambda: (r := check(mesh, "c1")).returncode == 2 and r, LIVE_WITHIN + KEEPALIVE_INTERVAL + 3)
    assert r, check(mesh, "c1").stdout
    assert r.stdout.startswith("ALPACA CRITICAL - ") and "gateway 1.1 unreachable (no answer for" in r.stdout
    assert mesh.peers["c1"].peer_status("1.1")["state"] == "unreachable"
    # a daemon that does not answer is critical as well
    r = check(mesh, "s1")
    assert r.returncode == 2 and r.stdout.startswith("ALPACA CRITICAL - "), r.stdout + r.stderr


def test_a_rejected_client_sees_its_gateway_unreachable_and_the_server_counts_it(rejected_pair):
    mesh = rejected_pair
    mesh.start_all()
    r = wait_for(lambda: (r := check(mesh, "c1")).returncode == 2 and r, LIVE_WITHIN + 3)
    assert r, check(mesh, "c1").stdout
    assert "gateway 1.1 unreachable (never answered)" in r.stdout
    # from its own side a rejected client looks like one whose server is down;
    # the server's status says why: the client's datagrams fail authentication
    server = mesh.peers["s1"].status()
    assert server["drops"].get("auth_failure", 0) > 0, server["drops"]
    client = next(p for p in server["peers"] if p["id"] == "16.1")
    assert client["state"] == "silent" and client["last_rx_age"] is None
    assert check(mesh, "s1").returncode == 0       # a server depends on no client
