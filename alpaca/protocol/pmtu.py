"""Path MTU of one of our ways to a peer, found by probes (docs/protocol.md §6 "Path MTU").

An underlay with a smaller MTU that drops the ICMP errors saying so (a PMTU
black hole: PPPoE, mobile links, careless firewalls) passes small datagrams
and loses every full-size one. The kernel never learns of it, so neither
fragments nor lowers anything; only probes tell. A probe is a challenge
padded to the size under test (challenges.py): answered, that size passes.
Each round of probes also sends one small challenge, so a round whose small
challenge went unanswered (the way is down, or lost it) proves nothing about
size.

States of a way (a simplified packetization-layer PMTU search):

  unknown    -> a round of one full-size probe (at once, then as answered)
                answered: full; unanswered (small one answered) FAILURES
                times in a row: searching between FLOOR and full
  full       -> full size passes: one full-size probe every CONFIRM seconds
                (a path that changes is found again), as above
  searching  -> rounds of 3 sizes spread between the largest answered (lo)
                and the smallest lost (hi); ends when hi - lo <= PRECISION
  limited    -> datagrams above `limit` (= lo) are sent as smaller shards;
                one full-size probe every RAISE seconds: answered, full again

Pure: every step takes `now`; the caller sends the sizes it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

UNKNOWN, FULL, SEARCHING, LIMITED = "unknown", "full", "searching", "limited"

FLOOR = 1232        # datagram bytes any IPv6 path carries (1280 - 40 - 8): assumed to pass
ROUND = 1.0         # a round's answers are awaited this long
RETRY = 0.5         # the next round after one that was not conclusive, or a search step
FAILURES = 3        # full-size rounds lost in a row (small ones answered) before searching
PRECISION = 16      # bytes: the search stops when it knows the size this closely
CONFIRM = 30.0      # full size works: probed again this often
RAISE = 60.0        # a limited way tries full size again this often
SPREAD = 3          # sizes per search round
ACTIVE = 10.0       # a peer's ways are probed until this long after its last big message


@dataclass(slots=True)
class PathMtu:
    state: str = UNKNOWN
    limit: int | None = None        # the largest datagram to send this way; None: full size
    lo: int = 0                     # searching: the largest size answered (or FLOOR)
    hi: int = 0                     # ... the smallest size lost
    failures: int = 0
    next_round: float = -math.inf
    started: float = -math.inf      # of the round in flight
    sizes: tuple = ()               # ... its sizes, () when none is in flight
    answered: set = field(default_factory=set)

    def answer(self, size: int) -> None:
        """A probe of `size` bytes was answered."""
        if size in self.sizes:
            self.answered.add(size)

    def step(self, full: int, small_answered_at: float, now: float) -> list[int]:
        """Finish the round in flight when it is over, then the sizes to probe
        now (a new round) or []. `full`: the largest datagram this node
        sends; `small_answered_at`: when a small challenge on this way was
        last answered."""
        if full <= FLOOR:
            self.state, self.limit, self.sizes = FULL, None, ()
            return []
        if self.sizes:
            small = small_answered_at >= self.started
            if not (now - self.started >= ROUND or (small and self.answered >= set(self.sizes))):
                return []
            self._finish(full, small, now)
        if now < self.next_round:
            return []
        self.started, self.answered = now, set()
        if self.state == SEARCHING:
            step = (self.hi - self.lo) / (SPREAD + 1)
            self.sizes = tuple(sorted({self.lo + round(step * i) for i in range(1, SPREAD + 1)}))
        else:
            self.sizes = (full,)
        return list(self.sizes)

    def _finish(self, full: int, small: bool, now: float) -> None:
        sizes, answered = self.sizes, self.answered
        self.sizes = ()
        if not small:
            self.next_round = now + RETRY           # the way lost the small one too: nothing learned
            return
        if self.state != SEARCHING:
            if full in answered:
                self.state, self.limit, self.failures = FULL, None, 0
                self.next_round = now + CONFIRM
            elif self.state == LIMITED:
                self.next_round = now + RAISE
            else:
                self.failures += 1
                self.next_round = now + RETRY
                if self.failures >= FAILURES:
                    self.state, self.lo, self.hi, self.failures = SEARCHING, FLOOR, full, 0
            return
        self.lo = max(answered | {self.lo})
        self.hi = min([s for s in sizes if s > self.lo and s not in answered] + [self.hi])
        if self.hi - self.lo <= PRECISION:
            self.state, self.limit = LIMITED, self.lo
            self.next_round = now + RAISE
        else:
            self.next_round = now + RETRY
