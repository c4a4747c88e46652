"""Loss per peer, measured by the receiver and told to the sender
(docs/protocol.md §12 "Loss reports").

Every datagram carries its sender's clock second (`ts`). The sender counts
its data transmissions to each peer per second (every data datagram or
shard on every path, copies included); the receiver counts, per source peer
and second, what data arrived (authenticated datagrams, duplicates
included, and the shards of messages that decoded or expired). Keepalives
and reports are not counted, so two idle peers never report to each other. Every REPORT_INTERVAL the receiver sends
each peer it heard from a report for the complete seconds it has not
reported yet, zeros included; the sender divides. Both ends keep a few
counters per peer and second, pruned after REPORT_HORIZON seconds.

The sender turns the smoothed loss into parity shards for super-packets
(fragments.parity_for) and into extra copies of small packets (copies_for).
"""

from __future__ import annotations

import collections
import math
import struct

from .fragments import parity_for

REPORT_DELAY = 2          # a second is reported once it is this far behind: its shards have all expired
REPORT_MAX_SECONDS = 16   # seconds per report
REPORT_HORIZON = 30       # counters older than this are forgotten unreported
MIN_SAMPLE = 10           # transmissions before a loss estimate moves
SMOOTHING = 0.5           # weight of the newest sample
SMALL_PACKET = 256        # plaintext bytes up to which a packet gets copies on a lossy path
MAX_COPIES = 4            # extra copies of a small packet
COPY_TARGET = 0.005       # each small packet lost (all copies) with at most this probability

_HEAD = struct.Struct(">IB")   # first second, number of seconds
_COUNT = struct.Struct(">I")


def copies_for(loss: float) -> int:
    """Extra copies of a small packet so that all of them are lost with
    probability <= COPY_TARGET at independent loss `loss`; 0 below 2 %."""
    if loss < 0.02:
        return 0
    return min(MAX_COPIES, math.ceil(math.log(COPY_TARGET) / math.log(min(loss, 0.9))) - 1)


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
        # derived from `loss` when it moves (parity_for sums a binomial tail: not per message)
        self.parity: dict[int, int] = {}                     # peer -> parity shards per super-packet
        self.copies: dict[int, int] = {}                     # peer -> extra copies of a small packet

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
        self.parity[peer] = parity_for(estimate, self.k)
        self.copies[peer] = copies_for(estimate)
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
        for table in (self.reported, self._sample, self.loss, self.parity, self.copies):
            for peer in [p for p in table if p not in peers]:
                del table[peer]
