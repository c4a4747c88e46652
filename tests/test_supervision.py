"""alpaca/supervision.py: when the socket filter against floods goes on and
off, and the drop summary (pure: counters in, verdicts and lines out)."""

from __future__ import annotations

import logging

import pytest

from alpaca.protocol.drops import DropReason
from alpaca.supervision import FLOOD_HOLD, FLOOD_MIN, FLOOD_RATE, DropSummary, FloodGuard


def test_the_filter_goes_on_with_a_flood_and_off_after_a_quiet_hold():
    guard, t, drops, garbage = FloodGuard(), 0.0, 0, 0

    def check(new_garbage: int = 0, new_drops: int = 0) -> str:
        nonlocal t, drops, garbage
        t, drops, garbage = t + 0.5, drops + new_drops, garbage + new_garbage
        return guard.check(t, 0.5, drops, garbage).action

    assert check(FLOOD_RATE // 4) == "quiet"                  # a moderate flood the daemon reads
    assert check(50, 10_000) == "quiet"                       # a full buffer, but hardly any garbage
    assert check(FLOOD_RATE // 2 + 1) == "start"              # garbage at FLOOD_RATE
    assert check(new_drops=50_000) == "hold"
    for _ in range(int(FLOOD_HOLD / 0.5) - 1):
        assert check(new_drops=FLOOD_MIN - 1) == "hold"       # little dropped: counting down
    assert check(new_drops=10) == "end"
    assert check(FLOOD_MIN, 1) == "start"                     # some garbage while the kernel drops


def test_the_kernels_32_bit_drop_counter_may_wrap():
    guard = FloodGuard(kernel_drops=(1 << 32) - 10)
    verdict = guard.check(1.0, 0.5, 5, FLOOD_MIN)
    assert verdict.kernel_drops == 15 and verdict.action == "start"


def test_the_summary_names_the_peers_with_the_most_and_only_what_grew():
    summary = DropSummary()
    counts = {(None, DropReason.MALFORMED): 7, (4097, DropReason.REPLAY): 3, (4098, DropReason.REPLAY): 9,
              (4099, DropReason.REPLAY): 1, (4100, DropReason.REPLAY): 2, (4097, DropReason.DUPLICATE): 5}
    lines = dict((line.split("(")[1].split(")")[0], (level, line)) for level, line in summary.lines(counts))
    assert lines["malformed"][1] == "dropped 7 datagrams (malformed) in the last 10 s: not tied to a peer"
    assert lines["replay"][1] == ("dropped 15 datagrams (replay) in the last 10 s: peer 16.2 9, peer 16.1 3, "
                                  "peer 16.4 2 and 1 more peers")
    assert lines["duplicate"][0] == logging.DEBUG                # normal with multi-path: not at INFO
    assert summary.lines(counts) == []                           # nothing new
    counts[(4099, DropReason.REPLAY)] += 4
    assert summary.lines(counts) == [(logging.INFO, "dropped 4 datagrams (replay) in the last 10 s: peer 16.3 4")]


def test_the_daemons_timers_periodic_one_shot_and_a_clock_step_back():
    from alpaca.supervision import Schedule
    timers = Schedule()
    timers.every("status", 5.0, 100.0)
    timers.every("flood", 0.5, 100.0)
    assert timers.next_deadline() == 100.5 and timers.take_due(100.4) == []
    due = timers.take_due(100.6)
    assert [n for n, _ in due] == ["flood"] and due[0][1] == pytest.approx(0.6)    # seconds since it last ran
    timers.once("secrets", 101.0)
    timers.once("secrets", 101.3)                  # a second edit moves the debounce
    assert [n for n, _ in timers.take_due(101.2)] == ["flood"]
    assert [n for n, _ in timers.take_due(101.3)] == ["secrets"]
    assert "secrets" not in [n for n, _ in timers.take_due(200.0)]   # one-shot: gone
    # the wall clock steps back a day: periodic timers run at once, not in a day
    assert sorted(n for n, _ in timers.take_due(200.0 - 86400)) == ["flood", "status"]
    assert timers.next_deadline() == 200.0 - 86400 + 0.5
