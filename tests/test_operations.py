"""Tier 3: operating it — the demo end to end, and status from several daemons."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alpaca.control import default_socket_path
from alpaca.testbed import wait_for
from conftest import PY

pytestmark = pytest.mark.root


def test_demo_runs_end_to_end_and_cleans_up():
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    r = subprocess.run([sys.executable, "-m", "alpaca", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert out.count("0% packet loss") >= 4, out
    assert "sha256 matches" in out
    assert "peer 16.1 (10.17.16.1) up" in out and "Traceback" not in out + r.stderr
    assert "all namespaces and daemons removed" in out
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split()) | {"(id:"} | {w for w in after.split() if w.isdigit() or w.endswith(")")}
    assert not [l for l in after.splitlines() if l.startswith("ad")], after


def test_two_daemons_same_tun_name_answer_their_own_status(mesh4):
    """mesh4's daemons all use TUN name 'alpaca' in their own namespaces; with
    the default control socket path (derived from the config path) each
    answers for itself."""
    tb = mesh4.tb
    for name in ("s1", "c1"):
        cfg = json.loads(mesh4.peers[name].config_path.read_text())
        assert cfg.get("name", "alpaca") == "alpaca"
    s2 = mesh4.peers["s2"]
    # a second daemon pair using the default socket path: restart s2 without the override
    cfg_path = s2.config_path
    cfg = json.loads(cfg_path.read_text())
    s2.stop()
    cfg.pop("control_socket")
    cfg_path.write_text(json.dumps(cfg))
    s2.start()
    sock = default_socket_path(cfg_path, "alpaca")
    try:
        assert wait_for(sock.exists, 10), s2.log_text()[-2000:]
        r = tb.run("s2", [PY, "-m", "alpaca", "-C", str(cfg_path), "status", "--json"])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == "1.2"
        assert mesh4.peers["s1"].status()["id"] == "1.1"
        assert mesh4.peers["c1"].status()["id"] == "16.1"
        table = tb.run("s2", [PY, "-m", "alpaca", "-C", str(cfg_path), "status"]).stdout
        assert table.startswith("alpaca-tunnel 1.2 (server)")
        assert max(len(line) for line in table.splitlines()) <= 80, table
    finally:
        s2.stop()
        cfg["control_socket"] = str(mesh4.workdir / "s2.sock")
        cfg_path.write_text(json.dumps(cfg))
        s2.start()
        wait_for(lambda: (mesh4.workdir / "s2.sock").exists(), 10)


def test_bad_control_requests_get_errors(mesh4):
    import socket
    path = json.loads(mesh4.peers["s1"].config_path.read_text())["control_socket"]
    for request in (b"not json\n", b"[1,2]\n", b'{"command": "reboot"}\n', b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(3)
            s.connect(path)
            s.sendall(request)
            reply = json.loads(s.makefile().readline())
        assert "error" in reply, (request, reply)
    assert mesh4.peers["s1"].status()["id"] == "1.1"
