"""Tier 3: `alpaca-tunnel status` finds the running daemons by itself (like
`wg show`), and its table and --json tell the same story.

Other daemons may run on this host at the same time (other tests, other
checkouts): the listing tests look for their own daemons among what is
listed, and the test of an empty host hides /run/alpaca-tunnel behind an
empty tmpfs in a mount namespace of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from alpaca.host.control import RUN_DIR, ControlError, default_socket_path, query
from alpaca.lab.daemons import PY, Mesh
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.root


def cli(*args: str, netns_of: tuple[Testbed, str] | None = None) -> subprocess.CompletedProcess:
    argv = [PY, "-m", "alpaca", *args]
    if netns_of is not None:
        tb, name = netns_of
        return tb.run(name, argv, cwd=ROOT)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)


def errors(r: subprocess.CompletedProcess) -> list[str]:
    return r.stderr.strip().splitlines()


@pytest.fixture
def pair(tmp_path):
    """Server s1 with the default control socket (in RUN_DIR) and client c1
    with `control_socket` in its own directory (found through a link in
    RUN_DIR), each with an interface name of its own; not started."""
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path)
    try:
        ip = {"s1": tb.add_host("s1", 1), "c1": tb.add_host("c1", 16)}
        servers = [mesh.line("1.1", ip["s1"])]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server", "name": f"{tb.prefix}s",
                           "control_socket": None}, servers + [mesh.line("16.1", None)])
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1", "name": f"{tb.prefix}c"},
                 servers + [mesh.line("16.1", None)])
        mesh.names = {"s1": f"{tb.prefix}s", "c1": f"{tb.prefix}c"}
        mesh.sockets = {"s1": default_socket_path(mesh.peers["s1"].config_path, mesh.names["s1"]),
                        "c1": tmp_path / "c1.sock"}
        mesh.links = {"c1": default_socket_path(mesh.peers["c1"].config_path, mesh.names["c1"])}
        yield mesh
    finally:
        mesh.close()
        for path in (*mesh.sockets.values(), *mesh.links.values()):
            path.unlink(missing_ok=True)        # (what a failed test may have left in RUN_DIR)


def answers(path: Path) -> bool:
    try:
        return "id" in query(path, {"command": "status"}, timeout=2)
    except ControlError:
        return False


def start(mesh: Mesh, name: str) -> None:
    """Start it and wait for its control socket to answer (a killed run's
    socket may still be there)."""
    mesh.peers[name].start()
    assert wait_for(lambda: answers(mesh.sockets[name]), 10), mesh.peers[name].log_text()[-2000:]


def ours(listing: list[dict], mesh: Mesh) -> dict[str, dict]:
    """The snapshots in a listing that are of this mesh's daemons, by host name."""
    configs = {str(peer.config_path): name for name, peer in mesh.peers.items()}
    return {configs[s["config"]]: s for s in listing if s.get("config") in configs}


def test_status_without_C_lists_every_daemon_and_status_NAME_one(pair):
    mesh = pair
    start(mesh, "s1")
    start(mesh, "c1")
    assert mesh.sockets["s1"].parent == RUN_DIR
    # the client's socket is elsewhere; a link in RUN_DIR makes it findable
    assert os.readlink(mesh.links["c1"]) == str(mesh.sockets["c1"])

    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert isinstance(listing, list)
    found = ours(listing, mesh)
    assert {name: (s["id"], s["name"]) for name, s in found.items()} == {
        "s1": ("1.1", mesh.names["s1"]), "c1": ("16.1", mesh.names["c1"])}
    assert found["c1"]["control_socket"] == str(mesh.sockets["c1"])

    r = cli("status")
    assert r.returncode == 0, r.stderr
    table = r.stdout
    for name, header in (("s1", "alpaca-tunnel 1.1 (server)"), ("c1", "alpaca-tunnel 16.1 (client)")):
        assert header in table
        line = next(l for l in table.splitlines() if l.startswith(f"  name {mesh.names[name]}, config /"))
        assert line.endswith(f"/{name}/config.json") and len(line) <= 80, line   # (a long path: cut in the middle)

    # one of them by name, as an object (--json) or a table; -C still works
    r = cli("status", mesh.names["c1"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["id"] == "16.1"
    r = cli("status", mesh.names["s1"])
    assert r.returncode == 0 and r.stdout.startswith("alpaca-tunnel 1.1 (server)"), r.stdout + r.stderr
    r = cli("-C", str(mesh.peers["c1"].config_path), "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == "16.1", r.stderr
    r = cli("status", f"{mesh.tb.prefix}x")
    assert r.returncode == 1
    assert errors(r)[-1].startswith(f"alpaca-tunnel: no daemon named {mesh.tb.prefix}x is running"), r.stderr
    assert not any(mesh.names[n] in line for line in errors(r) for n in mesh.names), r.stderr

    # a clean stop takes the socket and the link away
    mesh.peers["c1"].stop()
    assert not mesh.sockets["c1"].exists() and not os.path.lexists(mesh.links["c1"])
    mesh.peers["s1"].stop()
    assert not mesh.sockets["s1"].exists()


def test_a_killed_daemon_is_reported_in_one_line_and_skipped(pair):
    mesh = pair
    start(mesh, "s1")
    start(mesh, "c1")
    mesh.peers["c1"].stop(signal.SIGKILL)
    assert os.path.lexists(mesh.links["c1"])        # left behind: its socket answers no more

    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert set(ours(json.loads(r.stdout), mesh)) == {"s1"}
    mine = [line for line in errors(r) if str(mesh.links["c1"]) in line]
    assert len(mine) == 1 and "stale control socket" in mine[0] and "Traceback" not in r.stderr, r.stderr

    # by its name: the stale line, then why there is nothing to show
    r = cli("status", mesh.names["c1"])
    assert r.returncode == 1 and r.stdout == ""
    assert len(errors(r)) == 2 and str(mesh.links["c1"]) in errors(r)[0], r.stderr
    assert errors(r)[1].startswith(f"alpaca-tunnel: no daemon named {mesh.names['c1']} is running"), r.stderr

    # a new start replaces the stale socket and link
    start(mesh, "c1")
    r = cli("status", "--json")
    assert set(ours(json.loads(r.stdout), mesh)) == {"s1", "c1"}
    assert not any(str(mesh.links["c1"]) in line for line in errors(r)), r.stderr

    # the server killed: `cleanup` (systemd's ExecStopPost) removes its stale socket
    mesh.peers["s1"].stop(signal.SIGKILL)
    r = cli("status", mesh.names["s1"], "--json")
    assert r.returncode == 1 and str(mesh.sockets["s1"]) in errors(r)[0], r.stderr
    r = cli("-C", str(mesh.peers["s1"].config_path), "cleanup", netns_of=(mesh.tb, "s1"))
    assert r.returncode == 0, r.stderr
    assert not mesh.sockets["s1"].exists()
    r = cli("status", mesh.names["s1"])
    assert r.returncode == 1 and len(errors(r)) == 1, r.stderr      # no stale line any more
    assert set(ours(json.loads(cli("status", "--json").stdout), mesh)) == {"c1"}


def test_no_daemon_is_one_line_and_exit_1():
    """Run where /run/alpaca-tunnel is empty, and where it does not exist."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for hide in (str(RUN_DIR), "/run"):
        for args in (["status"], ["status", "--json"], ["status", "alpaca"]):
            script = f'mount -t tmpfs none {hide} && exec "$@"'
            r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                                PY, "-m", "alpaca", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert r.returncode == 1, (hide, args, r.stdout, r.stderr)
            assert r.stdout == ""
            what = "no daemon named alpaca is running" if "alpaca" in args else "no daemon is running"
            assert errors(r) == [f"alpaca-tunnel: {what} (no live control socket in {RUN_DIR}; "
                                 "for a daemon not registered there use -C)"], (hide, args, r.stderr)


# ---------------------------------------------------------------- the two views

UPTIME = re.compile(r"^alpaca-tunnel 16\.1 \(client\), group \S+, up ([\d.]+)s$", re.M)
GATEWAY = re.compile(r"^peer 1\.1 \(10\.17\.1\.1\) gateway (\w+), (?:never heard|last packet ([\d.]+)s ago)$", re.M)


def _view(r: subprocess.CompletedProcess, as_json: bool) -> tuple[float, bool, float | None]:
    """(uptime, gateway up, when the gateway was last heard in uptime seconds or None)."""
    assert r.returncode == 0, r.stderr
    if as_json:
        status = json.loads(r.stdout)
        gw = next(p for p in status["peers"] if p["id"] == "1.1")
        uptime, up, age = status["uptime"], gw["up"], gw["last_rx_age"]
    else:
        uptime = float(UPTIME.search(r.stdout).group(1))
        m = GATEWAY.search(r.stdout)
        assert m, r.stdout
        # (the table shows the state: heard lately is active or idle; docs/operations.md "Monitoring")
        up, age = m.group(1) in ("active", "idle"), None if m.group(2) is None else float(m.group(2))
    return uptime, up, None if age is None else uptime - age


def test_table_and_json_agree_right_after_start(pair):
    """The client starts first: its gateway is down and never heard; then
    the server starts and the gateway comes up. Views taken all along,
    alternately table and --json, tell one story: up exactly when heard,
    and once heard, heard in every later view no earlier than before.
    (Two runs are two snapshots: the table of one run is rendered from the
    very object --json would print, alpaca/status.py.)"""
    mesh = pair
    start(mesh, "c1")
    cfg = str(mesh.peers["c1"].config_path)
    views: list[tuple[str, float, bool, float | None]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for kind, args in (("json", ["status", "--json"]), ("table", ["status"])):
            r = cli("-C", cfg, *args, netns_of=(mesh.tb, "c1"))
            views.append((kind, *_view(r, kind == "json")))
        if len(views) == 4:
            mesh.peers["s1"].start()
        if sum(1 for v in views if v[2]) >= 4:
            break
    for kind in ("json", "table"):
        states = {v[2] for v in views if v[0] == kind}
        assert states == {False, True}, (kind, views)
    last_heard, last_uptime = None, -1.0
    for kind, uptime, up, heard in views:          # (in the order taken)
        assert uptime > last_uptime and up == (heard is not None), views
        last_uptime = uptime
        if last_heard is not None:
            assert heard is not None and heard >= last_heard - 0.2, views
        last_heard = heard if heard is not None else last_heard
