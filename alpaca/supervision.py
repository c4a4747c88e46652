"""What the daemon decides from its counters, as pure logic: counters and
`now` in, a verdict or log lines out. The daemon reads the counters and
acts (alpaca/daemon.py); tests/test_supervision.py drives these directly.

- FloodGuard: when the UDP socket filter against garbage floods goes on
  and off (the filter itself: alpaca/host/udp.py).
- DropSummary: per-packet problems summed up every DROP_SUMMARY_INTERVAL,
  one log line per reason naming the peers with the most, never one line
  per packet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .protocol.drops import DropReason
from .protocol.ids import format_id

# the filter goes on when, in one check, garbage was read at FLOOD_RATE, or
# the kernel dropped datagrams and at least FLOOD_MIN of what was read was
# garbage; it goes off once the kernel has dropped fewer than FLOOD_MIN per
# check for FLOOD_HOLD
FLOOD_CHECK_INTERVAL = 0.5
FLOOD_RATE = 10_000         # unauthenticated datagrams/s (the daemon reads 30,000-150,000/s at most)
FLOOD_MIN = 100
FLOOD_HOLD = 10.0

DROP_SUMMARY_INTERVAL = 10.0
DROP_SUMMARY_PEERS = 3      # peers named in a drop summary line


@dataclass(frozen=True)
class FloodVerdict:
    action: str             # "quiet" (no flood), "start", "hold" (still on), "end"
    garbage: int = 0        # unauthenticated datagrams read since the last check
    kernel_drops: int = 0   # datagrams the kernel dropped since the last check


class FloodGuard:
    def __init__(self, kernel_drops: int = 0, garbage: int = 0):
        self._kernel_drops, self._garbage = kernel_drops, garbage
        self.since: float | None = None        # last check that saw a flood; None: filter off

    def check(self, now: float, elapsed: float, kernel_drops: int, garbage: int) -> FloodVerdict:
        """kernel_drops: the socket's drop counter (32 bits, wraps); garbage:
        unauthenticated datagrams read so far (both totals)."""
        new_drops = (kernel_drops - self._kernel_drops) % (1 << 32)
        new_garbage = garbage - self._garbage
        self._kernel_drops, self._garbage = kernel_drops, garbage
        if self.since is None:
            if new_garbage >= FLOOD_RATE * elapsed or (new_drops and new_garbage >= FLOOD_MIN):
                self.since = now
                return FloodVerdict("start", new_garbage, new_drops)
            return FloodVerdict("quiet", new_garbage, new_drops)
        if new_drops >= FLOOD_MIN:
            self.since = now
        if now - self.since >= FLOOD_HOLD:
            self.since = None
            return FloodVerdict("end", new_garbage, new_drops)
        return FloodVerdict("hold", new_garbage, new_drops)


class DropSummary:
    def __init__(self):
        self._last: dict[tuple[int | None, DropReason], int] = {}

    def lines(self, counts: dict[tuple[int | None, DropReason], int]) -> list[tuple[int, str]]:
        """counts: (peer ID, or None for drops not tied to a peer, reason) ->
        total so far. Returns (log level, line) for what grew since the last
        call: one line per reason, however many peers."""
        by_reason: dict[DropReason, list[tuple[int, int | None]]] = {}
        for (peer_id, reason), count in counts.items():
            delta = count - self._last.get((peer_id, reason), 0)
            if delta > 0:
                by_reason.setdefault(reason, []).append((delta, peer_id))
        out = []
        for reason in sorted(by_reason, key=lambda r: r.value):
            entries = sorted(by_reason[reason], key=lambda e: (-e[0], e[1] or 0))
            total = sum(n for n, _ in entries)
            who = ", ".join("not tied to a peer" if p is None else f"peer {format_id(p)} {n}"
                            for n, p in entries[:DROP_SUMMARY_PEERS])
            if len(entries) > DROP_SUMMARY_PEERS:
                who += f" and {len(entries) - DROP_SUMMARY_PEERS} more peers"
            level = logging.DEBUG if reason is DropReason.DUPLICATE else logging.INFO
            out.append((level, f"dropped {total} datagrams ({reason.value}) in the last "
                               f"{DROP_SUMMARY_INTERVAL:.0f} s: {who}"))
        self._last = dict(counts)
        return out


class Schedule:
    """The daemon's own timers, by name, beside the core's (Node.tick): periodic
    ones (`every`) and one-shot ones (`once`, e.g. a debounce), with one next
    deadline for the loop to sleep until. `now` is the wall clock, so a
    periodic deadline further ahead than its interval (the clock stepped
    back) is pulled in."""

    def __init__(self):
        self._due: dict[str, float] = {}
        self._interval: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def every(self, name: str, interval: float, now: float) -> None:
        self._interval[name], self._due[name], self._last[name] = interval, now + interval, now

    def once(self, name: str, when: float) -> None:
        """Run `name` at `when` (a later call moves it: a debounce)."""
        self._due[name] = when

    def next_deadline(self) -> float:
        return min(self._due.values(), default=float("inf"))

    def take_due(self, now: float) -> list[tuple[str, float]]:
        """The timers due at `now`, each with the seconds since it last ran
        (periodic ones are rescheduled, one-shot ones forgotten)."""
        out = []
        for name, due in list(self._due.items()):
            interval = self._interval.get(name)
            if interval is not None and due - now > interval:
                due = self._due[name] = now
            if now < due:
                continue
            if interval is None:
                del self._due[name]
                out.append((name, 0.0))
            else:
                out.append((name, now - self._last[name]))
                self._due[name], self._last[name] = now + interval, now
        return out
