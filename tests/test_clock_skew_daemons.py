"""Tier 3: two real daemons whose clocks disagree (docs/protocol.md §5
"Clock offsets").

Server 1.1 runs on the host's clock; client 16.1 runs with its wall clock
moved by alpaca.lab.skewed_clock (the host's clock is left alone). For
each skew: pings go both ways from the start, again after the client
restarts and after the server restarts; `status` shows each side the
other's offset (the table, and the log, when it is far off); and the
client's datagrams captured before its restart, replayed to the server,
are each counted as a drop and none is taken.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from alpaca.lab.daemons import Mesh
from alpaca.protocol.constants import REPLAY_WINDOW
from alpaca.lab.skewed_clock import launcher
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for
from alpaca.status import format_status

from test_security import Sniffer, send, settle

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


def captured_traffic(mesh: Mesh, name: str) -> tuple[list[bytes], float]:
    """The client's datagrams to the server during 5 pings: data,
    keepalives, challenges, answers, as an on-path attacker records them;
    and when they were recorded."""
    sniff = Sniffer(mesh, "s1", mesh.ip["c1"], 200, 10, name)
    assert mesh.peers["c1"].run(["ping", "-n", "-c", "5", "-i", "0.2", "-W", "1", SERVER]).returncode == 0
    captured = sniff.datagrams(stop=True)
    assert captured
    return captured, time.monotonic()


def replays_are_counted_and_refused(mesh: Mesh, recorded: tuple[list[bytes], float]) -> None:
    """Sent again from the client's address while the client is stopped
    (so every change at the server is the replay's): each one is a drop
    under a named reason, and none is taken. Sent only once the recording
    is stale by any clock the server may have measured: a challenge of a
    session the server forgot is answered while it is fresh (REPLAY_WINDOW
    of the peer's clock, measured to within ~2 s; docs/protocol.md §5),
    which is the protocol's answer to a new session, not a drop."""
    captured, at = recorded
    time.sleep(max(0.0, at + REPLAY_WINDOW + 3 - time.monotonic()))
    s1, c1 = mesh.peers["s1"], mesh.peers["c1"]
    c1.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.3)
        before = s1.peer_status("16.1")
        send(mesh, "c1", captured, "s1")
        dropped = settle(lambda: sum(s1.peer_status("16.1")["drops"].values()) - sum(before["drops"].values()),
                         len(captured))
        after = s1.peer_status("16.1")
        assert dropped == len(captured), (before["drops"], after["drops"])
        assert after["rx_packets"] == before["rx_packets"]
    finally:
        c1.proc.send_signal(signal.SIGCONT)


# inside the replay window either way, and far outside it either way (the
# pure tests in test_clock_skew.py cover the skews in between)
@pytest.mark.parametrize("skew", [6, -6, DAY, -DAY])
def test_traffic_both_ways_across_restarts_whatever_the_clients_clock(pair, skew):
    start(pair, "c1", skew)
    pings(pair)
    captured = captured_traffic(pair, f"before-{skew}")
    start(pair, "c1", skew)                  # the skewed side restarts: a new session
    pings(pair)
    at_server, at_client = offsets(pair)
    assert at_server == pytest.approx(skew, abs=1.5) and at_client == pytest.approx(-skew, abs=1.5)
    replays_are_counted_and_refused(pair, captured)
    start(pair, "s1")                        # the server restarts: it measures the client again
    pings(pair)
    # (a daemon just started answers slowly: the error is 1 s plus the round trip)
    assert offsets(pair)[0] == pytest.approx(skew, abs=3)
    replays_are_counted_and_refused(pair, captured)
    table = format_status(pair.peers["s1"].status())
    if abs(skew) > 30:
        assert "its clock is" in pair.peers["s1"].log_text()
        shown = re.search(r"clock ([-+]\d+) s off ours", table)
        assert shown and int(shown.group(1)) == pytest.approx(skew, abs=3), table
    else:
        assert "clock" not in table and "its clock is" not in pair.peers["s1"].log_text()
