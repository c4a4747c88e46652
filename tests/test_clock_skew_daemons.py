"""Tier 3: two real daemons whose clocks disagree (docs/protocol.md §5
"Clock offsets").

Server 1.1 runs on the host's clock; client 16.1 runs with its wall clock
moved by alpaca.lab.skewed_clock (the host's clock is left alone). Pings
go both ways at once, again after the skewed side restarts and after the
server restarts, and `status --json` shows each side the other's offset.
"""

from __future__ import annotations

import pytest

from alpaca.lab.daemons import Mesh
from alpaca.lab.skewed_clock import launcher
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root
DAY = 86_400
SERVER, CLIENT = "10.17.1.1", "10.17.16.1"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Server 1.1 (s1) running; client 16.1 (c1) configured, started by each test."""
    mesh = Mesh(Testbed(unique_prefix()), tmp_path_factory.mktemp("skew"))
    try:
        ip = mesh.tb.add_host("s1", 1)
        mesh.tb.add_host("c1", 16)
        lines = [mesh.line("1.1", ip), mesh.line("16.1", None)]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, lines)
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, lines)
        start(mesh, "s1")
        yield mesh
    finally:
        mesh.close()


def start(mesh: Mesh, name: str, skew: float | None = None) -> None:
    daemon = mesh.peers[name]
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop()
        daemon.control_socket.unlink(missing_ok=True)
    daemon.start(launcher=launcher(skew) if skew is not None else None)
    assert wait_for(daemon.control_socket.exists, 10), daemon.log_text()


def pings(mesh: Mesh) -> None:
    """A ping each way gets through within a few seconds of a start."""
    for name, to in (("c1", SERVER), ("s1", CLIENT)):
        assert wait_for(lambda: mesh.peers[name].run(["ping", "-n", "-c", "1", "-W", "1", to]).returncode == 0,
                        5), (name, mesh.peers["s1"].status(), mesh.peers["c1"].status())


def offsets(mesh: Mesh) -> tuple[float | None, float | None]:
    """(the client's clock as the server measured it, the server's as the client did)."""
    return mesh.peers["s1"].peer_status("16.1")["clock_offset"], mesh.peers["c1"].peer_status("1.1")["clock_offset"]


@pytest.mark.parametrize("skew", [6, -6, DAY, -DAY])
def test_pings_go_both_ways_whatever_the_clients_clock(pair, skew):
    start(pair, "c1", skew)
    pings(pair)
    start(pair, "c1", skew)                  # the skewed side restarts: a new session
    pings(pair)
    at_server, at_client = offsets(pair)
    assert at_server == pytest.approx(skew, abs=1.5) and at_client == pytest.approx(-skew, abs=1.5)
    if abs(skew) > 30:
        assert "its clock is" in pair.peers["s1"].log_text()


def test_the_server_restarts_while_the_client_is_a_day_behind(pair):
    start(pair, "c1", -DAY)
    pings(pair)
    start(pair, "s1")
    pings(pair)
    assert offsets(pair)[0] == pytest.approx(-DAY, abs=1.5)
