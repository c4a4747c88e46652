"""Relaying: a datagram or shard for someone else (docs/protocol.md §6).

TTL, targets, the relay window (each datagram and each shard is relayed at
most once), then the same datagram goes on with TTL-1 and path=relayed,
never back where it came from.
"""

from __future__ import annotations


from . import inner
from .constants import FLAG_BATCH, FLAG_VNET, KIND_DATA, MAX_TTL, PATH_RELAYED, VNET_HDR_SIZE
from .constants import INNER_HEAD
from .drops import DropReason
from .output import Output
from .peers import Addr, Peer
from .wire import Header, rewrite_mutable



class Relay:
    """Methods of Node (node.py): they share its state."""

    def _relay(self, header: Header, full_mask: int, data: bytes, plaintext: bytes | None, addr: Addr,
               src: Peer, now: float, out: Output) -> None:
        """An authenticated datagram or shard for someone else: same dst_id,
        TTL-1 (never more than MAX_TTL), never back to the address it came
        from (split horizon), and at most once: the relay window remembers
        every (session, ts, seq) it passed on, shards included."""
        if header.ttl <= 1:
            src.drops[DropReason.TTL] += 1
            return
        dst = self.table.get(header.dst)
        targets = [a for a in self._targets(header.src, dst, now) if a != addr]
        if not targets:
            src.drops[DropReason.NO_PATH] += 1
            return
        # relay windows count against the pair's bigger ID, whose key
        # string seals it: a member can forge only pairs above itself
        charged = src if header.src > header.dst else dst
        reason = src.check_replay(header.dst, header.session, header.ts, header.seq, now, charged)
        if reason is not None:
            src.drops[reason] += 1
            return
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
        elif guarded:
            src.drops[DropReason.NO_PATH] += 1          # only unproven paths, their credit spent
