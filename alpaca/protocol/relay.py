"""Relaying: a datagram or shard for someone else (docs/protocol.md §6).

TTL, targets, the relay window (each datagram and each shard is relayed at
most once), then the same datagram goes on with TTL-1 and path=relayed,
never back where it came from.
"""

from __future__ import annotations

from . import inner
from .constants import FLAG_BATCH, FLAG_VNET, KIND_DATA, MASK_SIZE, MAX_TTL, PATH_RELAYED, TAG_SIZE, VNET_HDR_SIZE
from .constants import INNER_HEAD
from .drops import DropReason
from .output import Output
from .peers import Addr, Peer
from .wire import NEXT_SHARD, SAMPLE, SEQ_FIELD, SEQ_SHIFT, SHARD_OVERHEAD, Header, rewrite_mutable, shard_authentic

RELAY_NEXT_LIMIT = 16      # source addresses with a relayed shard predicted


class _RelayNext:
    """The shard expected next from one address that this node relays
    (Node.from_udp): its 32 unmasked bytes as an int (the one relayed last,
    seq + 1 and index + 1), and what relaying it needs. Made only after a
    shard from there was authenticated and relayed."""
    __slots__ = ("clear", "src", "dst", "shard_key", "index", "total")

    def __init__(self, clear: int, src: Peer, dst: Peer, shard_key: bytes, index: int, total: int):
        self.clear, self.src, self.dst, self.shard_key = clear, src, dst, shard_key
        self.index, self.total = index, total


class Relay:
    """Methods of Node (node.py): they share its state."""

    def _relay(self, header: Header, full_mask: int, data: bytes, plaintext: bytes | None, addr: Addr,
               src: Peer, now: float, out: Output) -> bool:
        """An authenticated datagram or shard for someone else: same dst_id,
        TTL-1 (never more than MAX_TTL), never back to the address it came
        from (split horizon), and at most once: the relay window remembers
        every (session, ts, seq) it passed on, shards included. True when
        it was passed on."""
        if header.ttl <= 1:
            src.drops[DropReason.TTL] += 1
            return False
        dst = self.table.get(header.dst)
        targets = [a for a in self._targets(header.src, dst, now) if a != addr]
        if not targets:
            src.drops[DropReason.NO_PATH] += 1
            return False
        # relay windows count against the pair's bigger ID, whose key
        # string seals it: a member can forge only pairs above itself
        charged = src if header.src > header.dst else dst
        reason = src.check_replay(header.dst, header.session, header.ts, header.seq, now, charged)
        if reason is not None:
            src.drops[reason] += 1
            return False
        ends = None
        if plaintext is not None and header.kind == KIND_DATA and not header.flags & FLAG_BATCH:
            ends = inner.addresses(plaintext[VNET_HDR_SIZE:VNET_HDR_SIZE + INNER_HEAD]
                                   if header.flags & FLAG_VNET else plaintext)
        guarded = self._guard(targets, ends, src)       # (a loop-guard drop is counted there)
        targets = dst.sendable(guarded, len(data))
        if targets:
            relay = rewrite_mutable(data, full_mask, min(header.ttl, MAX_TTL) - 1, PATH_RELAYED)
            out.sends.extend((relay, a) for a in targets)
            src.relayed_packets += 1
            return True
        if guarded:
            src.drops[DropReason.NO_PATH] += 1          # only unproven paths, their credit spent
        return False

    def _predict_relay(self, src: Peer, header: Header, shard: tuple, addr: Addr) -> None:
        """After a shard from addr was relayed: expect the message's next one
        from there (a sender sends a message's shards on a path in order)."""
        f, clear, shard_key = shard
        if f.index + 1 >= f.k + f.m:
            self._relay_next.pop(addr, None)
            return
        if len(self._relay_next) >= RELAY_NEXT_LIMIT and addr not in self._relay_next:
            self._relay_next.clear()
        self._relay_next[addr] = _RelayNext(int.from_bytes(clear, "big") + NEXT_SHARD, src, self.table.get(header.dst),
                                            shard_key, f.index + 1, f.k + f.m)

    def _relay_train(self, rn: _RelayNext, full: int, data, datagrams: list, i: int, addr: Addr, now: float,
                     out: Output) -> int:
        """The predicted shard `data` (full: its mask) and after it the
        datagrams from datagrams[i] on while each is the next one predicted
        from addr: each has its MAC and the relay window checked and goes
        on as _relay would send it. What _relay decides once for a message
        (TTL, targets, the window's floors) is decided once a train, and so
        is the window when every shard of the train is new. Returns how
        many of datagrams[i:] were relayed besides `data`; -1 when `data`
        was not (nothing has changed then: the full path looks at it)."""
        src, dst = rn.src, rn.dst
        head = rn.clear.to_bytes(MASK_SIZE, "big")
        ttl, session, ts = head[0], head[8:16], int.from_bytes(head[16:20], "big")
        window = src.replay.get(dst.id)
        offset = src.session_offset(dst.id, session, ts, now)
        targets = [a for a in self._targets(src.id, dst, now) if a != addr]
        if (ttl <= 1 or not targets or window is None or ts < src.replay_floor + offset
                or ts <= src.old_floors.get((dst.id, session), -1)):
            return -1
        # MACs first, the window after: a shard that fails either is left,
        # with those after it, to the full path (which counts it)
        train = self._authentic_train(rn, full, data, datagrams, i, addr)
        seq = (rn.clear >> SEQ_SHIFT) & SEQ_FIELD
        if train and window.fresh_run(session, ts, seq, len(train), now, offset) and window.accept_run(
                session, ts, seq, len(train), now, offset):
            fresh = len(train)
        else:
            # (Peer.check_replay for a relay window that exists, its checks of ts done above)
            check, fresh = window.check_and_accept, 0
            while fresh < len(train) and check(session, ts, seq + fresh, now, offset) is None:
                fresh += 1
            if not fresh:
                return -1
        self._send_train(src, dst, targets, train[:fresh], min(ttl, MAX_TTL) - 1, out)
        rn.index += fresh
        rn.clear += fresh * NEXT_SHARD
        if rn.index >= rn.total:
            del self._relay_next[addr]
        return fresh - 1

    def _authentic_train(self, rn: _RelayNext, full: int, data, datagrams: list, i: int, addr: Addr) -> list:
        """(datagram, its mask) of `data` and of the datagrams from
        datagrams[i] on that are, one after another, the shards predicted
        from addr, each with its MAC verified; stops at the first that is
        not, and at the message's last shard. Changes nothing."""
        shard_key, state, from_bytes, clear = rn.shard_key, self._mask_state, int.from_bytes, rn.clear
        train, n, left = [], len(datagrams), rn.total - rn.index
        while len(data) >= SHARD_OVERHEAD + TAG_SIZE:
            if not shard_authentic(shard_key, clear.to_bytes(MASK_SIZE, "big"), data):
                break
            train.append((data, full))
            if len(train) >= left or i >= n:
                break
            data, at = datagrams[i]
            i += 1
            if at != addr:
                break
            h = state.copy()
            h.update(data[-SAMPLE:])
            full = from_bytes(h.digest(), "big")
            clear += NEXT_SHARD
            if from_bytes(data[:MASK_SIZE], "big") ^ full != clear:
                break           # (the caller's loop unmasks it again: once a train)
        return train

    @staticmethod
    def _send_train(src: Peer, dst: Peer, targets: list[Addr], train: list, ttl: int, out: Output) -> None:
        """Relay the authenticated shards of a train to targets, as _relay
        would: TTL-1, path=relayed. When no target needs credit, each
        target's shards go in a row; else shard by shard, each spending the
        credit of the targets not yet proven (Peer.sendable)."""
        sends = out.sends
        if dst.unlimited(targets):
            relays = [rewrite_mutable(data, full, ttl, PATH_RELAYED) for data, full in train]
            for a in targets:           # a target's shards in a row: one GSO send each
                sends.extend([(relay, a) for relay in relays])
            src.relayed_packets += len(train)
            return
        for data, full in train:
            sendto = dst.sendable(targets, len(data))
            if sendto:
                relay = rewrite_mutable(data, full, ttl, PATH_RELAYED)
                sends.extend([(relay, a) for a in sendto])
                src.relayed_packets += 1
            else:
                src.drops[DropReason.NO_PATH] += 1
