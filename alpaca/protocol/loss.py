"""Loss per peer, measured by the receiver and told to the sender
(docs/protocol.md §12 "Loss reports").

What is measured is the loss of the union of the paths (what FEC has to
repair): every datagram and every shard counts once, when its first copy
arrives, however many paths, `duplicate` copies or early copies carry it. A
clean second path makes it ~0 and parity goes away (multi-path and FEC are
not paid twice); two paths of 30 % loss each make it ~9 %. Two counts:

- Shards: each carries its message's k and m and its index, so the
  receiver alone knows what was sent. Reassembly counts each shard into the
  source's tally as soon as its fate is known (reassembly.py: at the
  message's decoding, at a later shard, or when the message is forgotten).
  A tally is reported every REPORT_INTERVAL, and the first at once (the
  first ever, and the first after RETELL_AFTER without a report), so the
  sender hears of loss within a report interval of the first lossy message,
  and a sender whose estimate went stale while idle is answered within a
  round trip.
- Whole datagrams: every datagram carries its sender's clock second (`ts`);
  both ends count them per peer and second (the receiver a first copy that
  passed the replay check), and the receiver reports the complete seconds,
  REPORT_DELAY behind, zeros included; the sender divides.

Keepalives and reports are not counted, so two idle peers never report to
each other. Both ends keep a few counters per peer (and second), pruned
after REPORT_HORIZON seconds or when the peer leaves.

Bulk over several paths (docs/protocol.md §13 "Spreading"): a message of
shards to a peer normally goes on every path, so what is measured is the
loss of the union. When that union still loses SPREAD_ENTER or more (every
path is lossy: one clean path would make it ~0), doubling every byte no
longer buys much, and the peer's multi-datagram messages are spread: each
shard on one path, the paths taking equal blocks, with parity for the loss
of one path. What the reports measure then is that loss, so the estimate is
converted at the switch (the union of n equal paths loses p^n; into
spreading it is at least PRIOR_LOSS until the first reports of spread bulk)
and the reports of the next SETTLE seconds, which mix both ways of sending,
are not counted. Spreading ends when the loss falls below SPREAD_LEAVE.

The estimate is lost / sent over the samples, the older ones weighed down by
KEEP per sample, with the prior as the first sample (PRIOR_WEIGHT shards at
PRIOR_LOSS): a small sample moves the estimate, a big one decides it (a
dozen clean shards do not say a path is clean, and a transfer's last
report of 10 shards does not halve what 20,000 measured),
and it changes on reports only, so it survives an idle tunnel. The sender
turns it into parity shards per message size k (fec.parity_for, cached per
peer until the estimate moves).
"""

from __future__ import annotations

import collections
import struct

from .fec import parity_for

REPORT_DELAY = 2          # a second of whole datagrams is reported once it is this far behind (late copies in)
REPORT_MAX_SECONDS = 16   # seconds per report
REPORT_HORIZON = 30       # counters older than this are forgotten unreported
MIN_SAMPLE = 10           # datagrams and shards sent before a loss estimate moves
KEEP = 0.5                # what the evidence before a sample still weighs after it
# what a sender assumes of a peer that has not reported yet: the worst loss
# the parity table is built for (docs/protocol.md §13)
PRIOR_LOSS = 0.3
# ...and what it weighs once reports come: as much as this many shards sent,
# weighed down like any sample. A first sample of a dozen clean shards (5 %
# loss shows none in 54 % of them) so leaves ~9 %, not 0: the rest of the
# transfer keeps parity until a bigger sample says the path is clean
PRIOR_WEIGHT = 10
_prior: dict[int, int] = {}  # k -> parity for PRIOR_LOSS
SPREAD_ENTER = 0.01       # union loss of duplicated bulk at which it is spread instead (two paths of 10 %)
SPREAD_LEAVE = 0.05       # loss of spread bulk under which it is duplicated again (union 0.25 %: hysteresis)
SETTLE = 1.0              # seconds after a switch whose reports are not counted
# an estimate no report has confirmed for this long is stale: small packets
# (FEC batches) get at least the prior's parity until a report confirms the
# path, since they start and steer connections, and a path may have turned
# lossy while idle (docs/protocol.md §13 "No cold start"). A report that saw
# shards lost confirms nothing until the estimate moves
STALE_AFTER = 5.0
# a receiver that has not reported to a peer for this long reports its next
# shards at once, as it does its first: the peer's estimate may be stale
# and its small packets wait for that report to go without the prior's parity
RETELL_AFTER = STALE_AFTER - 0.5

_HEAD = struct.Struct(">IB")   # first second, number of seconds
_COUNT = struct.Struct(">I")
_TALLY = struct.Struct(">II")  # shards sent, shards arrived (after the seconds)


class BadReport(ValueError):
    pass


class LossMeter:
    """k: data shards of the biggest message (64 KiB), whose parity status shows."""

    def __init__(self, k: int):
        self.k = k
        self.sent: dict[int, collections.Counter] = {}       # peer -> {ts: whole datagrams sent}
        self.arrived: dict[int, collections.Counter] = {}    # peer -> {ts: whole datagrams arrived}
        # peer -> whole seconds its clock is ahead of ours (node.py: from its answers)
        self.clock_offsets: dict[int, int] = {}
        self.reported: dict[int, int] = {}                   # peer -> last second reported to it
        self.tally: dict[int, list[int]] = {}                # peer -> [shards sent, arrived] unreported
        # peers whose first shard tally waits: it is reported at once, not on
        # the next REPORT_INTERVAL, so a sender drops PRIOR_LOSS within a
        # round trip of its first transfer on a clean path
        self.first: set[int] = set()
        self.told: dict[int, float] = {}                     # peer -> when we last reported to it (within RETELL_AFTER)
        self._sample: dict[int, list[int]] = {}              # peer -> [arrived, sent] so far
        self._evidence: dict[int, list[float]] = {}          # peer -> [lost, sent], weighed down by KEEP
        self.loss: dict[int, float] = {}                     # peer -> estimated loss of what we send it
        # derived from `loss` per message size k, and forgotten when it moves
        # (parity_for sums binomial tails: not once per message)
        self._parity: dict[int, dict[int, int]] = {}         # peer -> {k: parity shards}
        self.spread: set[int] = set()                        # peers whose bulk is spread over paths
        self.paths: dict[int, int] = {}                      # peer -> paths its latest bulk could use
        self._settle: dict[int, float] = {}                  # peer -> reports before this are not counted
        self.reported_at: dict[int, float] = {}              # peer -> when its latest report came

    def parity(self, peer: int, k: int) -> int:
        """Parity shards for a message of k data shards to peer. Before the
        peer's first report the loss is not known, and a cold tunnel must
        not lose its first connection to a lossy path: parity for PRIOR_LOSS
        then, until evidence replaces it (a clean path's first report, about
        a second into its first transfer, takes it to 0)."""
        table = self._parity.get(peer)
        if table is None:
            return self.prior_parity(k)
        m = table.get(k)
        if m is None:
            m = table[k] = parity_for(self.loss[peer], k)
        return m

    def stale(self, peer: int, now: float) -> bool:
        """Has the peer's estimate gone unconfirmed for STALE_AFTER?"""
        return now - self.reported_at.get(peer, now) > STALE_AFTER

    def prior_parity(self, k: int) -> int:
        m = _prior.get(k)
        if m is None:
            m = _prior[k] = parity_for(PRIOR_LOSS, k)
        return m

    # ------------------------------------------------------------ counting
    def count_sent(self, peer: int, ts: int, n: int) -> None:
        counter = self.sent.get(peer)
        if counter is None:
            counter = self.sent[peer] = collections.Counter()
        counter[ts] += n

    def count_shards(self, peer: int, sent: int, arrived: int) -> None:
        tally = self.tally.get(peer)
        if tally is None:
            tally = self.tally[peer] = [0, 0]
            if peer not in self.told:
                self.first.add(peer)
        tally[0] += sent
        tally[1] += arrived

    def count_arrived(self, peer: int, ts: int, n: int = 1) -> None:
        counter = self.arrived.get(peer)
        if counter is None:
            counter = self.arrived[peer] = collections.Counter()
        counter[ts] += n

    # ------------------------------------------------------------ receiver side
    def reports(self, now: float, peers: set[int] | None = None) -> list[tuple[int, bytes]]:
        """(peer, payload) for every peer (of `peers`, if given) with complete seconds or a shard tally
        to report: first second (u32) | n (u8) | n x arrivals (u32) | shards sent (u32) | shards arrived (u32)."""
        out = []
        if peers is None:
            for peer in [p for p, at in self.told.items() if now - at > RETELL_AFTER]:
                del self.told[peer]
        for peer in (set(self.arrived) | set(self.tally)) if peers is None else peers:
            last = int(now) + self.clock_offsets.get(peer, 0) - REPORT_DELAY     # seconds of its clock
            counts, first = [], 0
            counter = self.arrived.get(peer)
            if counter is not None:
                first = max(self.reported.get(peer, min(counter) - 1) + 1, last - REPORT_MAX_SECONDS + 1)
                if first <= last:
                    counts = [counter.pop(ts, 0) for ts in range(first, last + 1)]
                    for ts in [t for t in counter if t < first]:
                        del counter[ts]             # too old to report
                    if not counter:
                        del self.arrived[peer]
                    self.reported[peer] = last
            tally = self.tally.pop(peer, (0, 0))
            if tally[1] > tally[0]:
                # a shard out of order after its gap went out counted as lost
                # (reassembly.py): it waits for a report with more sent
                self.tally[peer] = [0, tally[1] - tally[0]]
                tally = (tally[0], tally[0])
            self.first.discard(peer)
            if any(counts) or tally[0]:
                self.told[peer] = now
                out.append((peer, _HEAD.pack(first, len(counts)) + b"".join(_COUNT.pack(c) for c in counts)
                            + _TALLY.pack(*tally)))
        return out

    # ------------------------------------------------------------ sender side
    def on_report(self, peer: int, payload: bytes, now: float) -> float | None:
        """Take a report; returns the new loss estimate when it moved."""
        if len(payload) < _HEAD.size:
            raise BadReport("short")
        first, n = _HEAD.unpack_from(payload)
        if n > REPORT_MAX_SECONDS or len(payload) != _HEAD.size + n * _COUNT.size + _TALLY.size:
            raise BadReport("length")
        shards_sent, shards_arrived = _TALLY.unpack_from(payload, _HEAD.size + n * _COUNT.size)
        if shards_arrived > shards_sent:
            raise BadReport("more shards arrived than were sent")
        sent = self.sent.get(peer, {})
        if shards_arrived == shards_sent or not self.stale(peer, now):
            self.reported_at[peer] = now
        if now < self._settle.get(peer, now):
            for i in range(n):          # (what it says is dropped with it)
                sent.pop(first + i, 0)
            return None
        sample = self._sample.setdefault(peer, [0, 0])
        sample[0] += shards_arrived
        sample[1] += shards_sent
        for i in range(n):
            sample[0] += _COUNT.unpack_from(payload, _HEAD.size + i * _COUNT.size)[0]
            sample[1] += sent.pop(first + i, 0) if sent else 0
        if sample[1] < MIN_SAMPLE:
            return None
        self._sample[peer] = [0, 0]
        evidence = self._evidence.get(peer)
        if evidence is None:
            evidence = self._evidence[peer] = [PRIOR_LOSS * PRIOR_WEIGHT, float(PRIOR_WEIGHT)]
        evidence[0] = KEEP * evidence[0] + max(0, sample[1] - sample[0])
        evidence[1] = KEEP * evidence[1] + sample[1]
        self.loss[peer] = estimate = evidence[0] / evidence[1]
        self.reported_at[peer] = now            # (confirmed or not before: the estimate is new)
        self._parity[peer] = {}
        n = self.paths.get(peer, 1)
        if n > 1 and (estimate < SPREAD_LEAVE if peer in self.spread else estimate >= SPREAD_ENTER):
            self._switch(peer, estimate, n, now)
        return self.loss[peer]

    def _switch(self, peer: int, estimate: float, n: int, now: float) -> None:
        """From duplicating bulk on n paths to spreading it, or back; the
        estimate becomes that of the new way (n equal, independent paths)."""
        if peer in self.spread:
            self.spread.discard(peer)
            converted = estimate ** n
        else:
            # n equal paths would each lose estimate^(1/n); unequal ones lose
            # more on average (the mean is at least the geometric mean), and
            # an estimate still converging may be low: until the reports of
            # spread bulk come in, parity for at least PRIOR_LOSS (measured:
            # a switch on 11 % that was 30 % lost ~100 messages, BBR 700
            # retransmits)
            self.spread.add(peer)
            converted = max(estimate ** (1 / n), PRIOR_LOSS)
        evidence = self._evidence[peer]
        evidence[0] = converted * evidence[1]
        self.loss[peer] = converted
        self._settle[peer] = now + SETTLE

    # ------------------------------------------------------------ upkeep
    def prune(self, now: float, peers) -> None:
        """Forget counters older than REPORT_HORIZON and peers no longer in the table."""
        for table in (self.sent, self.arrived):
            for peer in list(table):
                counter = table[peer]
                if peer not in peers:
                    del table[peer]
                    continue
                # arrivals count seconds of the sender's clock
                oldest = int(now) - REPORT_HORIZON + (self.clock_offsets.get(peer, 0) if table is self.arrived else 0)
                for ts in [t for t in counter if t < oldest]:
                    del counter[ts]
                if not counter:
                    del table[peer]
        for table in (self.reported, self.tally, self._sample, self._evidence, self.loss, self._parity,
                      self.clock_offsets, self.paths, self._settle, self.reported_at, self.told):
            for peer in [p for p in table if p not in peers]:
                del table[peer]
        self.first &= set(peers)
        self.spread &= set(peers)
