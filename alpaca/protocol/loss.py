"""Loss per peer, measured by the receiver and told to the sender
(docs/protocol.md §12 "Loss reports").

Every datagram carries its sender's clock second (`ts`). Both ends count
DISTINCT data datagrams per peer and second: the sender each whole datagram
and each shard (data and parity) once, however many paths, `duplicate`
copies or early copies carry it; the receiver each one once, the first copy
to arrive (an authenticated datagram that passed the replay check, or a shard
index of a message that decoded or expired). So the loss measured is that of
the union of the paths: what FEC has to repair. A clean second path makes it
~0 and parity goes away (multi-path and FEC are not paid twice); two paths
of 30 % loss each make it ~9 %.

Keepalives and reports are not counted, so two idle peers never report to
each other. Every REPORT_INTERVAL the receiver sends each peer it heard
from a report for the complete seconds it has not reported yet, zeros
included; the sender divides. Both ends keep a few counters per peer and
second, pruned after REPORT_HORIZON seconds.

The sender turns the smoothed loss into parity shards per message size k
(fragments.parity_for, cached per peer until the estimate moves).
"""

from __future__ import annotations

import collections
import struct

from .fragments import parity_for

REPORT_DELAY = 2          # a second is reported once it is this far behind: its shards have all expired
REPORT_MAX_SECONDS = 16   # seconds per report
REPORT_HORIZON = 30       # counters older than this are forgotten unreported
MIN_SAMPLE = 10           # transmissions before a loss estimate moves
SMOOTHING = 0.5           # weight of the newest sample

_HEAD = struct.Struct(">IB")   # first second, number of seconds
_COUNT = struct.Struct(">I")


class BadReport(ValueError):
    pass


class LossMeter:
    """k: data shards of the biggest super-packet, what parity is sized for."""

    def __init__(self, k: int):
        self.k = k
        self.sent: dict[int, collections.Counter] = {}       # peer -> {ts: transmissions}
        self.arrived: dict[int, collections.Counter] = {}    # peer -> {ts: arrivals}
        self.reported: dict[int, int] = {}                   # peer -> last second reported to it
        self._sample: dict[int, list[int]] = {}              # peer -> [arrivals, transmissions] so far
        self.loss: dict[int, float] = {}                     # peer -> smoothed loss of what we send it
        # derived from `loss` per message size k, and forgotten when it moves
        # (parity_for sums binomial tails: not once per message)
        self._parity: dict[int, dict[int, int]] = {}         # peer -> {k: parity shards}

    def parity(self, peer: int, k: int) -> int:
        """Parity shards for a message of k data shards to peer (0 before any report)."""
        table = self._parity.get(peer)
        if table is None:
            return 0
        m = table.get(k)
        if m is None:
            m = table[k] = parity_for(self.loss[peer], k)
        return m

    # ------------------------------------------------------------ counting
    def count_sent(self, peer: int, ts: int, n: int) -> None:
        counter = self.sent.get(peer)
        if counter is None:
            counter = self.sent[peer] = collections.Counter()
        counter[ts] += n

    def count_arrived(self, peer: int, ts: int, n: int = 1) -> None:
        counter = self.arrived.get(peer)
        if counter is None:
            counter = self.arrived[peer] = collections.Counter()
        counter[ts] += n

    # ------------------------------------------------------------ receiver side
    def reports(self, now: float) -> list[tuple[int, bytes]]:
        """(peer, payload) for every peer that has complete seconds to report."""
        last = int(now) - REPORT_DELAY
        out = []
        for peer, counter in list(self.arrived.items()):
            first = max(self.reported.get(peer, min(counter) - 1) + 1, last - REPORT_MAX_SECONDS + 1)
            if first > last:
                continue
            counts = [counter.pop(ts, 0) for ts in range(first, last + 1)]
            for ts in [t for t in counter if t < first]:
                del counter[ts]             # too old to report
            if not counter:
                del self.arrived[peer]
            self.reported[peer] = last
            if any(counts):
                out.append((peer, _HEAD.pack(first, len(counts)) + b"".join(_COUNT.pack(c) for c in counts)))
        return out

    # ------------------------------------------------------------ sender side
    def on_report(self, peer: int, payload: bytes) -> float | None:
        """Take a report; returns the new loss estimate when it moved."""
        if len(payload) < _HEAD.size:
            raise BadReport("short")
        first, n = _HEAD.unpack_from(payload)
        if n == 0 or n > REPORT_MAX_SECONDS or len(payload) != _HEAD.size + n * _COUNT.size:
            raise BadReport("length")
        sent = self.sent.get(peer, {})
        sample = self._sample.setdefault(peer, [0, 0])
        for i in range(n):
            sample[0] += _COUNT.unpack_from(payload, _HEAD.size + i * _COUNT.size)[0]
            sample[1] += sent.pop(first + i, 0) if sent else 0
        if sample[1] < MIN_SAMPLE:
            return None
        loss = max(0.0, 1 - sample[0] / sample[1])
        self._sample[peer] = [0, 0]
        old = self.loss.get(peer)
        self.loss[peer] = estimate = loss if old is None else SMOOTHING * loss + (1 - SMOOTHING) * old
        self._parity[peer] = {}
        return estimate

    # ------------------------------------------------------------ upkeep
    def prune(self, now: float, peers) -> None:
        """Forget counters older than REPORT_HORIZON and peers no longer in the table."""
        oldest = int(now) - REPORT_HORIZON
        for table in (self.sent, self.arrived):
            for peer in list(table):
                counter = table[peer]
                if peer not in peers:
                    del table[peer]
                    continue
                for ts in [t for t in counter if t < oldest]:
                    del counter[ts]
                if not counter:
                    del table[peer]
        for table in (self.reported, self._sample, self.loss, self._parity):
            for peer in [p for p in table if p not in peers]:
                del table[peer]
