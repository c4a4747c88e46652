"""Authenticated shards in, whole message bodies out (docs/protocol.md §12).

Only shards whose MAC verified and that passed the replay window reach this
module, so everything it keeps was sent by the peer it is filed under: a
forger cannot open a slot, fill the budget or move a loss tally. It is still
bounded, since a member's own bugs (or a compromised member) must not take
the memory of the others:

- at most REASSEMBLY_PER_PEER messages and REASSEMBLY_PEER_BYTES chunk bytes
  per source peer, REASSEMBLY_TOTAL messages and REASSEMBLY_BYTES in all;
- every sub-header is bounded before its shard is kept (fec.valid_sub);
- a message still incomplete REASSEMBLY_TIMEOUT after its first shard is
  dropped (counted `incomplete` against its peer).

For each source it tallies shards sent against the distinct indices that
arrived, straight into the loss meter (`count`: loss.LossMeter.count_shards,
which reports it). A shard is counted as soon as its fate is known, so a
report never holds back the messages that lost shards while those that
lost none go out (that bias once read 0 % on a 10 % path):

- shards leave in index order, so a shard missing before the latest one
  that arrived is lost (senders before 2026-12-04 sent the short last data
  shard after the parity: it is then counted lost at the decoding and
  arrived when it comes, which nets out);
- when a message is decoded: positions 0 .. the latest arrived are sent,
  the distinct shards that arrived arrived;
- a late shard of a decoded message: arrived, and sent as far as its
  position reaches past the latest before (one that comes out of order,
  after its gap was counted, only adds itself as arrived);
- when the message is forgotten (all k + m in, or REASSEMBLY_TIMEOUT after
  its first shard, or pushed out of the DONE_LIMIT messages remembered):
  the positions past the latest that never came are sent, not arrived;
- a message that expires short of k: k + m sent, what came arrived.

A decoded message is remembered (which chunk indices arrived, not their
bytes) so its late parity is counted instead of starting a new message. A
copy of a shard never gets here: it has the seq of the shard, and the
replay window drops it.
"""

from __future__ import annotations

import collections
from typing import Callable

from .constants import (REASSEMBLY_BYTES, REASSEMBLY_PEER_BYTES, REASSEMBLY_PER_PEER, REASSEMBLY_TIMEOUT,
                        REASSEMBLY_TOTAL)
from .drops import DropReason
from .fec import decode, shard_size, valid_sub

DONE_LIMIT = 8192          # decoded messages remembered (a few hundred bytes each)

Key = tuple                # (src, session, ts, seq of the message)


class Reassembly:
    __slots__ = ("k", "m", "length", "isal", "size", "last", "chunks", "held", "born")

    def __init__(self, k: int, m: int, length: int, now: float, isal: bool = False):
        self.k, self.m, self.length, self.isal = k, m, length, isal
        self.size = shard_size(length, k)
        self.last = length - (k - 1) * self.size     # the last data chunk's size
        self.chunks: dict[int, bytes] = {}
        self.held = 0                                # bytes of chunks held
        self.born = now

    def fits(self, index: int, k: int, m: int, length: int, isal: bool, chunk_len: int) -> bool:
        """Does a shard agree with its message's first shard?"""
        return (k == self.k and m == self.m and length == self.length and isal == self.isal
                and index < k + m and chunk_len == (self.last if index == k - 1 else self.size))

    def decode(self) -> bytes:
        return decode(self.k, self.m, self.isal, self.chunks, self.size, self.length)


class Reassembler:
    def __init__(self, count: Callable[[int, int, int], None]):
        self.count = count              # (src, chunks sent, distinct chunks arrived) of a message gone
        self.slots: collections.OrderedDict[Key, Reassembly] = collections.OrderedDict()
        self.per_peer: collections.Counter[int] = collections.Counter()      # src -> slots
        self.peer_bytes: collections.Counter[int] = collections.Counter()    # src -> bytes held
        self.bytes = 0
        # decoded messages: key -> [bitmask of chunk indices seen, k + m, born, latest index seen]
        self.done: collections.OrderedDict[Key, list] = collections.OrderedDict()
        # messages that expired incomplete since take_expired: their peers' `incomplete` drops
        self.expired: list[tuple[Key, Reassembly]] = []

    def add(self, key: Key, index: int, k: int, m: int, length: int, isal: bool, chunk,
            now: float) -> tuple[Reassembly | None, DropReason | None]:
        """File one authenticated shard. Returns (slot, None) when it
        completes its message (the caller decodes it and calls `finish`),
        (None, None) when it was filed or was a surplus shard of a message
        already decoded, and (None, reason) when it is dropped."""
        slot = self.slots.get(key)
        if slot is None:
            seen = self.done.get(key)
            if seen is not None:
                if index >= seen[1]:        # (k + m of the message decoded)
                    return None, DropReason.BAD_SHARD
                bit = 1 << index            # a surplus shard (late parity): for the loss report
                if not seen[0] & bit:
                    seen[0] |= bit
                    reached = max(index - seen[3], 0)
                    seen[3] += reached
                    self.count(key[0], reached, 1)
                    if seen[0] == (1 << seen[1]) - 1:
                        del self.done[key]  # all k + m in: nothing more to wait for
                return None, None
            if not valid_sub(index, k, m, length, len(chunk)):
                return None, DropReason.BAD_SHARD
            src = key[0]
            if not self._room(src, len(chunk), now):
                return None, DropReason.REASSEMBLY_FULL
            slot = self.slots[key] = Reassembly(k, m, length, now, isal)
            self.per_peer[src] += 1
        elif not slot.fits(index, k, m, length, isal, len(chunk)):
            return None, DropReason.BAD_SHARD
        elif index in slot.chunks:
            return None, None               # (the replay window lets no copy through; kept for safety)
        elif not self._room(key[0], len(chunk), now, new=False):
            return None, DropReason.REASSEMBLY_FULL
        slot.chunks[index] = chunk
        slot.held += len(chunk)
        self.peer_bytes[key[0]] += len(chunk)
        self.bytes += len(chunk)
        if len(slot.chunks) < slot.k:
            return None, None
        return slot, None

    def add_next(self, key: Key, slot: Reassembly, index: int, chunk) -> bool | None:
        """File the predicted next chunk of a message in progress (its size
        and sub-header are what `slot` expects: the caller predicted them
        from the message's first shard). True when it completes the message,
        False when filed, None when the slot is gone or a budget is full
        (the caller goes the full way, `add`)."""
        if self.slots.get(key) is not slot or index in slot.chunks:
            return None
        src, n = key[0], len(chunk)
        if self.peer_bytes[src] + n > REASSEMBLY_PEER_BYTES or self.bytes + n > REASSEMBLY_BYTES:
            return None
        slot.chunks[index] = chunk
        slot.held += n
        self.peer_bytes[src] += n
        self.bytes += n
        return len(slot.chunks) >= slot.k

    def _room(self, src: int, size: int, now: float, new: bool = True) -> bool:
        def full() -> bool:
            return ((new and (self.per_peer[src] >= REASSEMBLY_PER_PEER or len(self.slots) >= REASSEMBLY_TOTAL))
                    or self.peer_bytes[src] + size > REASSEMBLY_PEER_BYTES or self.bytes + size > REASSEMBLY_BYTES)
        if full():
            self.expire(now)
            return not full()
        return True

    def finish(self, key: Key, slot: Reassembly) -> None:
        """The message of `slot` was decoded (or failed to): remember which
        chunks arrived, free its bytes."""
        self._forget(key, slot)
        k, m = slot.k, slot.m
        if len(slot.chunks) == k + m:
            self.count(key[0], k + m, k + m)
            return                  # every shard in (no parity, or no loss): nothing to wait for
        mask = 0
        for i in slot.chunks:
            mask |= 1 << i
        latest = max(slot.chunks)                   # (shards leave in index order)
        self.count(key[0], latest + 1, len(slot.chunks))
        if len(self.done) >= DONE_LIMIT:
            self._retire(*self.done.popitem(last=False))
        self.done[key] = [mask, k + m, slot.born, latest]

    def _forget(self, key: Key, slot: Reassembly) -> None:
        del self.slots[key]
        src = key[0]
        self.per_peer[src] -= 1
        if not self.per_peer[src]:
            del self.per_peer[src]
        self.peer_bytes[src] -= slot.held
        if not self.peer_bytes[src]:
            del self.peer_bytes[src]
        self.bytes -= slot.held

    def _retire(self, key: Key, seen: list) -> None:
        """A decoded message is forgotten: its shards after the latest that
        arrived are lost."""
        tail = seen[1] - 1 - seen[3]
        if tail:
            self.count(key[0], tail, 0)

    def expire(self, now: float) -> None:
        """Forget messages older than the timeout; those that never completed
        go to `expired` and into their source's loss tally. Decoded ones add
        their missing tail to it here, when no more of their shards are
        expected."""
        lost = self.expired
        slots = self.slots
        while slots:
            key, slot = next(iter(slots.items()))
            if now - slot.born < REASSEMBLY_TIMEOUT:
                break
            self._forget(key, slot)
            self.count(key[0], slot.k + slot.m, len(slot.chunks))
            lost.append((key, slot))
        done = self.done
        while done:
            key, seen = next(iter(done.items()))
            if now - seen[2] < REASSEMBLY_TIMEOUT:
                break
            del done[key]
            self._retire(key, seen)

    def take_expired(self) -> list[tuple[Key, Reassembly]]:
        expired, self.expired = self.expired, []
        return expired

    def forget_peer(self, src: int) -> None:
        """A peer left the table (or changed its key): drop what it sent."""
        for key in [k for k in self.slots if k[0] == src]:
            self._forget(key, self.slots[key])
        for key in [k for k in self.done if k[0] == src]:
            del self.done[key]
