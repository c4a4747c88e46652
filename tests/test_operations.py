"""Tier 3: operating it — the demo end to end, and status from several daemons."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca.host.control import default_socket_path
from alpaca.lab.daemons import PY, Mesh
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root
TOOLS = Path(__file__).parent / "tools"


def test_demo_runs_end_to_end_and_cleans_up():
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    r = subprocess.run([sys.executable, "-m", "alpaca", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert out.count("0% packet loss") >= 4, out
    assert "sha256 matches" in out
    # (the state words of docs/operations.md "Monitoring": heard lately)
    assert re.search(r"peer 16\.1 \(10\.17\.16\.1\) (active|idle)", out) and "Traceback" not in out + r.stderr, out
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


@pytest.mark.root
def test_a_resolver_that_never_answers_stalls_nothing(tmp_path):
    """secrets.txt names a peer by a host name, and the client's DNS server
    (127.0.0.1:53 in its namespace, seen only by the daemon) reads queries
    and never answers: each lookup hangs ~10 s (glibc: 5 s x 2 tries). With
    the re-resolve period cut to 1.5 s, pings through the tunnel every 0.1 s
    for 6 s (four periods) all come back fast, and the systemd watchdog pings
    (WATCHDOG_USEC 2 s: one every 0.5 s) never pause."""
    import socket
    import time
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dns = None
    try:
        ip = {"s1": tb.add_host("s1", 1), "c1": tb.add_host("c1", 16)}
        servers = [mesh.line("1.1", ip["s1"]), f"1.2 {mesh.key('1.2')} s2.alpaca-test.example null 1040"]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, servers + [mesh.line("16.1", None)])
        client = mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"},
                          servers + [mesh.line("16.1", None)])
        mesh.peers["s1"].start()
        dns = tb.popen("c1", [PY, "-c", "import socket, time\n"
                                       "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                                       "s.bind(('127.0.0.1', 53)); print('ready', flush=True)\n"
                                       "while True: s.recv(4096)\n"], stdout=subprocess.PIPE, text=True)
        assert dns.stdout.readline().strip() == "ready"
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        notify_path = tmp_path / "notify.sock"
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        env = {**__import__("os").environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"}
        client.start(env=env, launcher=[PY, str(TOOLS / "daemon_with_resolv.py"), str(resolv), "1.5"])
        messages = []                     # (time, message) from the daemon's notify socket

        def drain(until: float) -> None:
            while time.monotonic() < until:
                try:
                    messages.append((time.monotonic(), notify.recv(4096).decode()))
                except socket.timeout:
                    pass
        deadline = time.monotonic() + 20
        while not any("READY=1" in m for _, m in messages) and time.monotonic() < deadline:
            drain(time.monotonic() + 0.2)
        assert any("READY=1" in m for _, m in messages), client.log_text()
        assert wait_for(lambda: client.run(["ping", "-n", "-c", "1", "-W", "1", "10.17.1.1"]).returncode == 0, 10)
        pinger = tb.popen("c1", ["ping", "-n", "-c", "60", "-i", "0.1", "-W", "1", "10.17.1.1"],
                          stdout=subprocess.PIPE, text=True)
        start = time.monotonic()
        drain(start + 6.5)
        out = pinger.communicate(timeout=10)[0]
        received = int(out.split(" received")[0].rsplit(" ", 1)[1])
        rtt_max = float(out.strip().splitlines()[-1].split("=")[1].split("/")[2])
        pings = [t for t, m in messages if "WATCHDOG=1" in m and t >= start]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        print(f"\ndead DNS, 4 re-resolve periods: {received}/60 pings, max RTT {rtt_max:.1f} ms, "
              f"{len(pings)} watchdog pings, longest gap {max(gaps):.2f} s")
        assert received == 60 and rtt_max < 200, out
        assert len(pings) >= 10 and max(gaps) < 1.0, gaps
    finally:
        notify.close()
        if dns is not None:
            tb.stop(dns)
        mesh.close()
