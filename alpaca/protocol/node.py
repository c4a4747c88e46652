"""The forwarding engine of one peer, free of sockets and clocks (docs/protocol.md §6).

Outbound (a packet read from the TUN device):
  1. dst_id = the ID inside the destination address when it is in the tunnel
     net, else the gateway the route lookup names (gateway_for);
     a tunnel peer we hold no key or path for is reached via our gateway,
     whose kernel routes it back into the tunnel (client to client).
  2. seal: header(src, dst, session, ts, seq) + XChaCha20-Poly1305 with the
     pair key; a message too big for one datagram (a super-packet, a FEC
     batch) is sealed once and sent as shards (wire.py).
  3. targets: downward (dst > me) every live path of dst; upward, every
     forwarder's direct path when forwarders are configured, else dst's direct path.
  4. emit on each target (loop guard, and no more to an unproven path than
     it sent us), then schedule the delayed copies (`duplicate`, and one
     early extra copy of TCP SYN / DNS).
  With FEC on for the peer (docs/protocol.md §13), the packets of one TUN
  read to it are sealed together as one batch and sent as shards with
  parity; super-packets get parity of their own.

Inbound (a datagram from UDP):
  1. unmask header (group key) -> pair key -> AEAD open, or for a shard its
     MAC. Any failure is a global drop and changes nothing else.
  2. for someone else: TTL, targets, the relay window (each datagram and
     each shard is relayed at most once), then the same datagram goes on
     with TTL-1 and path=relayed, never back where it came from.
  3. for me: a session proven live by a challenge, the replay window, then
     learn the path it came on; a shard goes to reassembly, a whole message
     to the TUN (keepalives, reports, challenges and answers stop here).

Everything takes batches (`from_tun`, `from_udp`) and returns an Output of
datagrams to send and packets to write, so the daemon can batch syscalls.
"""

from __future__ import annotations

import collections
import heapq
import hmac
import ipaddress
import math
import os
from dataclasses import dataclass, field
from typing import Callable

from . import fec, inner, loss
from .constants import (DEFAULT_TTL, FLAG_BATCH, FLAG_FRAG, FLAG_ISAL, FLAG_VNET, KEEPALIVE_INTERVAL,
                        KIND_CHALLENGE, KIND_DATA, KIND_KEEPALIVE, KIND_MAX, KIND_REPORT, KIND_RESPONSE, KNOWN_FLAGS,
                        MASK_SIZE, MAX_TTL, MIN_DATAGRAM, OVERHEAD, PATH_DIRECT, PATH_RELAYED, PEER_LIFETIME,
                        REPORT_INTERVAL, SEQ_LIMIT, SYN_DNS_COPY_DELAY, TAG_SIZE, VNET_HDR_SIZE, WIRE_VERSION)
from .crypto import MAC_SIZE, CryptoError, derive_group_key, mac, mask_state
from .drops import DropReason
from .ids import TunnelNet, format_id
from .peers import CHALLENGE_WINDOW, MESSAGE_WINDOW, Addr, Peer, PeerEntry, PeerTable
from .reassembly import Reassembler
from .wire import (MUTABLE_BYTES, NEXT_SHARD, SAMPLE, SHARD_OVERHEAD, Header, fields, frame_shards, open_message, open_sealed,
                   rewrite_mutable, seal, seal_message, shard_authentic)

PRUNE_INTERVAL = 5.0
PATH_NOTICES_PER_INTERVAL = 3     # per peer, then one line saying the rest are not logged
HOST_CACHE_LIMIT = 1024           # packed forms of target hosts kept for the loop guard
ZERO_VNET = bytes(VNET_HDR_SIZE)  # virtio_net_hdr of a plain packet: no GSO, checksum complete
INNER_HEAD = 64                   # bytes of an inner packet that routing looks at
BATCH_LIMIT = 65535               # plaintext bytes of one FEC batch (about 47 shards at MTU 1400)
_ENTRY = 2                        # the length before each packet of a batch
NONCE_SIZE = 16                   # of a challenge
CHALLENGE_INTERVAL = 0.25         # challenges to one peer at most this often
RESPONSE_LIMIT = 20               # answers to one peer's challenges per second
VERSION_NOTICE_INTERVAL = 60.0    # one line about datagrams of another wire version


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
    # FEC (docs/protocol.md §13): None (off, the default), fec.AUTO (parity
    # from the peer's loss reports) or a fixed (K, M) ratio; per peer ID in peer_fec
    fec: str | tuple[int, int] | None = None
    peer_fec: dict = field(default_factory=dict)
    # networks a peer below us may send from besides its own tunnel address
    # (config peers.<id>.networks): peer ID -> ipaddress networks
    peer_networks: dict = field(default_factory=dict)

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


class _Next:
    """The shard expected next (Node.from_udp): its 32 unmasked bytes as an
    int, where from, its size, and what filing it needs."""
    __slots__ = ("clear", "addr", "size", "src", "rkey", "slot", "index", "shard_key", "last")

    def __init__(self, clear: int, addr: Addr, src: Peer, rkey: tuple, slot, index: int, shard_key: bytes):
        self.clear, self.addr, self.src, self.rkey, self.slot = clear, addr, src, rkey, slot
        self.index, self.shard_key = index, shard_key
        self.last = slot.k - 1                                      # the short data chunk
        self.size = MASK_SIZE + (slot.last if index == self.last else slot.size) + MAC_SIZE

    def advance(self) -> bool:
        """Expect the shard after; False when there is none."""
        self.index += 1
        if self.index >= self.slot.k + self.slot.m:
            return False
        self.clear += NEXT_SHARD
        self.size = MASK_SIZE + (self.slot.last if self.index == self.last else self.slot.size) + MAC_SIZE
        return True


class Node:
    def __init__(self, settings: NodeSettings, peers: dict[int, PeerEntry], now: float,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 gateway_for: Callable[[bytes], int | None] | None = None):
        self.settings = settings
        self.me = settings.my_id
        self.net = TunnelNet(settings.net)
        self.group_key = derive_group_key(settings.group)
        self._mask_state = mask_state(self.group_key)
        self.table = PeerTable(self.me, self.group_key)
        self.table.apply(peers, now)
        self._random_bytes = random_bytes
        # route lookup for destinations outside the tunnel net (the daemon
        # plugs in the kernel's answer, docs/protocol.md §6); default: the configured gateway
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
        self._addresses: dict[int, bytes] = {}    # peer ID -> its tunnel address, packed
        self._loop_noticed: set[Addr] = set()
        self._path_notices: dict[int, int] = {}
        self.started = now
        self.loss = loss.LossMeter(fec.shard_count(65535 + VNET_HDR_SIZE + TAG_SIZE, self.max_chunk))
        self.reassembly = Reassembler(self.loss.count_shards)
        self._next_report = now + REPORT_INTERVAL
        self._next_version_notice = -math.inf
        self._next: _Next | None = None       # the shard predicted next (from_udp)

    @property
    def max_chunk(self) -> int:
        """The largest chunk of a message in one shard datagram."""
        return self.settings.max_datagram - SHARD_OVERHEAD

    # ------------------------------------------------------------ peers
    def apply_peers(self, peers: dict[int, PeerEntry], now: float) -> tuple[list[int], list[int], list[int]]:
        added, changed, removed = self.table.apply(peers, now)
        self._next = None           # it may name a peer object that is gone
        for peer_id in changed + removed:
            self.reassembly.forget_peer(peer_id)
        for verb, ids in (("added", added), ("changed", changed), ("removed", removed)):
            if ids:
                self.notices.append(f"peers {verb}: {', '.join(format_id(i) for i in ids)}")
        return added, changed, removed

    # ------------------------------------------------------------ sequence numbers
    def _stamp(self, now: float, n: int = 1) -> tuple[int, int]:
        """Next (ts, seq), and n - 1 more sequence numbers after it reserved
        (a message's shards). Unique per session: ts never goes back; when
        the clock steps back by more than a second a new random session
        starts instead, so timestamps stay close to real time and nonces
        stay unique."""
        s = int(now)
        if s > self._ts:
            self._ts, self._seq = s, 0
        elif s < self._ts - 1:
            self.session = self._random_bytes(8)
            self._ts, self._seq = s, 0
            self.notices.append("clock stepped back: new session")
        if self._seq + n > SEQ_LIMIT:     # more than 2**20 this second: borrow the next one
            self._ts, self._seq = self._ts + 1, 0
        seq = self._seq
        self._seq += n
        return self._ts, seq

    def _seal(self, kind: int, dst: int, key: bytes, payload: bytes, now: float, flags: int = 0) -> bytes:
        # challenges and answers are never padded: their size says nothing,
        # and an answer must be no bigger than its challenge to go back to
        # where the challenge came from
        padding = self.settings.padding if kind < KIND_CHALLENGE else 0
        pad = padding - len(payload) if len(payload) < padding else 0
        ts, seq = self._stamp(now)
        header = Header(self.settings.ttl, PATH_DIRECT, kind, self.me, dst, self.session, ts, seq, pad, flags)
        return seal(self.group_key, key, header, payload + bytes(pad) if pad else payload)

    # ------------------------------------------------------------ where to send
    def _direct(self, peer_id: int, now: float) -> list[Addr]:
        peer = self.table.get(peer_id)
        return peer.direct_paths(now) if peer else []

    def _targets(self, origin: int, peer: Peer, now: float) -> list[Addr]:
        """Where a datagram from `origin` (this node, or the source of one we
        relay) to `peer` goes: downward (peer > origin) on every live path of
        the peer; upward via our forwarders when configured (each on its
        direct path), else on the peer's direct path."""
        if peer.id > origin:
            return peer.live_paths(now, self.settings.inactive_downward_static)
        if self.settings.forwarders:
            return [a for f in self.settings.forwarders for a in self._direct(f, now)]
        return peer.direct_paths(now)

    def _towards(self, peer: Peer, now: float) -> list[Addr]:
        return self._targets(self.me, peer, now)

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
                # loop guard (docs/protocol.md §6): the route to this peer's address points
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
        `duplicate` and SYN/DNS copies (docs/protocol.md §7). An unproven
        path gets them only while its credit lasts."""
        copies = 1 + self.settings.duplicate + (1 if early else 0)
        targets = peer.sendable(targets, copies * sum(len(d) for d in datagrams))
        if not targets:
            peer.drops[DropReason.NO_PATH] += 1     # only unproven paths, their credit spent
            return
        sends = [(d, a) for a in targets for d in datagrams]
        out.sends.extend(sends)
        peer.tx_packets += packets
        peer.tx_bytes += sum(len(d) for d in datagrams)
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

    def _policy(self, peer_id: int) -> str | tuple[int, int] | None:
        fec = self.settings.fec
        return self.settings.peer_fec.get(peer_id, fec) if self.settings.peer_fec else fec

    def _parity(self, peer_id: int, k: int) -> int:
        """Parity shards for a k-shard message to peer_id under its FEC policy."""
        policy = self._policy(peer_id)
        if policy == fec.AUTO:
            return self.loss.parity(peer_id, k)
        return 0 if policy is None else fec.ratio_parity(policy, k)

    def _seal_message(self, kind: int, dst: int, key: bytes, plaintext: bytes, flags: int,
                      now: float) -> list[bytes]:
        """One datagram, or the shards (with parity) of a message too big for
        one or of a FEC batch (docs/protocol.md §12): one AEAD call either way."""
        if not flags & (FLAG_VNET | FLAG_BATCH) or (not flags & FLAG_BATCH
                                                    and len(plaintext) + OVERHEAD <= self.settings.max_datagram):
            # (a plain packet is never bigger than the TUN's MTU, unless the
            # MTU changed under us: then it goes whole, as before offloads)
            return [self._seal(kind, dst, key, plaintext, now, flags)]
        max_chunk = self.max_chunk
        k = fec.shard_count(len(plaintext) + TAG_SIZE, max_chunk)
        m = min(self._parity(dst, k), fec.MAX_SHARDS - k)
        isal = fec.uses_isal(k, m)          # in the authenticated header: the receiver decodes by it
        ts, seq = self._stamp(now, k + m)   # shard i carries seq + i
        header = Header(self.settings.ttl, PATH_DIRECT, kind, self.me, dst, self.session, ts, seq, 0,
                        flags | FLAG_FRAG | (FLAG_ISAL if isal else 0))
        body = seal_message(key, header, plaintext)
        chunks, k, m = fec.split(body, max_chunk, m, isal)
        datagrams = frame_shards(self.group_key, self.table.shard_key(key), header, chunks, k, m, len(body))
        if m and k > 1:
            # full-size shards first and the short last data shard at the
            # end, so the kernel sends the run with one GSO call
            datagrams.append(datagrams.pop(k - 1))
        return datagrams

    # ------------------------------------------------------------ inbound
    def from_udp(self, datagrams: list[tuple[bytes, Addr]], now: float) -> Output:
        out = Output()
        state, from_bytes = self._mask_state, int.from_bytes
        for data, addr in datagrams:
            if len(data) < MIN_DATAGRAM:
                self.global_drops[DropReason.MALFORMED] += 1
                continue
            h = state.copy()                # wire.unmask, inlined: once per datagram
            h.update(data[-SAMPLE:])
            full = from_bytes(h.digest(), "big")
            clear = from_bytes(data[:MASK_SIZE], "big") ^ full
            # The next shard of a message in progress (UDP GRO hands a
            # message over as a train) is predicted exactly: same header but
            # seq + 1, index + 1. It still has its MAC, the replay window and
            # the filing checked; only the parsing is skipped.
            nxt = self._next
            if nxt is not None and clear == nxt.clear and addr == nxt.addr and len(data) == nxt.size \
                    and self._next_shard(nxt, clear.to_bytes(MASK_SIZE, "big"), data, now, out):
                continue
            self._receive(data, addr, now, out, clear.to_bytes(MASK_SIZE, "big"), full)
        if self.loss.first:
            self._send_reports(self.loss.reports(now, set(self.loss.first)), now, out)
        return out

    def _receive(self, data: bytes, addr: Addr, now: float, out: Output, clear: bytes, full: int) -> None:
        """One datagram (its 32 first bytes unmasked: clear, and the mask):
        nothing it says is used before it is authenticated, except what
        finds the key (src, dst) and the checks that cost less."""
        version_kind, flags = clear[2], clear[3]
        if version_kind >> 4 != WIRE_VERSION:
            # only the release before is named: garbage unmasks to any version
            if version_kind >> 4 == WIRE_VERSION - 1:
                self._wrong_version(addr, version_kind >> 4, now)
            else:
                self.global_drops[DropReason.MALFORMED] += 1
            return
        kind, shard = version_kind & 0x0F, flags & FLAG_FRAG
        if (flags & ~KNOWN_FLAGS or kind > KIND_MAX or (flags & FLAG_BATCH and kind != KIND_DATA)
                or (flags & FLAG_ISAL and not shard)
                or (shard and (kind != KIND_DATA or len(data) < SHARD_OVERHEAD + TAG_SIZE))):
            self.global_drops[DropReason.MALFORMED] += 1
            return
        f = fields(clear)
        # src == me: our own datagram reflected back (or forged); never ours to take
        key = self.table.pair_key(f.src, f.dst) if f.src != self.me else None
        if key is None:
            self.global_drops[DropReason.UNKNOWN_PEER] += 1
            return
        header = f.header()
        if shard:
            # ~1 us (SipHash-2-4 of ~1.4 KB): what a forged shard costs, besides the unmask
            shard_key = self.table.shard_key(key)
            if header.pad or not shard_authentic(shard_key, clear, data):
                self.global_drops[DropReason.AUTH_FAILURE] += 1
                return
            plaintext, shard = None, (f, clear, shard_key)
        else:
            try:
                plaintext = open_sealed(key, header, data)
            except CryptoError:
                self.global_drops[DropReason.AUTH_FAILURE] += 1
                return
            if header.pad > len(plaintext):
                self.global_drops[DropReason.MALFORMED] += 1
                return
            shard = None
        src = self.table.get(header.src)
        if header.dst != self.me:
            self._relay(header, full, data, plaintext, addr, src, now, out)
        elif kind == KIND_CHALLENGE:
            self._on_challenge(src, header, plaintext, len(data), addr, now, out)
        elif kind == KIND_RESPONSE:
            self._on_response(src, header, plaintext, len(data), addr, now, out)
        else:
            self._accept(src, header, data, plaintext, shard, addr, now, out)

    def _wrong_version(self, addr: Addr, version: int, now: float) -> None:
        self.global_drops[DropReason.WRONG_VERSION] += 1
        if now >= self._next_version_notice:
            self._next_version_notice = now + VERSION_NOTICE_INTERVAL
            self.notices.append(f"datagrams of wire version {version} from {addr[0]}:{addr[1]} (this release "
                                f"speaks {WIRE_VERSION}): every peer of a group must run a release of the same "
                                f"wire version; counted as wrong_version, not logged for {VERSION_NOTICE_INTERVAL:.0f} s")

    def _accept(self, src: Peer, header: Header, data: bytes, plaintext: bytes | None, shard: tuple | None,
                addr: Addr, now: float, out: Output) -> None:
        """An authenticated datagram (plaintext) or shard (shard: its fields,
        its 32 unmasked bytes and the pair's shard key) for this node."""
        reason = src.check_own(header.session, header.ts, header.seq, now)
        if reason is not None:
            src.drops[reason] += 1
            if reason is DropReason.DUPLICATE:
                # another copy over another path: it keeps that path alive,
                # but only a first copy may add a path (a replay could come
                # from anywhere)
                src.refresh(addr, now)
            elif reason is DropReason.UNVERIFIED:
                self._challenge(src, addr, header.path != PATH_DIRECT, now, out)
            return
        if plaintext is not None and header.kind == KIND_DATA:
            # a first copy (shards are counted by the reassembly): the
            # union of the paths. Data only: keepalives and reports must
            # not make the other end report back (loss.py)
            self.loss.count_arrived(src.id, header.ts)
            if (not header.flags & FLAG_BATCH and header.src > self.me and self.settings.has_tun
                    and self._spoofed(header.src, plaintext, header.flags)):
                src.drops[DropReason.SPOOFED] += 1      # before it can teach a path or mark the peer up
                return
        self._learn(src, header, addr, len(data), now, out)
        if shard is not None:
            self._file_shard(src, header, shard, data, addr, now, out)
        else:
            self._message(src, header, plaintext, out)

    def _learn(self, src: Peer, header: Header, addr: Addr, size: int, now: float, out: Output) -> None:
        """Paths are learned only from datagrams addressed to us: a relayed
        datagram "from src" may have been sealed by dst, who shares the key.
        A new path is challenged before it carries more than it brought."""
        relayed = header.path != PATH_DIRECT
        if src.heard(addr, relayed, now, size) is not None:
            self._path_notice(src.id, f"new {'relayed' if relayed else 'direct'} path {addr[0]}:{addr[1]}")
        if not src.paths[addr].proven:
            self._challenge(src, addr, relayed, now, out)
        if not src.up:
            src.up = True
            self.notices.append(f"peer {format_id(src.id)} up")
        src.rx_bytes += size

    def _file_shard(self, src: Peer, header: Header, shard: tuple, data: bytes, addr: Addr, now: float,
                    out: Output) -> None:
        f, clear, shard_key = shard
        base = header.seq - f.index         # the message's seq: shard i carries base + i
        if base < 0:
            src.drops[DropReason.BAD_SHARD] += 1
            return
        rkey = (src.id, header.session, header.ts, base)
        isal = bool(header.flags & FLAG_ISAL)
        slot, reason = self.reassembly.add(rkey, f.index, f.k, f.m, f.length, isal, data[MASK_SIZE:-MAC_SIZE], now)
        if reason is not None:
            src.drops[reason] += 1
        if slot is None:
            filed = self.reassembly.slots.get(rkey)
            if reason is None and filed is not None and src.paths[addr].proven:
                nxt = _Next(int.from_bytes(clear, "big"), addr, src, rkey, filed, f.index, shard_key)
                self._next = nxt if nxt.advance() else None
            return
        self._complete(src, header, rkey, slot, base, now, out)

    def _next_shard(self, nxt: _Next, clear: bytes, data: bytes, now: float, out: Output) -> bool:
        """The predicted shard: True when it was taken, False to let the full
        path look at it (nothing has changed then)."""
        chunk = data[MASK_SIZE:-MAC_SIZE]
        if not hmac.compare_digest(mac(nxt.shard_key, clear[MUTABLE_BYTES:] + chunk), data[-MAC_SIZE:]):
            return False
        src, rkey = nxt.src, nxt.rkey
        path = src.paths.get(nxt.addr)
        if path is None or not path.proven:
            return False
        seq = rkey[3] + nxt.index
        if src.check_own(rkey[1], rkey[2], seq, now) is not None:
            return False            # (the full path counts it: the window recorded nothing)
        slot = nxt.slot
        done = self.reassembly.add_next(rkey, slot, nxt.index, chunk)
        if done is None:            # (the window has it now: the full path would call it a duplicate)
            self._next = None
            f = fields(clear)
            slot, reason = self.reassembly.add(rkey, f.index, f.k, f.m, f.length, slot.isal, chunk, now)
            if reason is not None:
                src.drops[reason] += 1
            done = slot is not None
        path.last_rx = src.last_rx = now
        src.rx_bytes += len(data)
        if done:
            self._next = None
            self._complete(src, fields(clear).header(), rkey, slot, rkey[3], now, out)
        elif self._next is nxt and not nxt.advance():
            self._next = None
        return True

    def _complete(self, src: Peer, header: Header, rkey: tuple, slot, base: int, now: float,
                  out: Output) -> None:
        """A message has k of its shards: decode, authenticate, deliver (once)."""
        self.reassembly.finish(rkey, slot)
        header = header._replace(seq=base)
        # Delivered once: its copies and late parity are shards with seqs of
        # their own, so a message remembered no more could complete twice
        reason = src.check_replay(MESSAGE_WINDOW, header.session, header.ts, base, now)
        if reason is not None:
            src.drops[reason] += 1
            return
        try:
            plaintext = open_message(self.table.pair_key(src.id, self.me), header, slot.decode())
        except (CryptoError, ValueError):      # a peer's bug: its shards were each authentic
            src.drops[DropReason.BAD_SHARD] += 1
            return
        self._message(src, header, plaintext, out)

    def _message(self, src: Peer, header: Header, plaintext: bytes, out: Output) -> None:
        """An authenticated, fresh message for this node: a whole datagram's
        plaintext or a reassembled one."""
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
        spoof_check = header.src > self.me
        if not header.flags & FLAG_BATCH:
            src.rx_packets += 1
            if spoof_check and self._spoofed(header.src, plaintext, header.flags):
                src.drops[DropReason.SPOOFED] += 1
                return
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
        for start, stop in bounds:
            packet = plaintext[start:stop]
            src.rx_packets += 1
            if spoof_check and self._spoofed(header.src, packet, header.flags):
                src.drops[DropReason.SPOOFED] += 1
                continue
            self._deliver(src, packet, vnet, out)

    # ------------------------------------------------------------ challenges
    def _challenge(self, peer: Peer, addr: Addr | None, relayed: bool, now: float, out: Output,
                   ways: list[Addr] | None = None) -> None:
        """Ask the peer to prove its session live and `addr` a way to it: one
        challenge, with a nonce of its own, to addr and to each of our ways
        to the peer (`ways`, else our paths towards it). At most every
        CHALLENGE_INTERVAL per peer, so a replayed datagram from a forged
        address costs one small datagram. Each challenge on one of our ways
        is also a probe of it (peers.Probe)."""
        if peer.next_challenge - CHALLENGE_INTERVAL <= now < peer.next_challenge:
            return          # (a deadline further ahead is from before the clock stepped back)
        key = self.table.pair_key(self.me, peer.id)
        if key is None:
            return
        peer.next_challenge = now + CHALLENGE_INTERVAL
        if ways is None:
            ways = self._towards(peer, now)
        targets = ([addr] if addr is not None else []) + [a for a in ways if a != addr]
        for target in targets:
            nonce = self._random_bytes(NONCE_SIZE)
            peer.challenge_sent(nonce, target, relayed if target == addr else target not in peer.paths
                                or peer.paths[target].relayed, target in ways, now)
            out.sends.append((self._seal(KIND_CHALLENGE, peer.id, key, nonce, now), target))

    def _on_challenge(self, src: Peer, header: Header, plaintext: bytes, size: int, addr: Addr, now: float,
                      out: Output) -> None:
        """Answer with the nonce, sealed now: on our paths to the peer, and to
        where it came from when the answer is no bigger than the challenge.
        Each challenge is answered once (its own replay window: a captured
        one replayed gets nothing) and at most RESPONSE_LIMIT a second per
        peer, so no one can make us send more to an address than it sent."""
        nonce = plaintext[:len(plaintext) - header.pad]
        key = self.table.pair_key(self.me, src.id)
        if len(nonce) != NONCE_SIZE or key is None:
            src.drops[DropReason.MALFORMED_REPORT] += 1
            return
        reason = src.check_replay(CHALLENGE_WINDOW, header.session, header.ts, header.seq, now)
        if reason is not None:
            src.drops[reason] += 1
            return
        second = int(now)
        if src.responses[0] != second:
            src.responses[0], src.responses[1] = second, 0
        if src.responses[1] >= RESPONSE_LIMIT:
            src.drops[DropReason.RATE_LIMITED] += 1
            return
        src.responses[1] += 1
        response = self._seal(KIND_RESPONSE, src.id, key, nonce, now)
        targets = [a for a in self._towards(src, now) if a != addr]
        if len(response) <= size or addr in src.paths and src.paths[addr].proven:
            targets.insert(0, addr)
        out.sends.extend((response, a) for a in targets)
        if header.session not in src.verified:
            self._challenge(src, addr, header.path != PATH_DIRECT, now, out)     # and prove theirs to us

    def _on_response(self, src: Peer, header: Header, plaintext: bytes, size: int, addr: Addr, now: float,
                     out: Output) -> None:
        """An answer to one of our challenges: its session is live (from this
        answer on) and the address the challenge went to reaches the peer."""
        challenge = src.challenge_done(plaintext[:len(plaintext) - header.pad], True, now)
        if challenge is None:
            # a nonce we are not waiting for: another copy of an answer we
            # took (it is sent on every path), or a stale or replayed one
            src.drops[DropReason.DUPLICATE if header.session in src.verified else DropReason.REPLAY] += 1
            return
        _, target, relayed, _ = challenge
        if header.session not in src.verified:
            src.verify(header.session, header.ts, header.seq, now)
        src.prove(target, relayed, now)
        self._learn(src, header, addr, size, now, out)

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
        """A peer below us (a client of ours) may send only from its own
        tunnel address, or from the networks configured for it
        (peers.<id>.networks), IPv4 and IPv6 alike, like WireGuard's
        AllowedIPs: so no member passes for another, nor for a host of the
        server's LAN or the internet. Peers above us route for others
        (client to client through a server), so their packets are not
        checked. Not IP at all: nothing to check (it is not routable)."""
        ends = inner.addresses(packet[VNET_HDR_SIZE:VNET_HDR_SIZE + INNER_HEAD] if flags & FLAG_VNET else packet)
        if ends is None:
            return False
        source = ends[0]
        if source == self._own_address(src):
            return False
        networks = self.settings.peer_networks.get(src)
        if networks:
            address = ipaddress.ip_address(source)
            return not any(address in n for n in networks)
        return True

    def _own_address(self, peer_id: int) -> bytes:
        packed = self._addresses.get(peer_id)
        if packed is None:
            if len(self._addresses) >= HOST_CACHE_LIMIT:
                self._addresses.clear()
            packed = self._addresses[peer_id] = self.net.address(peer_id).packed
        return packed

    def _path_notice(self, peer_id: int, what: str) -> None:
        """Path changes are state changes worth a line each, but a peer whose
        address changes on every datagram must not log per packet."""
        count = self._path_notices.get(peer_id, 0)
        self._path_notices[peer_id] = count + 1
        if count < PATH_NOTICES_PER_INTERVAL:
            self.notices.append(f"peer {format_id(peer_id)}: {what}")
        elif count == PATH_NOTICES_PER_INTERVAL:
            self.notices.append(f"peer {format_id(peer_id)}: more new paths; not logged for {PRUNE_INTERVAL:.0f} s")

    # ------------------------------------------------------------ relaying
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

    # ------------------------------------------------------------ timers
    def next_deadline(self) -> float:
        due = min(self._next_keepalive, self._next_prune, self._next_report)
        return min(due, self._timers[0][0]) if self._timers else due

    def tick(self, now: float) -> Output:
        out = Output()
        # `now` is the wall clock: after it steps back, deadlines set before
        # would wait out the step (a day, after a bad time source)
        if self._next_keepalive - now > KEEPALIVE_INTERVAL:
            self._next_keepalive = now
        if self._next_report - now > REPORT_INTERVAL:
            self._next_report = now
        if self._next_prune - now > PRUNE_INTERVAL:
            self._next_prune = now
        while self._timers and self._timers[0][0] <= now:
            out.sends.extend(heapq.heappop(self._timers)[2])
        if now >= self._next_keepalive:
            # the first few come quickly: paths and the challenges that
            # prove sessions (docs/protocol.md §5) should form fast
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
        self.reassembly.expire(now)
        for key, _ in self.reassembly.take_expired():
            peer = self.table.get(key[0])
            if peer is not None:
                peer.drops[DropReason.INCOMPLETE] += 1
        self._send_reports(self.loss.reports(now), now, out)

    def _send_reports(self, reports: list[tuple[int, bytes]], now: float, out: Output) -> None:
        for peer_id, payload in reports:
            peer = self.table.get(peer_id)
            key = self.table.pair_key(self.me, peer_id) if peer is not None else None
            if key is None:
                continue
            datagram = self._seal(KIND_REPORT, peer_id, key, payload, now)
            out.sends.extend((datagram, a) for a in peer.sendable(self._towards(peer, now), len(datagram)))

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
        if estimate is not None and after != before and self._policy(peer.id) == fec.AUTO:
            self.notices.append(f"peer {format_id(peer.id)}: {estimate:.1%} of datagrams lost; now "
                                f"{after[0]} parity shards per {meter.k}, {after[1]} per single datagram")

    def _keepalives(self, now: float, out: Output) -> None:
        """Keep our paths alive at the gateway (through every forwarder) and at
        each forwarder, so downward traffic can find us behind NAT; and probe
        each of those ways with a challenge, so status can tell whether it
        delivers even when the gateway and the forwarders send us nothing."""
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
            if addrs:
                self._challenge(peer, None, False, now, out, ways=addrs)

    # ------------------------------------------------------------ status
    @staticmethod
    def _path_snapshot(peer: Peer, now: float) -> list[dict]:
        """The peer's paths, and our probed ways to it that are not (yet) a
        path: a forwarder whose challenges were never answered."""
        def age(t: float) -> float | None:
            return None if t == -math.inf else round(now - t, 3)
        paths = []
        for addr in list(peer.paths) + [a for a in peer.probes if a not in peer.paths]:
            p, probe = peer.paths.get(addr), peer.probes.get(addr)
            entry = {"address": f"{addr[0]}:{addr[1]}",
                     "learned": "probed" if p is None else "static" if p.static else
                     ("relayed" if p.relayed else "direct"),
                     "proven": p is not None and p.proven,
                     "last_rx_age": None if p is None else age(p.last_rx)}
            if probe is not None:
                loss_ = probe.loss()
                entry.update(delivers=probe.delivers(now), last_answer_age=age(probe.last_answer),
                             probe_loss=None if loss_ is None else round(loss_, 3), probes=probe.count)
            paths.append(entry)
        return paths

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
                "paths": self._path_snapshot(peer, now),
                "rx_packets": peer.rx_packets, "rx_bytes": peer.rx_bytes,
                "tx_packets": peer.tx_packets, "tx_bytes": peer.tx_bytes,
                "relayed_packets": peer.relayed_packets,
                "loss": round(self.loss.loss[peer.id], 4) if peer.id in self.loss.loss else None,
                "fec": fec.format_fec(self._policy(peer.id)),
                "parity": self._parity(peer.id, self.loss.k),
                "copies": self._parity(peer.id, 1),
                "drops": {r.value: n for r, n in sorted(peer.drops.items(), key=lambda x: x[0].value)},
            })
        return {"id": format_id(self.me), "mode": self.settings.mode, "group": self.settings.group,
                "peers": peers,
                "reassembling": len(self.reassembly.slots), "reassembly_bytes": self.reassembly.bytes,
                "drops": {r.value: n for r, n in sorted(self.global_drops.items(), key=lambda x: x[0].value)}}
