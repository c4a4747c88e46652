"""Relaying: a datagram or shard for someone else (docs/protocol.md §6).

TTL, targets, the relay window (each datagram and each shard is relayed at
most once), then the same datagram goes on with TTL-1 and path=relayed,
never back where it came from.
"""

from __future__ import annotations


import hmac

from . import inner
from .constants import FLAG_BATCH, FLAG_VNET, KIND_DATA, MASK_SIZE, MAX_TTL, PATH_RELAYED, TAG_SIZE, VNET_HDR_SIZE
from .constants import INNER_HEAD
from .crypto import MAC_SIZE, mac
from .drops import DropReason
from .output import Output
from .peers import Addr, Peer
from .wire import MUTABLE_BYTES, NEXT_SHARD, SAMPLE, SEQ_FIELD, SEQ_SHIFT, SHARD_OVERHEAD, Header, rewrite_mutable

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
        (TTL, targets, the window's floors) is decided once a train. Returns
        how many of datagrams[i:] were relayed besides `data`; -1 when
        `data` was not (nothing has changed then: the full path looks at it)."""
        src, dst, clear = rn.src, rn.dst, rn.clear
        head = clear.to_bytes(MASK_SIZE, "big")
        ttl, session, ts = head[0], head[8:16], int.from_bytes(head[16:20], "big")
        window = src.replay.get(dst.id)
        offset = src.session_offset(dst.id, session, ts, now)
        targets = [a for a in self._targets(src.id, dst, now) if a != addr]
        if (ttl <= 1 or not targets or window is None or ts < src.replay_floor + offset
                or ts <= src.old_floors.get((dst.id, session), -1)):
            return -1
        # (Peer.check_replay for a relay window that exists, its checks of ts done above)
        check, state, from_bytes, relay_nexts = window.check_and_accept, self._mask_state, int.from_bytes, self._relay_next
        taken, n = -1, len(datagrams)
        while True:
            chunk = data[MASK_SIZE:-MAC_SIZE]
            if (len(data) < SHARD_OVERHEAD + TAG_SIZE
                    or not hmac.compare_digest(mac(rn.shard_key, head[MUTABLE_BYTES:] + chunk), data[-MAC_SIZE:])
                    or check(session, ts, (clear >> SEQ_SHIFT) & SEQ_FIELD, now, offset) is not None):
                break           # (the full path counts it: the window recorded nothing)
            taken += 1
            sendto = dst.sendable(targets, len(data))
            if sendto:
                relay = rewrite_mutable(data, full, min(ttl, MAX_TTL) - 1, PATH_RELAYED)
                out.sends.extend((relay, a) for a in sendto)
                src.relayed_packets += 1
            else:
                src.drops[DropReason.NO_PATH] += 1
            rn.index += 1
            rn.clear = clear = clear + NEXT_SHARD
            if rn.index >= rn.total:
                del relay_nexts[addr]
                break
            if i + taken >= n:
                break
            data, at = datagrams[i + taken]
            if at != addr:
                break
            h = state.copy()
            h.update(data[-SAMPLE:])
            full = from_bytes(h.digest(), "big")
            if from_bytes(data[:MASK_SIZE], "big") ^ full != clear:
                break           # (the caller's loop unmasks it again: once a train)
            head = clear.to_bytes(MASK_SIZE, "big")
        return taken
