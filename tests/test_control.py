"""The control socket never stalls the datapath (alpaca/host/control.py).

Tier 1: a request that trickles in, or never comes, is cut off at its
deadline without a single blocking call. Tier 3: local clients that trickle
a request one byte every 0.4 s, or connect and say nothing, while pings
cross a real tunnel: the round trips stay within 1 ms of normal.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpaca.host.control import CLIENT_TIMEOUT, ControlServer, query

TRICKLE = r"""
import socket, sys, time
path, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        while time.monotonic() < end:
            if interval > 0:
                s.send(b'{')
            time.sleep(interval if interval > 0 else 0.2)
    except OSError:
        pass                        # cut off by the daemon: come back
    finally:
        s.close()
"""


def test_a_trickling_request_is_cut_off_at_its_deadline_without_blocking(tmp_path):
    now = [0.0]
    server = ControlServer(tmp_path / "c.sock", lambda request: {"ok": True}, clock=lambda: now[0])
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(str(tmp_path / "c.sock"))
    slow.send(b'{"comm')
    t0 = time.monotonic()
    for _ in range(50):
        server.serve_ready()                # never waits for the rest of the line
    assert time.monotonic() - t0 < 0.5
    assert len(server.clients) == 1
    now[0] = CLIENT_TIMEOUT + 0.01
    server.expire()
    assert not server.clients and server.cut_off == 1
    assert slow.recv(100) == b""            # closed, no answer
    # a well-behaved client still gets its answer
    fast = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fast.connect(str(tmp_path / "c.sock"))
    fast.sendall(json.dumps({"command": "status"}).encode() + b"\n")
    for _ in range(10):
        server.serve_ready()
    assert json.loads(fast.recv(100)) == {"ok": True}
    server.close()


def test_discover_asks_each_daemon_once_and_reports_stale_sockets(tmp_path):
    """Tier 1, in a run directory of its own: a live daemon's socket, a link
    to it (asked once), a socket nobody listens on and a dangling link
    (stale), and a file that is not a socket (ignored)."""
    import os
    import threading
    from alpaca.host.control import discover, socket_name
    run = tmp_path / "run"
    live = ControlServer(run / "wg0-0123abcd.sock", lambda request: {"id": "1.1", "name": "wg0"},
                         register=run / "wg0-89abcdef.sock")
    os.symlink(tmp_path / "gone.sock", run / "gone-01234567.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(run / "dead-76543210.sock"))       # bound, never listening: what SIGKILL leaves
    (run / "sysctl-wg0-1.json").write_text("{}")
    stop = threading.Event()
    serving = threading.Thread(target=lambda: [live.serve_ready() or time.sleep(0.01) for _ in iter(stop.is_set, True)])
    serving.start()
    try:
        found, stale, failed = discover(run, timeout=5)
    finally:
        stop.set()
        serving.join()
        dead.close()
    assert found == [{"id": "1.1", "name": "wg0"}] and not failed
    assert stale == [run / "dead-76543210.sock", run / "gone-01234567.sock"]
    assert [socket_name(p) for p in stale] == ["dead", "gone"]
    live.close()
    assert sorted(os.listdir(run)) == ["dead-76543210.sock", "gone-01234567.sock", "sysctl-wg0-1.json"]
    assert discover(tmp_path / "missing") == ([], [], [])


def ping_stats(peer, count: int = 60) -> tuple[float, int]:
    r = peer.run(["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "1", "10.17.1.1"], timeout=60)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    received = re.search(r"(\d+) received", r.stdout)
    return (float(rtt.group(1)) if rtt else float("inf")), (int(received.group(1)) if received else 0)


@pytest.mark.root
def test_trickling_and_silent_control_clients_leave_the_tunnel_alone(mesh4):
    s1, c2 = mesh4.peers["s1"], mesh4.peers["c2"]
    path = json.loads(s1.config_path.read_text())["control_socket"]
    base, got = ping_stats(c2)
    assert got == 60
    clients = [subprocess.Popen([sys.executable, "-c", TRICKLE, path, "8", str(interval)])
               for interval in (0.4, 0.4, 0.4, 0, 0)]          # three tricklers, two silent ones
    try:
        time.sleep(0.5)
        during, got = ping_stats(c2)
        status = query(Path(path), {"command": "status"}, timeout=5)   # and status still answers
    finally:
        for p in clients:
            p.kill()
            p.wait()
    print(f"\nping avg {base:.3f} ms idle, {during:.3f} ms with 5 slow control clients")
    assert got == 60
    assert during <= base + 1.0, (base, during)
    assert status["id"] == "1.1"
