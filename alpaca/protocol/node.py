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
from .constants import (DEFAULT_TTL, KEEPALIVE_INTERVAL, KIND_DATA, KIND_KEEPALIVE,
                        MIN_DATAGRAM, PATH_DIRECT, PATH_RELAYED, PEER_LIFETIME, SEQ_LIMIT,
                        SYN_DNS_COPY_DELAY, WIRE_VERSION)
from .crypto import CryptoError, Header, derive_group_key, open_sealed, peek, rewrite_mutable, seal
from .drops import DropReason
from .ids import TunnelNet, format_id
from .peers import Addr, Peer, PeerEntry, PeerTable

PRUNE_INTERVAL = 5.0
PATH_NOTICES_PER_INTERVAL = 3     # per peer, then one line saying the rest are not logged
HOST_CACHE_LIMIT = 1024           # packed forms of target hosts kept for the loop guard


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

    def _seal(self, kind: int, dst: int, key: bytes, payload: bytes, now: float) -> bytes:
        pad = self.settings.padding - len(payload) if len(payload) < self.settings.padding else 0
        ts, seq = self._stamp(now)
        header = Header(self.settings.ttl, PATH_DIRECT, kind, self.me, dst, self.session, ts, seq, pad)
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

    def _emit(self, out: list, datagram: bytes, targets: list[Addr], ends: tuple[bytes, bytes] | None,
              peer: Peer) -> int:
        """Append sends; returns how many. The loop guard lives here; `ends` are
        the inner packet's (src, dst) addresses, None for keepalives."""
        sent = 0
        for addr in targets:
            if ends is not None and self._packed_host(addr[0]) in ends:
                # SPEC §3 loop guard: the route to this peer's address points
                # back into the tunnel
                peer.drops[DropReason.LOOP] += 1
                if addr not in self._loop_noticed:
                    self._loop_noticed.add(addr)
                    self.notices.append(f"loop: peer {format_id(peer.id)} at {addr[0]} is routed "
                                        f"into the tunnel; dropping (logged once)")
                continue
            out.append((datagram, addr))
            sent += 1
        return sent

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
        for packet in packets:
            self._originate(packet, now, out)
        return out

    def _originate(self, packet: bytes, now: float, out: Output) -> None:
        ends = inner.addresses(packet)
        route = self._route(ends[1], now) if ends else None
        if route is None:
            self.global_drops[DropReason.NOT_ROUTABLE] += 1
            return
        peer, key, targets = route
        if not targets:
            peer.drops[DropReason.NO_PATH] += 1
            return
        datagram = self._seal(KIND_DATA, peer.id, key, packet, now)
        sends: list[tuple[bytes, Addr]] = []
        if not self._emit(sends, datagram, targets, ends, peer):
            return          # every target failed the loop guard (counted there)
        out.sends.extend(sends)
        peer.tx_packets += 1
        peer.tx_bytes += len(datagram)
        # SPEC §3 duplicate sends: same datagram (same seq), later, so the
        # receiver's dedup removes whichever copy arrives second
        delay = self.settings.duplicate_delay
        for k in range(1, self.settings.duplicate + 1):
            if delay > 0:
                self._schedule(now + k * delay, sends)
            else:
                out.sends.extend(sends)
        if inner.wants_early_copy(packet):
            self._schedule(now + SYN_DNS_COPY_DELAY, sends)

    # ------------------------------------------------------------ inbound
    def from_udp(self, datagrams: list[tuple[bytes, Addr]], now: float) -> Output:
        out = Output()
        for data, addr in datagrams:
            self._receive(data, addr, now, out)
        return out

    def _receive(self, data: bytes, addr: Addr, now: float, out: Output) -> None:
        if len(data) < MIN_DATAGRAM:
            self.global_drops[DropReason.MALFORMED] += 1
            return
        header, mask = peek(self.group_key, data)
        if header.version != WIRE_VERSION or header.flags or header.kind > KIND_KEEPALIVE:
            self.global_drops[DropReason.MALFORMED] += 1
            return
        # src == me: our own datagram reflected back (or forged); never ours to take
        key = self.table.pair_key(header.src, header.dst) if header.src != self.me else None
        if key is None:
            self.global_drops[DropReason.UNKNOWN_PEER] += 1
            return
        try:
            plaintext = open_sealed(key, header, data)
        except CryptoError:
            self.global_drops[DropReason.AUTH_FAILURE] += 1
            return
        if header.pad > len(plaintext):
            self.global_drops[DropReason.MALFORMED] += 1
            return
        # authenticated from here on: drops are the source peer's
        src = self.table.get(header.src)
        for_me = header.dst == self.me
        charged = targets = None
        if not for_me:
            # what would not be relayed is dropped before it can open a replay window
            dst = self.table.get(header.dst)
            targets = self._relay_targets_from(header, addr, src, dst, now)
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
                src.refresh(addr, now)
            return
        if not for_me:
            self._relay(header, mask, data, plaintext, targets, src, out)
            return
        if header.kind == KIND_DATA and header.src > self.me and self._spoofed(header.src, plaintext):
            src.drops[DropReason.SPOOFED] += 1
            return
        # Paths are learned only from datagrams addressed to us: a relayed
        # datagram "from src" may have been sealed by dst, who shares the key.
        relayed = header.path != PATH_DIRECT
        if src.heard(addr, relayed, now):
            self._path_notice(src.id, f"new {'relayed' if relayed else 'direct'} path {addr[0]}:{addr[1]}")
        if not src.up:
            src.up = True
            self.notices.append(f"peer {format_id(src.id)} up")
        src.rx_packets += 1
        src.rx_bytes += len(data)
        if header.kind == KIND_KEEPALIVE:
            return
        if not self.settings.has_tun:
            src.drops[DropReason.NO_TUN] += 1
            return
        out.tun.append(plaintext[:len(plaintext) - header.pad] if header.pad else plaintext)

    def _spoofed(self, src: int, packet: bytes) -> bool:
        """A peer below us (a client of ours) may only use its own tunnel
        address as the source of a tunnel-net packet, so one member cannot
        pass for another at the IP level (like WireGuard's allowed IPs).
        Peers above us route for others (client to client through a
        server), so their packets are not checked."""
        ends = inner.addresses(packet)
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
        relay = rewrite_mutable(data, mask, header.ttl - 1, PATH_RELAYED)
        ends = inner.addresses(plaintext) if header.kind == KIND_DATA else None
        if self._emit(out.sends, relay, targets, ends, src):
            src.relayed_packets += 1

    # ------------------------------------------------------------ timers
    def next_deadline(self) -> float:
        due = min(self._next_keepalive, self._next_prune)
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
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self._path_notices.clear()
            if len(self._loop_noticed) > HOST_CACHE_LIMIT:
                self._loop_noticed.clear()
            for peer in self.table.peers.values():
                peer.prune(now)
                if peer.up and now - peer.last_rx > PEER_LIFETIME:
                    peer.up = False
                    self.notices.append(f"peer {format_id(peer.id)} down (silent for {PEER_LIFETIME:.0f} s)")
        return out

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
            self._emit(out.sends, datagram, addrs, None, peer)

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
                "drops": {r.value: n for r, n in sorted(peer.drops.items(), key=lambda x: x[0].value)},
            })
        return {"id": format_id(self.me), "mode": self.settings.mode, "group": self.settings.group,
                "peers": peers,
                "drops": {r.value: n for r, n in sorted(self.global_drops.items(), key=lambda x: x[0].value)}}
