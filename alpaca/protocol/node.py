"""The forwarding engine of one peer, free of sockets and clocks (docs/protocol.md §6).

Node is one object; its methods are in four parts, each read top to bottom:
  outbound.py    a packet from the TUN: route, seal (and shard, with
                 parity), emit on each target, schedule the delayed copies;
  inbound.py     a datagram from UDP: unmask, authenticate, and for this
                 node the session check, the replay window, path learning,
                 reassembly and delivery;
  relay.py       a datagram or shard for someone else: once, onwards;
  challenges.py  sessions and paths proven live, and probes of our ways.
Here: the state, where to send (`_targets`, `_route`), timers (keepalives,
loss reports, expiry) and the status snapshot.

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

from . import fec, health, loss
from .challenges import Challenges
from .constants import (CAP_AES, DEFAULT_TTL, FLAG_AES, HELD_PACKETS, HOST_CACHE_LIMIT, KEEPALIVE_INTERVAL, KIND_CHALLENGE,
                        KIND_KEEPALIVE, KIND_REPORT, NEXT_HOPS_KEPT, OVERHEAD, PATH_DIRECT, PEER_LIFETIME,
                        PATH_MTU_INTERVAL, PRUNE_INTERVAL, REPORT_INTERVAL, SEQ_LIMIT, TAG_SIZE, UNREACHABLE_BURST, VNET_HDR_SIZE)
from .crypto import derive_group_key, mask_state
from .drops import DropReason
from .ids import TunnelNet, format_id
from .inbound import Inbound, _Next, _Single
from .outbound import UNRESOLVED, Outbound
from .output import Output
from .peers import Addr, Peer, PeerEntry, PeerTable, addr_family, addr_text, measure_offset
from .reassembly import Reassembler
from .relay import Relay, _RelayNext
from .wire import SHARD_OVERHEAD, Header, seal



@dataclass(frozen=True)
class NodeSettings:
    my_id: int
    net: tuple[int, int]
    group: str
    mode: str = "client"                  # server | client | forwarder
    net6: bytes | None = None             # the tunnel's IPv6 /64 (8 bytes), or none
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
    # data to a peer whose answers say it opens AES-256-GCM, on direct paths,
    # is sealed with it (docs/protocol.md §4 "AEAD"); the daemon sets this
    # from config `aead` and the CPU (crypto.aes_available)
    aes: bool = False

    @property
    def max_datagram(self) -> int:
        """The largest datagram: a full-MTU packet with its virtio_net_hdr."""
        return self.mtu + OVERHEAD + VNET_HDR_SIZE

    @property
    def has_tun(self) -> bool:
        return self.mode != "forwarder"








class Node(Inbound, Outbound, Relay, Challenges):
    """One peer's forwarding engine. Its parts, each read top to bottom:
    outbound.py (from the TUN), inbound.py (from UDP), relay.py (for
    someone else), challenges.py (sessions and paths proven live); here:
    the state, where to send, timers and status."""

    def __init__(self, settings: NodeSettings, peers: dict[int, PeerEntry], now: float,
                 random_bytes: Callable[[int], bytes] = os.urandom, asks_next_hops: bool = False):
        self.settings = settings
        self.me = settings.my_id
        self.net = TunnelNet(settings.net, settings.net6)
        self.group_key = derive_group_key(settings.group)
        self._mask_state = mask_state(self.group_key)
        self.table = PeerTable(self.me, self.group_key)
        self.table.apply(peers, now)
        self._random_bytes = random_bytes
        # Destinations outside the tunnel net go to the peer the host's
        # routing names (docs/protocol.md §6). The core never asks the host
        # mid-packet: with asks_next_hops, a packet to a destination it has
        # no answer for is held, the daemon looks the destination up after
        # the batch (`unresolved`) and hands the answer back
        # (`learn_next_hops`, which sends what was held). Without it: the gateway.
        self.asks_next_hops = asks_next_hops
        self.next_hops: dict[bytes, int | None] = {}     # dst -> peer ID (None: the configured gateway)
        self._held: dict[bytes, list[bytes]] = {}        # dst -> packets waiting for its answer
        self._held_count = 0
        self._unreachable_tokens, self._unreachable_at = float(UNREACHABLE_BURST), now
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
        self._next_path_mtu = now
        self._sending_big: set[int] = set()   # peers sent a message a path MTU could stop (pmtu.ACTIVE)
        self._packed: dict[str, bytes | None] = {}
        self._addresses: dict[int, tuple[bytes, ...]] = {}    # peer ID -> its tunnel addresses, packed
        self._loop_noticed: set[Addr] = set()
        self._path_notices: dict[int, int] = {}
        self.started = now
        self.loss = loss.LossMeter(fec.shard_count(65535 + VNET_HDR_SIZE + TAG_SIZE, self.max_chunk))
        self.reassembly = Reassembler(self.loss.count_shards)
        self._next_report = now + REPORT_INTERVAL
        self._next_version_notice = -math.inf
        self._next_aes_notice = -math.inf
        self._next: dict[Addr, _Next] = {}     # source address -> the shard predicted next from it (from_udp)
        self._singles: dict[Addr, _Single] = {}     # source address -> the whole datagram predicted next
        self._relay_next: dict[Addr, _RelayNext] = {}   # source address -> the shard to relay predicted next
        self.last_data: dict[int, float] = {}   # peer ID -> when it last sent us data (status: active or idle)
        self._parity_logged: dict[int, int] = {}  # peer ID -> parity per 64 KiB its last parity notice named

    @property
    def max_chunk(self) -> int:
        """The largest chunk of a message in one shard datagram."""
        return self.settings.max_datagram - SHARD_OVERHEAD

    # ------------------------------------------------------------ peers
    def apply_peers(self, peers: dict[int, PeerEntry], now: float) -> tuple[list[int], list[int], list[int]]:
        added, changed, removed = self.table.apply(peers, now)
        self._next.clear()          # they may name a peer object that is gone, or a key changed
        self._singles.clear()
        self._relay_next.clear()
        for peer_id in changed + removed:
            self.reassembly.forget_peer(peer_id)
            self.last_data.pop(peer_id, None)
            self._parity_logged.pop(peer_id, None)
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

    def _session_proven(self, src: Peer, header: Header, sent: float, now: float) -> None:
        """The peer's session answered our challenge sent at `sent`: verified
        from this answer on, judged by its clock as this answer measures it
        (docs/protocol.md §5 "Clock offsets"); a clock far off is logged
        once per session."""
        offset = measure_offset(header.ts, sent, now, src.clock_floor(header.session, now))
        if src.verify(header.session, header.ts, header.seq, now, offset):
            self.notices.append(f"peer {format_id(src.id)}: its clock is {offset:+.0f} s off ours; its traffic "
                                f"is judged by its own clock (logged once per session)")
        self.loss.clock_offsets[src.id] = round(offset)

    def _seal(self, kind: int, dst: int, key: bytes, payload: bytes, now: float, flags: int = 0,
              pad: int | None = None, caps: bool = False) -> bytes:
        # challenges and answers are not padded to `padding`: their size says
        # nothing, and an answer must be no bigger than its challenge to go
        # back to where the challenge came from; `pad`: a path MTU probe.
        # `caps`: at least one byte of padding, the first saying what this
        # node can do (CAP_*; an older release ignores padding)
        if pad is None:
            padding = self.settings.padding if kind < KIND_CHALLENGE else 0
            pad = padding - len(payload) if len(payload) < padding else 0
        if caps:
            pad = max(pad, 1)
            payload = payload + bytes((CAP_AES if self.settings.aes else 0,)) + bytes(pad - 1)
        elif pad:
            payload = payload + bytes(pad)
        ts, seq = self._stamp(now)
        header = Header(self.settings.ttl, PATH_DIRECT, kind, self.me, dst, self.session, ts, seq, pad, flags)
        return seal(self.group_key, key, header, payload)

    def _aead_flag(self, peer: Peer, targets: list[Addr]) -> int:
        """FLAG_AES for data to `peer` on `targets` when both ends open
        AES-256-GCM and every target is a direct path of the peer: a relay
        authenticates what it passes on, and an older or AES-less relay
        could not (docs/protocol.md §4 "AEAD")."""
        if not (self.settings.aes and peer.aes):
            return 0
        paths = peer.paths
        for addr in targets:
            path = paths.get(addr)
            if path is None or path.relayed:
                return 0
        return FLAG_AES

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

    # ------------------------------------------------------------ outbound
    def _route(self, dst_ip: bytes, now: float) -> tuple[Peer, bytes, list[Addr]] | None | object:
        """(dst peer, pair key, targets) for a packet to dst_ip; None when not
        routable; UNRESOLVED when it waits for the host's next hop.

        dst_id is the ID inside a tunnel-net address, else the peer the
        host's routing names (next_hops). A tunnel peer we hold no key or
        path for is reached via our gateway, whose kernel routes it back
        into the tunnel (client to client)."""
        if len(dst_ip) == 16 and (dst_ip[0] == 0xFF or (dst_ip[0] == 0xFE and dst_ip[1] & 0xC0 == 0x80)):
            return None     # IPv6 multicast / link-local (router solicitations, MLD): this link only
        peer_id = self.net.id_of(dst_ip)
        fallback = self.settings.gateway if peer_id is not None else None
        if peer_id is None:
            peer_id = self.next_hops.get(dst_ip, UNRESOLVED)
            if peer_id is UNRESOLVED:
                if self.asks_next_hops and self._held_count < HELD_PACKETS:
                    return UNRESOLVED
                peer_id = None
            if peer_id is None:
                peer_id = self.settings.gateway
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


    # ------------------------------------------------------------ next hops
    @property
    def unresolved(self):
        """Destinations with packets held for the host's next hop (a view)."""
        return self._held.keys()

    def learn_next_hops(self, answers: dict[bytes, int | None], now: float) -> Output:
        """The host's next hop per destination (None: the configured
        gateway); sends what was held for them, in order."""
        held = []
        for dst, peer_id in answers.items():
            if len(self.next_hops) >= NEXT_HOPS_KEPT:
                del self.next_hops[next(iter(self.next_hops))]      # oldest first
            self.next_hops[dst] = peer_id
            held += self._held.pop(dst, ())
        self._held_count -= len(held)
        return self.from_tun(held, now)

    def forget_next_hops(self) -> None:
        """The host's routes changed: ask again."""
        self.next_hops.clear()



    # ------------------------------------------------------------ timers
    def next_deadline(self) -> float:
        due = min(self._next_keepalive, self._next_prune, self._next_report, self._next_path_mtu)
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
        if self._next_path_mtu - now > PATH_MTU_INTERVAL:
            self._next_path_mtu = now
        while self._timers and self._timers[0][0] <= now:
            out.sends.extend(heapq.heappop(self._timers)[2])
        if now >= self._next_keepalive:
            # the first few come quickly: paths and the challenges that
            # prove sessions (docs/protocol.md §5) should form fast
            self._keepalives_sent += 1
            self._next_keepalive = now + (KEEPALIVE_INTERVAL if self._keepalives_sent > 3 else 1.0)
            self._keepalives(now, out)
        if now >= self._next_path_mtu:
            self._next_path_mtu = now + PATH_MTU_INTERVAL
            self._path_mtus(now, out)
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

    def report_copies(self, peer_id: int) -> int:
        """A report carries a sample that no later report repeats, so it goes
        as many times as a one-datagram message to the peer would (1 + its
        parity for k = 1, whatever the `fec` policy), and twice while we
        know nothing of the loss towards it. The copies share a seq: the
        receiver takes one and counts the others `duplicate`."""
        return 1 + (self.loss.parity(peer_id, 1) if peer_id in self.loss.loss else 1)

    def _send_reports(self, reports: list[tuple[int, bytes]], now: float, out: Output) -> None:
        for peer_id, payload in reports:
            peer = self.table.get(peer_id)
            key = self.table.pair_key(self.me, peer_id) if peer is not None else None
            if key is None:
                continue
            datagram = self._seal(KIND_REPORT, peer_id, key, payload, now)
            copies = self.report_copies(peer_id)
            addrs = peer.sendable(self._towards(peer, now), copies * len(datagram))
            out.sends.extend((datagram, a) for a in addrs for _ in range(copies))

    def _loss_report(self, peer: Peer, payload: bytes, now: float) -> None:
        """What arrived of what we sent the peer: adapt parity and copies,
        and whether its bulk is spread over its paths (loss.py)."""
        meter = self.loss
        before = (meter.parity(peer.id, meter.k), meter.parity(peer.id, 1))
        spread = peer.id in meter.spread
        try:
            estimate = meter.on_report(peer.id, payload, now)
        except loss.BadReport:
            peer.drops[DropReason.MALFORMED_REPORT] += 1
            return
        if spread != (peer.id in meter.spread):
            self.notices.append(f"peer {format_id(peer.id)}: bulk " + (
                f"spread over {meter.paths[peer.id]} paths, each losing ~{estimate:.1%}" if not spread
                else f"sent on every path again ({estimate:.1%} lost)"))
        after = (meter.parity(peer.id, meter.k), meter.parity(peer.id, 1))
        logged = self._parity_logged.get(peer.id)
        # one line when parity starts or stops, or moves by over a quarter
        # since the last line (at 30 % it wobbles by a shard every report)
        if (estimate is not None and after != before and self._policy(peer.id) == fec.AUTO
                and (logged is None or (logged == 0) != (after[0] == 0) or abs(after[0] - logged) * 4 > logged)):
            self._parity_logged[peer.id] = after[0]
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
            addrs = self._towards(peer, now) if peer_id == gw else peer.direct_paths(now)
            # one keepalive sealed per way, not copies of one: a copy that
            # arrives second is a duplicate and teaches no path, so the peer
            # would learn only the fastest of our ways (e.g. IPv4 of a peer
            # reached on IPv4 and IPv6) and find no other when it breaks
            out.sends.extend((self._seal(KIND_KEEPALIVE, peer_id, key, b"", now), a) for a in addrs)
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
            entry = {"address": addr_text(addr), "family": addr_family(addr),
                     "learned": "probed" if p is None else "static" if p.static else
                     ("relayed" if p.relayed else "direct"),
                     "proven": p is not None and p.proven,
                     "last_rx_age": None if p is None else age(p.last_rx)}
            if probe is not None:
                loss_ = probe.loss()
                entry.update(delivers=probe.delivers(now), last_answer_age=age(probe.last_answer),
                             probe_loss=None if loss_ is None else round(loss_, 3), probes=probe.count,
                             path_mtu=probe.mtu.state, max_datagram=probe.mtu.limit)
            paths.append(entry)
        return paths

    def _role(self, peer_id: int) -> str | None:
        """What this node depends on the peer for: None for a peer it only
        answers (another client; a server's clients)."""
        if peer_id == self.settings.gateway:
            return "gateway"
        return "forwarder" if peer_id in self.settings.forwarders else None

    def snapshot(self, now: float) -> dict:
        """Plain data for `alpaca-tunnel status` (JSON-able)."""
        def age(t: float | None) -> float | None:
            return None if t is None or t == -math.inf else round(now - t, 3)
        peers = []
        for peer in sorted(self.table.peers.values(), key=lambda p: p.id):
            if peer.id == self.me:
                continue
            peers.append({
                "id": format_id(peer.id),
                "address": str(self.net.address(peer.id)),
                "address6": str(self.net.address6(peer.id)) if self.net.prefix6 is not None else None,
                "up": peer.up,
                "role": self._role(peer.id),
                "last_rx_age": age(peer.last_rx),
                "last_data_age": age(self.last_data.get(peer.id)),
                "paths": self._path_snapshot(peer, now),
                "rx_packets": peer.rx_packets, "rx_bytes": peer.rx_bytes,
                "tx_packets": peer.tx_packets, "tx_bytes": peer.tx_bytes,
                "relayed_packets": peer.relayed_packets,
                "loss": round(self.loss.loss[peer.id], 4) if peer.id in self.loss.loss else None,
                "fec": fec.format_fec(self._policy(peer.id)),
                "parity": self._parity(peer.id, self.loss.k),
                "spread": peer.id in self.loss.spread,
                "copies": self._parity(peer.id, 1),
                "drops": {r.value: n for r, n in sorted(peer.drops.items(), key=lambda x: x[0].value)},
                "clock_offset": None if peer.clock_offset is None else round(peer.clock_offset, 3),
                "aead": "aes-256-gcm" if self.settings.aes and peer.aes else "xchacha20-poly1305",
            })
            peers[-1]["state"] = health.peer_state(peers[-1], now - self.started)
        return {"health": health.daemon_health({"peers": peers}), "id": format_id(self.me), "mode": self.settings.mode, "group": self.settings.group,
                "peers": peers,
                "reassembling": len(self.reassembly.slots), "reassembly_bytes": self.reassembly.bytes,
                "drops": {r.value: n for r, n in sorted(self.global_drops.items(), key=lambda x: x[0].value)}}
