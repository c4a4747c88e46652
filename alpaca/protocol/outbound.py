"""Outbound: a packet read from the TUN device becomes datagrams (docs/protocol.md §6-7, §12-13).

  1. where to: Node._route (the ID inside a tunnel-net destination, else the
     peer the host's routing names, held until the daemon has asked it; a
     peer we hold no key for via our gateway);
  2. seal: header(src, dst, session, ts, seq) + XChaCha20-Poly1305 with the
     pair key (AES-256-GCM with the session's key where both ends have it,
     Node._aead_flag); a message too big for one datagram (a super-packet, a FEC
     batch) is sealed once and sent as shards (wire.py), with parity from
     the loss the peer reports (fec.py, loss.py);
  3. emit on each target (loop guard, and no more to an unproven path than
     it sent us), then schedule the delayed copies (`duplicate`, and one
     early extra copy of TCP SYN / DNS).
With FEC on for the peer, the packets of one TUN read to it are sealed
together as one batch.
"""

from __future__ import annotations

import heapq

from . import fec, inner, pmtu
from .constants import (FLAG_BATCH, FLAG_FRAG, FLAG_ISAL, FLAG_VNET, KIND_DATA, OVERHEAD, PATH_DIRECT,
                        SPREAD_HEARD, SYN_DNS_COPY_DELAY, TAG_SIZE, UNREACHABLE_BURST, UNREACHABLE_PER_SECOND, VNET_HDR_SIZE)
from .constants import ZERO_VNET, INNER_HEAD, BATCH_LIMIT, BATCH_ENTRY
from .drops import DropReason
from .output import Output
from .peers import Addr, Peer
from .wire import SHARD_OVERHEAD, Header, frame_shards, seal_message


UNRESOLVED = object()       # Node._route: the destination waits for the host's next hop


class _Batch:
    """Packets to one peer read in one TUN batch, sealed together when FEC is on."""
    __slots__ = ("peer", "key", "targets", "packets", "size", "early")

    def __init__(self, peer: Peer, key: bytes, targets: list[Addr]):
        self.peer, self.key, self.targets = peer, key, targets
        self.packets: list[bytes] = []
        self.size = 0
        self.early = False


class Outbound:
    """Methods of Node (node.py): they share its state."""

    def from_tun(self, packets: list[bytes], now: float) -> Output:
        out = Output()
        batches: dict[int, _Batch] = {}
        for packet in packets:
            self._originate(packet, now, out, batches)
        for batch in batches.values():
            self._flush(batch, now, out)
        return out

    def _originate(self, data: bytes, now: float, out: Output, batches: dict[int, "_Batch"]) -> None:
        flags = 0
        if not self.settings.vnet:
            packet = head = data
        elif data[:VNET_HDR_SIZE] == ZERO_VNET:
            packet = head = data[VNET_HDR_SIZE:]
        else:
            # a super-packet or a packet with its checksum left to the
            # receiving kernel: the header travels with it
            packet, head, flags = data, data[VNET_HDR_SIZE:VNET_HDR_SIZE + INNER_HEAD], FLAG_VNET
        ends = inner.addresses(head)
        route = self._route(ends[1], now) if ends else None
        if route is UNRESOLVED:
            self._held.setdefault(ends[1], []).append(data)    # until learn_next_hops
            self._held_count += 1
            return
        if route is None:
            self.global_drops[DropReason.NOT_ROUTABLE] += 1
            if ends is not None:
                self._unreachable(data[VNET_HDR_SIZE:] if self.settings.vnet else data, ends, now, out, batches)
            return
        peer, key, targets = route
        if not targets:
            peer.drops[DropReason.NO_PATH] += 1
            return
        targets = self._guard(targets, ends, peer)
        if not targets:
            return          # every target failed the loop guard (counted there)
        batch = batches.get(peer.id)
        if len(packet) + OVERHEAD <= self.settings.max_datagram and self._parity(peer.id, 1, now):
            # FEC on and not a super-packet: it joins the peer's batch, which
            # is sealed once and sent with parity when this read batch ends
            # (no packet waits for another read)
            if batch is not None and (batch.targets != targets or batch.size + BATCH_ENTRY + len(data) > BATCH_LIMIT):
                self._flush(batches.pop(peer.id), now, out)
                batch = None
            if batch is None:
                batch = batches[peer.id] = _Batch(peer, key, targets)
            batch.packets.append(data)
            batch.size += BATCH_ENTRY + len(data)
            batch.early = batch.early or inner.wants_early_copy(head)
            return
        if batch is not None:
            self._flush(batches.pop(peer.id), now, out)     # keep the peer's packets in order
        datagrams = self._seal_message(KIND_DATA, peer.id, key, packet, flags | self._aead_flag(peer, targets), now,
                                       self._limit(peer, targets, len(packet), now))
        self._emit(peer, datagrams, targets, 1, inner.wants_early_copy(head), len(datagrams) == 1, now, out)

    def _unreachable(self, packet: bytes, ends: tuple[bytes, bytes], now: float, out: Output,
                     batches: dict[int, "_Batch"]) -> None:
        """No peer has this address: tell the sender at once with an ICMP
        host unreachable or ICMPv6 address unreachable (as WireGuard does),
        not by a timeout; at most UNREACHABLE_PER_SECOND. To a peer it goes
        through the tunnel, from our address of the packet's family; to this
        host (or a LAN behind it) through the TUN, from the unreachable
        address (one of ours would be a martian source to the kernel)."""
        tokens = min(UNREACHABLE_BURST,
                     self._unreachable_tokens + max(now - self._unreachable_at, 0) * UNREACHABLE_PER_SECOND)
        self._unreachable_at = now
        self._unreachable_tokens = tokens
        if tokens < 1:
            return
        src_id = self.net.id_of(ends[0])
        through_tunnel = src_id is not None and src_id != self.me
        mine = next((a for a in self._own_addresses(self.me) if len(a) == len(ends[0])), None)
        source = mine if through_tunnel else ends[1]
        error = inner.unreachable(packet, source) if source is not None else None
        if error is None:
            return
        self._unreachable_tokens -= 1
        if self.settings.vnet:
            error = ZERO_VNET + error
        if through_tunnel:
            self._originate(error, now, out, batches)     # (an error never earns an error: no loop)
        else:
            out.tun.append(error)

    def _flush(self, batch: "_Batch", now: float, out: Output) -> None:
        """Seal a peer's FEC batch: its packets each after a 2-byte length,
        zero-padded to `padding` (a zero length ends the batch)."""
        parts = []
        for packet in batch.packets:
            parts.append(len(packet).to_bytes(BATCH_ENTRY, "big"))
            parts.append(packet)
        plaintext = b"".join(parts)
        if len(plaintext) < self.settings.padding:
            plaintext += bytes(self.settings.padding - len(plaintext))
        flags = FLAG_BATCH | (FLAG_VNET if self.settings.vnet else 0) | self._aead_flag(batch.peer, batch.targets)
        datagrams = self._seal_message(KIND_DATA, batch.peer.id, batch.key, plaintext, flags, now,
                                       self._limit(batch.peer, batch.targets, len(plaintext), now))
        self._emit(batch.peer, datagrams, batch.targets, len(batch.packets), batch.early, False, now, out)

    def _emit(self, peer: Peer, datagrams: list[bytes], targets: list[Addr], packets: int, early: bool,
              whole: bool, now: float, out: Output) -> None:
        """Send a message's datagrams on every target, now and as the
        `duplicate` and SYN/DNS copies (docs/protocol.md §7). An unproven
        path gets them only while its credit lasts."""
        copies = 1 + self.settings.duplicate + (1 if early else 0)
        size = sum(map(len, datagrams))
        targets = peer.sendable(targets, copies * size)
        if not targets:
            peer.drops[DropReason.NO_PATH] += 1     # only unproven paths, their credit spent
            return
        if len(datagrams) > 1:
            sends = self._bulk_sends(peer, datagrams, targets, now)
        else:
            sends = [(datagrams[0], a) for a in targets]
        out.sends.extend(sends)
        peer.tx_packets += packets
        peer.tx_bytes += size
        # duplicate sends: same datagram (same seq), later, so the
        # receiver's dedup removes whichever copy arrives second
        delay = self.settings.duplicate_delay
        for k in range(1, self.settings.duplicate + 1):
            if delay > 0:
                self._schedule(now + k * delay, sends)
            else:
                out.sends.extend(sends)
        if early:
            self._schedule(now + SYN_DNS_COPY_DELAY, sends)
        if whole:
            # one datagram, once (not its copies): the receiver counts the
            # first copy, so the loss is that of the union of the paths.
            # Shards are counted by the receiver alone (loss.py)
            self.loss.count_sent(peer.id, self._ts, 1)

    def _bulk_sends(self, peer: Peer, datagrams: list[bytes], targets: list[Addr], now: float) -> list:
        """A message's shards on every target, or spread: each path that
        carried something from the peer lately takes one block of them
        (loss.py "Bulk over several paths"; blocks keep one GSO call per path)."""
        lanes = peer.heard_within(targets, now, SPREAD_HEARD) if len(targets) > 1 else targets
        self.loss.paths[peer.id] = len(lanes)
        n = len(lanes)
        if n < 2 or peer.id not in self.loss.spread:
            return [(d, a) for a in targets for d in datagrams]
        size = len(datagrams)
        return [(d, addr) for j, addr in enumerate(lanes) for d in datagrams[j * size // n:(j + 1) * size // n]]

    def _policy(self, peer_id: int) -> str | tuple[int, int] | None:
        fec = self.settings.fec
        return self.settings.peer_fec.get(peer_id, fec) if self.settings.peer_fec else fec

    def _parity(self, peer_id: int, k: int, now: float | None = None) -> int:
        """Parity shards for a k-shard message to peer_id under its FEC
        policy. `now`: the message is small packets (a FEC batch, or the
        question whether to make one), which get at least the prior's
        parity while the estimate is stale (loss.STALE_AFTER)."""
        policy = self._policy(peer_id)
        if policy == fec.AUTO:
            m = self.loss.parity(peer_id, k)
            if now is not None and self.loss.stale(peer_id, now):
                return max(m, self.loss.prior_parity(k))
            return m
        return 0 if policy is None else fec.ratio_parity(policy, k)

    def _limit(self, peer: Peer, targets: list[Addr], size: int, now: float) -> int:
        """The largest datagram for a message of `size` bytes to the peer on
        `targets`; one that a path MTU could stop has the peer's ways probed
        (pmtu.py: only ways that carry big datagrams are, so an idle tunnel
        sends no big probes)."""
        if size + OVERHEAD > pmtu.FLOOR:
            peer.sent_big = now
            self._sending_big.add(peer.id)
        return peer.datagram_limit(targets, self.settings.max_datagram)

    def _seal_message(self, kind: int, dst: int, key: bytes, plaintext: bytes, flags: int,
                      now: float, limit: int) -> list[bytes]:
        """One datagram, or the shards (with parity) of a message too big for
        one or of a FEC batch (docs/protocol.md §12): one AEAD call either way.
        `limit`: the largest datagram the targets carry (path MTU, pmtu.py)."""
        full = self.settings.max_datagram
        if not flags & FLAG_BATCH and (len(plaintext) + OVERHEAD <= limit
                                       or (not flags & FLAG_VNET and limit >= full)):
            # (a plain packet is never bigger than the TUN's MTU, unless the
            # MTU changed under us: then it goes whole, as before offloads)
            return [self._seal(kind, dst, key, plaintext, now, flags)]
        max_chunk = self.max_chunk if limit >= full else limit - SHARD_OVERHEAD
        k = fec.shard_count(len(plaintext) + TAG_SIZE, max_chunk)
        m = min(self._parity(dst, k, now if flags & FLAG_BATCH else None), fec.MAX_SHARDS - k)
        isal = fec.uses_isal(k, m)          # in the authenticated header: the receiver decodes by it
        ts, seq = self._stamp(now, k + m)   # shard i carries seq + i
        header = Header(self.settings.ttl, PATH_DIRECT, kind, self.me, dst, self.session, ts, seq, 0,
                        flags | FLAG_FRAG | (FLAG_ISAL if isal else 0))
        body = seal_message(key, header, plaintext)
        chunks, k, m = fec.split(body, max_chunk, m, isal)
        # in index order: the data shards (the short last one ends a GSO
        # run), then the parity (a second run). Were the short shard sent
        # last, the receiver would have k shards before it, and decode every
        # message with parity even on a clean path (~150 us at k = 47)
        return frame_shards(self.group_key, self.table.shard_key(key), header, chunks, k, m, len(body))

    def _schedule(self, due: float, sends: list[tuple[bytes, Addr]]) -> None:
        self._timer_serial += 1
        heapq.heappush(self._timers, (due, self._timer_serial, sends))
