"""The forwarding engine of one peer (SPEC §3), free of sockets and clocks.

Outbound (a packet read from the TUN device):
  1. dst_id = the ID inside the destination address when it is in the tunnel
     net, else the gateway the route lookup names (gateway_for);
     a tunnel peer we hold no key or path for is reached via our gateway,
     whose kernel routes it back into the tunnel (client to client).
  2. seal: header(src, dst, session, ts, seq) + XChaCha20-Poly1305 with the pair key.
  3. targets: downward (dst > me) every live path of dst; upward, every
     forwarder's direct path when forwarders are configured, else dst's direct path.
  4. emit on each target (loop guard), then schedule the delayed copies
     (`duplicate`, and one early extra copy of TCP SYN / DNS).
  With FEC on for the peer (docs/protocol.md §13), the packets of one TUN
  read to it are sealed together as one batch and sent as shards with
  parity; super-packets get parity of their own.

Inbound (a datagram from UDP):
  1. unmask header (group key) -> pair key -> AEAD open. Any failure is a
     global drop and changes nothing else.
  2. replay/dedup window of the source peer; then learn the path it came on.
  3. dst is me: write to TUN (keepalives stop here). Otherwise forward the
     same datagram with TTL-1 and path=relayed, never back to where it came
     from (split horizon), dst_id unchanged.

Everything takes batches (`from_tun`, `from_udp`) and returns an Output of
datagrams to send and packets to write, so the daemon can batch syscalls.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import math
import os
from dataclasses import dataclass, field
from typing import Callable

from . import inner
from . import fragments, loss
from .constants import (DEFAULT_TTL, FLAG_BATCH, FLAG_FRAG, FLAG_ISAL, TAG_SIZE, FLAG_VNET, KEEPALIVE_INTERVAL,
                        KIND_DATA, KIND_KEEPALIVE, KIND_REPORT, KNOWN_FLAGS, MASK_SIZE, MIN_DATAGRAM, OVERHEAD, PATH_DIRECT,
                        PATH_RELAYED, PEER_LIFETIME, REPORT_INTERVAL, SEQ_LIMIT, SYN_DNS_COPY_DELAY,
                        VNET_HDR_SIZE, WIRE_VERSION)
from .crypto import (CryptoError, Header, derive_group_key, frame_shards, open_body, open_sealed, rewrite_mutable,
                     keyed_mask_state, seal, seal_body, unmask)
from .drops import DropReason
from .ids import TunnelNet, format_id
from .peers import Addr, Peer, PeerEntry, PeerTable

PRUNE_INTERVAL = 5.0
PATH_NOTICES_PER_INTERVAL = 3     # per peer, then one line saying the rest are not logged
HOST_CACHE_LIMIT = 1024           # packed forms of target hosts kept for the loop guard
ZERO_VNET = bytes(VNET_HDR_SIZE)  # virtio_net_hdr of a plain packet: no GSO, checksum complete
INNER_HEAD = 64                   # bytes of an inner packet that routing looks at
_DATA_V1 = WIRE_VERSION << 4 | KIND_DATA
_SUB_BITS = 8 * (MASK_SIZE - 26)  # the header's mask is the top 26 of the 32 mask bytes
_INDEX_SHIFT = 40                 # the shard index in the 32 unmasked bytes as an int (5 bytes follow it)
BATCH_LIMIT = 65535               # plaintext bytes of one FEC batch (about 47 shards at MTU 1400)
_ENTRY = 2                        # the length before each packet of a batch


def _header(f: tuple) -> Header:
    """A Header from crypto.unmask's fields."""
    return Header(f[0], f[1], f[2] & 0x0F, f[4], f[5], f[6], f[7], f[8], f[9], f[3], f[2] >> 4)


@dataclass(frozen=True)
class NodeSettings:
    my_id: int
    net: tuple[int, int]
    group: str
    mode: str = "client"                  # server | client | forwarder
    gateway: int | None = None
    forwarders: tuple[int, ...] = ()
    duplicate: int = 0
    duplicate_delay: float = 0.01         # seconds
    inactive_downward_static: bool = False
    padding: int = 0
    ttl: int = DEFAULT_TTL
    # TUN reads and writes carry a virtio_net_hdr (the daemon's TUN always
    # does; offloads on or off): super-packets are sealed whole and sent as shards
    vnet: bool = False
    mtu: int = 1400
    # FEC (docs/protocol.md §13): None (off, the default), fragments.AUTO (parity
    # from the peer's loss reports) or a fixed (K, M) ratio; per peer ID in peer_fec
    fec: str | tuple[int, int] | None = None
    peer_fec: dict = field(default_factory=dict)

    @property
    def max_datagram(self) -> int:
        """The largest datagram: a full-MTU packet with its virtio_net_hdr."""
        return self.mtu + OVERHEAD + VNET_HDR_SIZE

    @property
    def has_tun(self) -> bool:
        return self.mode != "forwarder"


@dataclass
class Output:
    sends: list[tuple[bytes, Addr]] = field(default_factory=list)
    tun: list[bytes] = field(default_factory=list)

    def extend(self, other: "Output") -> None:
        self.sends.extend(other.sends)
        self.tun.extend(other.tun)


class _Batch:
    """Packets to one peer read in one TUN batch, sealed together when FEC is on."""
    __slots__ = ("peer", "key", "targets", "packets", "size", "early")

    def __init__(self, peer: Peer, key: bytes, targets: list[Addr]):
        self.peer, self.key, self.targets = peer, key, targets
        self.packets: list[bytes] = []
        self.size = 0
        self.early = False


class Node:
    def __init__(self, settings: NodeSettings, peers: dict[int, PeerEntry], now: float,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 gateway_for: Callable[[bytes], int | None] | None = None):
        self.settings = settings
        self.me = settings.my_id
        self.net = TunnelNet(settings.net)
        self.group_key = derive_group_key(settings.group)
        self.table = PeerTable(self.me, self.group_key)
        self.table.apply(peers, now)
        self._random_bytes = random_bytes
        # route lookup for destinations outside the tunnel net (the daemon
        # plugs in the kernel's answer, SPEC §3); default: the configured gateway
        self.gateway_for = gateway_for or (lambda dst: settings.gateway)
        self.session = random_bytes(8)
        self._ts = int(now)
        self._seq = 0
        self.global_drops: collections.Counter[DropReason] = collections.Counter()
        self.notices: list[str] = []           # one line each, for the daemon's log
        self._timers: list[tuple[float, int, list[tuple[bytes, Addr]]]] = []
        self._timer_serial = 0
        self._next_keepalive = now
        self._keepalives_sent = 0
        self._next_prune = now + PRUNE_INTERVAL
        self._packed: dict[str, bytes | None] = {}
        self._loop_noticed: set[Addr] = set()
        self._path_notices: dict[int, int] = {}
        self.started = now
        self.reassembly = fragments.Reassembler()
        self.relayed_shards = 0
        self.loss = loss.LossMeter(fragments.shard_count(65535 + VNET_HDR_SIZE + TAG_SIZE,
                                                         settings.max_datagram - MASK_SIZE))
        self._next_report = now + REPORT_INTERVAL

    # ------------------------------------------------------------ peers
    def apply_peers(self, peers: dict[int, PeerEntry], now: float) -> tuple[list[int], list[int], list[int]]:
        added, changed, removed = self.table.apply(peers, now)
        for verb, ids in (("added", added), ("changed", changed), ("removed", removed)):
            if ids:
                self.notices.append(f"peers {verb}: {', '.join(format_id(i) for i in ids)}")
        return added, changed, removed

    # ------------------------------------------------------------ sequence numbers
    def _stamp(self, now: float) -> tuple[int, int]:
        """Next (ts, seq). Unique per session: ts never goes back; when the clock
        steps back by more than a second a new random session starts instead,
        so timestamps stay close to real time and nonces stay unique."""
        s = int(now)
        if s > self._ts:
            self._ts, self._seq = s, 0
        elif s < self._ts - 1:
            self.session = self._random_bytes(8)
            self._ts, self._seq = s, 0
            self.notices.append("clock stepped back: new session")
        if self._seq >= SEQ_LIMIT:        # more than 2**20 this second: borrow the next one
            self._ts, self._seq = self._ts + 1, 0
        seq = self._seq
        self._seq += 1
        return self._ts, seq

    def _seal(self, kind: int, dst: int, key: bytes, payload: bytes, now: float, flags: int = 0) -> bytes:
        pad = self.settings.padding - len(payload) if len(payload) < self.settings.padding else 0
        ts, seq = self._stamp(now)
        header = Header(self.settings.ttl, PATH_DIRECT, kind, self.me, dst, self.session, ts, seq, pad, flags)
        return seal(self.group_key, key, header, payload + bytes(pad) if pad else payload)

    # ------------------------------------------------------------ where to send
    def _direct(self, peer_id: int, now: float) -> list[Addr]:
        peer = self.table.get(peer_id)
        return peer.direct_paths(now) if peer else []

    def _towards(self, peer: Peer, now: float) -> list[Addr]:
        """SPEC §3: downward on every live path; upward via the forwarders when
        configured (each on its direct path), else on the peer's direct path."""
        if peer.id > self.me:
            return peer.live_paths(now, self.settings.inactive_downward_static)
        if self.settings.forwarders:
            return [a for f in self.settings.forwarders for a in self._direct(f, now)]
        return peer.direct_paths(now)

    def _relay_targets(self, src: int, dst: Peer, now: float) -> list[Addr]:
        """SPEC §3 for a datagram that is not for us: downward (dst > src) to
        every live path of dst, never via forwarders; upward via our
        forwarders when configured, else to dst's direct path."""
        if dst.id > src:
            return dst.live_paths(now, self.settings.inactive_downward_static)
        if self.settings.forwarders:
            return [a for f in self.settings.forwarders for a in self._direct(f, now)]
        return dst.direct_paths(now)

    def _packed_host(self, host: str) -> bytes | None:
        packed = self._packed.get(host, b"")
        if packed == b"":
            try:
                packed = ipaddress.ip_address(host.split("%")[0]).packed
            except ValueError:
                packed = None
            if len(self._packed) >= HOST_CACHE_LIMIT:
                self._packed.clear()        # hosts are chosen by peers: keep this bounded
            self._packed[host] = packed
        return packed

    def _guard(self, targets: list[Addr], ends: tuple[bytes, bytes] | None, peer: Peer) -> list[Addr]:
        """The targets that pass the loop guard; `ends` are the inner packet's
        (src, dst) addresses, None when unknown (keepalives, relayed shards)."""
        if ends is None:
            return targets
        passed = []
        for addr in targets:
            if self._packed_host(addr[0]) in ends:
                # SPEC §3 loop guard: the route to this peer's address points
                # back into the tunnel
                peer.drops[DropReason.LOOP] += 1
                if addr not in self._loop_noticed:
                    self._loop_noticed.add(addr)
                    self.notices.append(f"loop: peer {format_id(peer.id)} at {addr[0]} is routed "
                                        f"into the tunnel; dropping (logged once)")
                continue
            passed.append(addr)
        return passed

    def _schedule(self, due: float, sends: list[tuple[bytes, Addr]]) -> None:
        self._timer_serial += 1
        heapq.heappush(self._timers, (due, self._timer_serial, sends))

    # ------------------------------------------------------------ outbound
    def _route(self, dst_ip: bytes, now: float) -> tuple[Peer, bytes, list[Addr]] | None:
        """(dst peer, pair key, targets) for a packet to dst_ip; None when not routable.

        dst_id is the ID inside a tunnel-net address, else the peer the route
        lookup names (gateway_for). A tunnel peer we hold no key or path for
        is reached via our gateway, whose kernel routes it back into the
        tunnel (client to client)."""
        if len(dst_ip) == 16 and (dst_ip[0] == 0xFF or (dst_ip[0] == 0xFE and dst_ip[1] & 0xC0 == 0x80)):
            return None     # IPv6 multicast / link-local (router solicitations, MLD): this link only
        peer_id = self.net.id_of(dst_ip) if len(dst_ip) == 4 else None
        fallback = self.settings.gateway if peer_id is not None else None
        if peer_id is None:
            peer_id = self.gateway_for(dst_ip)
        if fallback == peer_id:
            fallback = None
        for candidate in (peer_id, fallback):
            peer = self.table.get(candidate) if candidate is not None else None
            key = self.table.pair_key(self.me, candidate) if peer is not None else None
            if key is not None:
                targets = self._towards(peer, now)
                if targets or candidate == fallback or fallback is None:
                    return peer, key, targets
        return None

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
        if route is None:
            self.global_drops[DropReason.NOT_ROUTABLE] += 1
            return
        peer, key, targets = route
        if not targets:
            peer.drops[DropReason.NO_PATH] += 1
            return
        targets = self._guard(targets, ends, peer)
        if not targets:
            return          # every target failed the loop guard (counted there)
        batch = batches.get(peer.id)
        if len(packet) + OVERHEAD <= self.settings.max_datagram and self._parity(peer.id, 1):
            # FEC on and not a super-packet: it joins the peer's batch, which
            # is sealed once and sent with parity when this read batch ends
            # (no packet waits for another read)
            if batch is not None and (batch.targets != targets or batch.size + _ENTRY + len(data) > BATCH_LIMIT):
                self._flush(batches.pop(peer.id), now, out)
                batch = None
            if batch is None:
                batch = batches[peer.id] = _Batch(peer, key, targets)
            batch.packets.append(data)
            batch.size += _ENTRY + len(data)
            batch.early = batch.early or inner.wants_early_copy(head)
            return
        if batch is not None:
            self._flush(batches.pop(peer.id), now, out)     # keep the peer's packets in order
        datagrams = self._seal_message(KIND_DATA, peer.id, key, packet, flags, now)
        self._emit(peer, datagrams, targets, 1, inner.wants_early_copy(head), len(datagrams) == 1, now, out)

    def _flush(self, batch: "_Batch", now: float, out: Output) -> None:
        """Seal a peer's FEC batch: its packets each after a 2-byte length,
        zero-padded to `padding` (a zero length ends the batch)."""
        parts = []
        for packet in batch.packets:
            parts.append(len(packet).to_bytes(_ENTRY, "big"))
            parts.append(packet)
        plaintext = b"".join(parts)
        if len(plaintext) < self.settings.padding:
            plaintext += bytes(self.settings.padding - len(plaintext))
        flags = FLAG_BATCH | (FLAG_VNET if self.settings.vnet else 0)
        datagrams = self._seal_message(KIND_DATA, batch.peer.id, batch.key, plaintext, flags, now)
        self._emit(batch.peer, datagrams, batch.targets, len(batch.packets), batch.early, False, now, out)

    def _emit(self, peer: Peer, datagrams: list[bytes], targets: list[Addr], packets: int, early: bool,
              whole: bool, now: float, out: Output) -> None:
        """Send a message's datagrams on every target, now and as the
        `duplicate` and SYN/DNS copies (SPEC §3)."""
        sends = [(d, a) for a in targets for d in datagrams]
        out.sends.extend(sends)
        peer.tx_packets += packets
        peer.tx_bytes += sum(len(d) for d in datagrams)
        # SPEC §3 duplicate sends: same datagram (same seq), later, so the
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

    def _policy(self, peer_id: int) -> str | tuple[int, int] | None:
        fec = self.settings.fec
        return self.settings.peer_fec.get(peer_id, fec) if self.settings.peer_fec else fec

    def _parity(self, peer_id: int, k: int) -> int:
        """Parity shards for a k-shard message to peer_id under its FEC policy."""
        policy = self._policy(peer_id)
        if policy == fragments.AUTO:
            return self.loss.parity(peer_id, k)
        return 0 if policy is None else fragments.ratio_parity(policy, k)

    def _seal_message(self, kind: int, dst: int, key: bytes, plaintext: bytes, flags: int,
                      now: float) -> list[bytes]:
        """One datagram, or the shards (with parity) of a message too big for
        one or of a FEC batch (docs/protocol.md §12): one AEAD call either way."""
        if not flags & (FLAG_VNET | FLAG_BATCH) or (not flags & FLAG_BATCH
                                                    and len(plaintext) + OVERHEAD <= self.settings.max_datagram):
            # (a plain packet is never bigger than the TUN's MTU, unless the
            # MTU changed under us: then it goes whole, as before offloads)
            return [self._seal(kind, dst, key, plaintext, now, flags)]
        max_shard = self.settings.max_datagram - MASK_SIZE
        k = fragments.shard_count(len(plaintext) + TAG_SIZE, max_shard)
        parity = self._parity(dst, k)
        isal = fragments.uses_isal(k, parity)       # in the authenticated header: the receiver decodes by it
        ts, seq = self._stamp(now)
        raw = Header(self.settings.ttl, PATH_DIRECT, kind, self.me, dst, self.session, ts, seq, 0,
                     flags | FLAG_FRAG | (FLAG_ISAL if isal else 0)).pack()
        body = seal_body(key, raw, plaintext)
        shards, k, m = fragments.split(body, max_shard, parity, isal)
        datagrams = frame_shards(self.group_key, raw, shards, k, m, len(body))
        if m and k > 1:
            # full-size shards first and the short last data shard at the
            # end, so the kernel sends the run with one GSO call
            datagrams.append(datagrams.pop(k - 1))
        return datagrams

    # ------------------------------------------------------------ inbound
    def from_udp(self, datagrams: list[tuple[bytes, Addr]], now: float) -> Output:
        out = Output()
        keyed, from_bytes = keyed_mask_state(self.group_key), int.from_bytes
        # The hot path (a 64 KiB message is ~46 shards, and UDP GRO hands
        # them over as a train): after a shard is filed, the next one is
        # predicted exactly (same header, index + 1), so one integer
        # comparison of its unmasked bytes files it. Anything else is parsed.
        p_slot, p_clear, p_addr, p_len, p_index = None, -1, None, 0, 0
        for data, addr in datagrams:
            if len(data) < MIN_DATAGRAM:
                self.global_drops[DropReason.MALFORMED] += 1
                continue
            h = keyed.copy()                # crypto.unmask_int, inlined
            h.update(data[-TAG_SIZE:])
            full = from_bytes(h.digest(), "big")
            clear = from_bytes(data[:MASK_SIZE], "big") ^ full
            if clear == p_clear and addr == p_addr and len(data) == p_len:
                shards = p_slot.shards
                if p_index not in shards and len(shards) + 1 < p_slot.k:
                    shards[p_index] = data[MASK_SIZE:]
                    p_index += 1
                    p_clear += 1 << _INDEX_SHIFT
                    p_len = MASK_SIZE + (p_slot.last if p_index == p_slot.k - 1 else p_slot.size)
                    continue
            f, full = unmask(self.group_key, data, clear, full)
            slot = self._receive(data, addr, now, out, f, full)
            if slot is not None:            # a shard filed, its message still incomplete: predict the next
                p_slot, p_addr, p_index = slot, addr, f[10] + 1
                p_clear = clear + (1 << _INDEX_SHIFT)
                p_len = MASK_SIZE + (slot.last if p_index == slot.k - 1 else slot.size)
        return out

    def _receive(self, data: bytes, addr: Addr, now: float, out: Output, f: tuple,
                 full: int) -> fragments.Reassembly | None:
        """One datagram whose 32 masked bytes are unmasked (f, full: crypto.unmask).
        Returns the message it was filed in when it is a shard of a message
        still incomplete (from_udp predicts the next shard from it)."""
        # (ttl, path, version<<4|kind, flags, src, dst, session, ts, seq, pad, index, k, m, len_hi, len_lo)
        if f[3] & FLAG_FRAG and f[5] == self.me and f[2] == _DATA_V1:
            rkey = (f[4], f[5], f[6], f[7], f[8])
            if self.reassembly.knows(rkey):
                # the next shard of a message whose first shard passed the checks below
                return self._shard_for_me(rkey, f, full, data, addr, now, out)
        vk, flags, src, dst = f[2], f[3], f[4], f[5]
        if (vk >> 4 != WIRE_VERSION or flags & ~KNOWN_FLAGS or vk & 0x0F > KIND_REPORT
                or (flags & FLAG_BATCH and vk != _DATA_V1) or (flags & FLAG_ISAL and not flags & FLAG_FRAG)):
            self.global_drops[DropReason.MALFORMED] += 1
            return
        # src == me: our own datagram reflected back (or forged); never ours to take
        key = self.table.pair_key(src, dst) if src != self.me else None
        if key is None:
            self.global_drops[DropReason.UNKNOWN_PEER] += 1
            return
        if flags & FLAG_FRAG:
            if vk != _DATA_V1 or f[9]:
                self.global_drops[DropReason.MALFORMED] += 1
            elif dst == self.me:
                return self._shard_for_me((src, dst, f[6], f[7], f[8]), f, full, data, addr, now, out)
            else:
                # relayed as it is, without reassembly: a shard cannot be
                # authenticated alone, so it changes no peer state here
                # (docs/protocol.md §12)
                self._relay_shard(f, full, data, addr, now, out)
            return None
        header = _header(f)
        try:
            plaintext = open_sealed(key, header, data)
        except CryptoError:
            self.global_drops[DropReason.AUTH_FAILURE] += 1
            return
        if header.pad > len(plaintext):
            self.global_drops[DropReason.MALFORMED] += 1
            return
        self._accept(header, full >> _SUB_BITS, data, plaintext, (addr,), len(data), now, out)

    def _shard_for_me(self, rkey: tuple, f: tuple, full: int, data: bytes, addr: Addr, now: float,
                      out: Output) -> fragments.Reassembly | None:
        length = f[13] << 16 | f[14]
        message, slot, reason = self.reassembly.add(rkey, f[10], f[11], f[12], length, data[MASK_SIZE:],
                                                    addr, now, bool(f[3] & FLAG_ISAL))
        if reason is not None:
            self.global_drops[reason] += 1
        if message is None:
            return slot         # filed in a message still incomplete, or None
        header = _header(f)
        key = self.table.pair_key(header.src, header.dst)
        if key is None:         # the peer left secrets.txt while its message was in reassembly
            self.global_drops[DropReason.UNKNOWN_PEER] += 1
            return
        try:
            plaintext = open_body(key, header, message)
        except CryptoError:
            self.global_drops[DropReason.AUTH_FAILURE] += 1
            return
        self._accept(header, full >> _SUB_BITS, data, plaintext, slot.addrs, length, now, out)

    def _accept(self, header: Header, mask: int, data: bytes, plaintext: bytes, addrs, size: int,
                now: float, out: Output) -> None:
        """An authenticated message (a whole datagram, or reassembled shards)."""
        src = self.table.get(header.src)
        for_me = header.dst == self.me
        charged = targets = None
        if not for_me:
            # what would not be relayed is dropped before it can open a replay window
            dst = self.table.get(header.dst)
            targets = self._relay_targets_from(header, addrs[0], src, dst, now)
            if targets is None:
                return
            # relay windows count against the pair's bigger ID, whose key
            # string seals it: a member can forge only pairs above itself
            charged = src if header.src > header.dst else dst
        reason = src.check_replay(header.dst, header.session, header.ts, header.seq, now, charged)
        if reason is not None:
            src.drops[reason] += 1
            if reason is DropReason.DUPLICATE and for_me:
                # another copy over another path: it keeps that path alive,
                # but only a first copy may add a path (a replay could come
                # from anywhere)
                for addr in addrs:
                    src.refresh(addr, now)
            return
        if not for_me:
            self._relay(header, mask, data, plaintext, targets, src, out)
            return
        batch = header.flags & FLAG_BATCH
        if header.kind == KIND_DATA:
            if not header.flags & FLAG_FRAG:
                # a first copy (shards are counted by the reassembly): the
                # union of the paths. Data only: keepalives and reports must
                # not make the other end report back (loss.py)
                self.loss.count_arrived(src.id, header.ts)
            if not batch and header.src > self.me and self._spoofed(header.src, plaintext, header.flags):
                src.drops[DropReason.SPOOFED] += 1
                return
        # Paths are learned only from datagrams addressed to us: a relayed
        # datagram "from src" may have been sealed by dst, who shares the key.
        relayed = header.path != PATH_DIRECT
        for addr in addrs:
            if src.heard(addr, relayed, now):
                self._path_notice(src.id, f"new {'relayed' if relayed else 'direct'} path {addr[0]}:{addr[1]}")
        if not src.up:
            src.up = True
            self.notices.append(f"peer {format_id(src.id)} up")
        src.rx_bytes += size
        if header.kind == KIND_KEEPALIVE:
            src.rx_packets += 1
            return
        if header.kind == KIND_REPORT:
            src.rx_packets += 1
            self._loss_report(src, plaintext[:len(plaintext) - header.pad])
            return
        if not self.settings.has_tun:
            src.rx_packets += 1
            src.drops[DropReason.NO_TUN] += 1
            return
        if header.pad:
            plaintext = plaintext[:len(plaintext) - header.pad]
        vnet = header.flags & FLAG_VNET
        if not batch:
            src.rx_packets += 1
            self._deliver(src, plaintext, vnet, out)
            return
        # a FEC batch: packets each after a 2-byte length; a zero length
        # (padding) ends it. Sealed by src, so a bad length is src's bug.
        at, end = 0, len(plaintext)
        bounds = []
        while at + _ENTRY <= end:
            n = plaintext[at] << 8 | plaintext[at + 1]
            if n == 0:
                break
            at += _ENTRY
            bounds.append((at, at + n))
            at += n
        if at > end:
            src.drops[DropReason.MALFORMED_BATCH] += 1      # all or nothing
            return
        spoof_check = header.src > self.me
        for start, stop in bounds:
            packet = plaintext[start:stop]
            src.rx_packets += 1
            if spoof_check and self._spoofed(header.src, packet, header.flags):
                src.drops[DropReason.SPOOFED] += 1
                continue
            self._deliver(src, packet, vnet, out)

    def _deliver(self, src: Peer, packet: bytes, vnet: int, out: Output) -> None:
        """One packet to the TUN device, with or without its virtio_net_hdr
        as the device and the packet have them."""
        if self.settings.vnet:
            out.tun.append(packet if vnet else ZERO_VNET + packet)
        elif not vnet:
            out.tun.append(packet)
        elif packet[:VNET_HDR_SIZE] == ZERO_VNET:
            out.tun.append(packet[VNET_HDR_SIZE:])
        else:
            src.drops[DropReason.NEEDS_OFFLOAD] += 1     # only a TUN with a vnet header takes it

    def _spoofed(self, src: int, packet: bytes, flags: int) -> bool:
        """A peer below us (a client of ours) may only use its own tunnel
        address as the source of a tunnel-net packet, so one member cannot
        pass for another at the IP level (like WireGuard's allowed IPs).
        Peers above us route for others (client to client through a
        server), so their packets are not checked."""
        ends = inner.addresses(packet[VNET_HDR_SIZE:VNET_HDR_SIZE + INNER_HEAD] if flags & FLAG_VNET else packet)
        if ends is None or len(ends[0]) != 4:
            return False
        owner = self.net.id_of(ends[0])
        return owner is not None and owner != src

    def _path_notice(self, peer_id: int, what: str) -> None:
        """Path changes are state changes worth a line each, but a peer whose
        address changes on every datagram must not log per packet."""
        count = self._path_notices.get(peer_id, 0)
        self._path_notices[peer_id] = count + 1
        if count < PATH_NOTICES_PER_INTERVAL:
            self.notices.append(f"peer {format_id(peer_id)}: {what}")
        elif count == PATH_NOTICES_PER_INTERVAL:
            self.notices.append(f"peer {format_id(peer_id)}: more new paths; not logged for {PRUNE_INTERVAL:.0f} s")

    def _relay_targets_from(self, header: Header, addr: Addr, src: Peer, dst: Peer,
                            now: float) -> list[Addr] | None:
        """Where a datagram that is not for us goes (SPEC §3): never back to the
        address it came from (split horizon); None when it is dropped (counted)."""
        if header.ttl <= 1:
            src.drops[DropReason.TTL] += 1
            return None
        targets = [a for a in self._relay_targets(header.src, dst, now) if a != addr]
        if not targets:
            src.drops[DropReason.NO_PATH] += 1
            return None
        return targets

    def _relay(self, header: Header, mask: int, data: bytes, plaintext: bytes, targets: list[Addr],
               src: Peer, out: Output) -> None:
        """Forward (SPEC §3): same dst_id, TTL-1."""
        ends = None
        if header.kind == KIND_DATA and not header.flags & FLAG_BATCH:     # (batches: shards, relayed by header)
            ends = inner.addresses(plaintext[VNET_HDR_SIZE:VNET_HDR_SIZE + INNER_HEAD]
                                   if header.flags & FLAG_VNET else plaintext)
        targets = self._guard(targets, ends, src)
        if targets:
            relay = rewrite_mutable(data, mask, header.ttl - 1, PATH_RELAYED)
            out.sends.extend((relay, a) for a in targets)
            src.relayed_packets += 1

    def _relay_shard(self, f: tuple, full: int, data: bytes, addr: Addr, now: float, out: Output) -> None:
        """A shard for someone else: relayed on the strength of its header;
        counted globally only, since it is not authenticated here."""
        header, mask = _header(f), full >> _SUB_BITS
        if not fragments.valid_sub(f[10], f[11], f[12], f[13] << 16 | f[14], len(data) - MASK_SIZE):
            self.global_drops[DropReason.MALFORMED] += 1
            return
        if header.ttl <= 1:
            self.global_drops[DropReason.TTL] += 1
            return
        dst = self.table.get(header.dst)
        targets = [a for a in self._relay_targets(header.src, dst, now) if a != addr]
        if not targets:
            self.global_drops[DropReason.NO_PATH] += 1
            return
        relay = rewrite_mutable(data, mask, header.ttl - 1, PATH_RELAYED)
        out.sends.extend((relay, a) for a in targets)
        self.relayed_shards += 1

    # ------------------------------------------------------------ timers
    def next_deadline(self) -> float:
        due = min(self._next_keepalive, self._next_prune, self._next_report)
        return min(due, self._timers[0][0]) if self._timers else due

    def tick(self, now: float) -> Output:
        out = Output()
        while self._timers and self._timers[0][0] <= now:
            out.sends.extend(heapq.heappop(self._timers)[2])
        if now >= self._next_keepalive:
            # the first few come quickly: a peer that started in the same
            # second drops them (its replay floor), and paths should form fast
            self._keepalives_sent += 1
            self._next_keepalive = now + (KEEPALIVE_INTERVAL if self._keepalives_sent > 3 else 1.0)
            self._keepalives(now, out)
        if now >= self._next_report:
            self._next_report = now + REPORT_INTERVAL
            self._reassembly_tick(now, out)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self._path_notices.clear()
            if len(self._loop_noticed) > HOST_CACHE_LIMIT:
                self._loop_noticed.clear()
            self.loss.prune(now, self.table.peers)
            for peer in self.table.peers.values():
                peer.prune(now)
                if peer.up and now - peer.last_rx > PEER_LIFETIME:
                    peer.up = False
                    self.notices.append(f"peer {format_id(peer.id)} down (silent for {PEER_LIFETIME:.0f} s)")
        return out

    def _reassembly_tick(self, now: float, out: Output) -> None:
        """Expire incomplete messages, and tell each peer we heard from what
        arrived of what it sent us, per second (loss.py)."""
        for key, slot in self.reassembly.expire(now):
            self.global_drops[DropReason.INCOMPLETE] += 1
            self.reassembly.count_lost(key, slot)
        for src, (sent, arrived) in self.reassembly.take_tally().items():
            peer = self.table.get(src)
            if peer is not None and peer.up:        # a peer we have authenticated
                self.loss.count_shards(src, sent, arrived)
        for peer_id, payload in self.loss.reports(now):
            peer = self.table.get(peer_id)
            key = self.table.pair_key(self.me, peer_id) if peer is not None else None
            if key is None:
                continue
            datagram = self._seal(KIND_REPORT, peer_id, key, payload, now)
            out.sends.extend((datagram, a) for a in self._towards(peer, now))

    def _loss_report(self, peer: Peer, payload: bytes) -> None:
        """What arrived of what we sent the peer: adapt parity and copies."""
        meter = self.loss
        before = (meter.parity(peer.id, meter.k), meter.parity(peer.id, 1))
        try:
            estimate = meter.on_report(peer.id, payload)
        except loss.BadReport:
            peer.drops[DropReason.MALFORMED_REPORT] += 1
            return
        after = (meter.parity(peer.id, meter.k), meter.parity(peer.id, 1))
        if estimate is not None and after != before and self._policy(peer.id) == fragments.AUTO:
            self.notices.append(f"peer {format_id(peer.id)}: {estimate:.1%} of datagrams lost; now "
                                f"{after[0]} parity shards per {meter.k}, {after[1]} per single datagram")

    def _keepalives(self, now: float, out: Output) -> None:
        """Keep our paths alive at the gateway (through every forwarder) and at
        each forwarder, so downward traffic can find us behind NAT."""
        gw = self.settings.gateway
        targets = ([gw] if gw is not None else []) + [f for f in self.settings.forwarders if f != gw]
        for peer_id in targets:
            peer = self.table.get(peer_id)
            key = self.table.pair_key(self.me, peer_id)
            if peer is None or key is None:
                continue
            datagram = self._seal(KIND_KEEPALIVE, peer_id, key, b"", now)
            addrs = self._towards(peer, now) if peer_id == gw else peer.direct_paths(now)
            out.sends.extend((datagram, a) for a in addrs)

    # ------------------------------------------------------------ status
    def snapshot(self, now: float) -> dict:
        """Plain data for `alpaca-tunnel status` (JSON-able)."""
        peers = []
        for peer in sorted(self.table.peers.values(), key=lambda p: p.id):
            if peer.id == self.me:
                continue
            peers.append({
                "id": format_id(peer.id),
                "address": str(self.net.address(peer.id)),
                "up": peer.up,
                "last_rx_age": None if peer.last_rx == -math.inf else round(now - peer.last_rx, 3),
                "paths": [{"address": f"{p.addr[0]}:{p.addr[1]}",
                           "learned": "static" if p.static else ("relayed" if p.relayed else "direct"),
                           "last_rx_age": None if p.last_rx == -math.inf else round(now - p.last_rx, 3)}
                          for p in peer.paths.values()],
                "rx_packets": peer.rx_packets, "rx_bytes": peer.rx_bytes,
                "tx_packets": peer.tx_packets, "tx_bytes": peer.tx_bytes,
                "relayed_packets": peer.relayed_packets,
                "loss": round(self.loss.loss[peer.id], 4) if peer.id in self.loss.loss else None,
                "fec": fragments.format_fec(self._policy(peer.id)),
                "parity": self._parity(peer.id, self.loss.k),
                "copies": self._parity(peer.id, 1),
                "drops": {r.value: n for r, n in sorted(peer.drops.items(), key=lambda x: x[0].value)},
            })
        return {"id": format_id(self.me), "mode": self.settings.mode, "group": self.settings.group,
                "peers": peers, "relayed_shards": self.relayed_shards,
                "reassembling": len(self.reassembly.slots),
                "drops": {r.value: n for r, n in sorted(self.global_drops.items(), key=lambda x: x[0].value)}}
