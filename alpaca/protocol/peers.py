"""The peer and path table (SPEC §2-3).

A peer is reached on one or more paths, each a UDP address:
  - its static address from secrets.txt (path 0 when given),
  - direct addresses learned from its authenticated datagrams (path byte 0),
  - relay addresses learned from its authenticated datagrams that a forwarder
    carried (path byte != 0): the forwarder's address.
Learned paths count as live for PATH_LIFETIME after they last carried
something. Nothing is learned from a datagram that failed authentication or
replay checks: the caller only calls `heard` after both passed.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from .constants import MAX_PATHS_PER_PEER, MAX_WINDOWS_PER_PEER, PATH_LIFETIME, PEER_LIFETIME, REPLAY_WINDOW, SEQ_LIMIT
from .crypto import derive_pair_key, derive_psk_key
from .drops import DropReason
from .replay import ReplayWindow

RELAY_KEY_CACHE = 4096

Addr = tuple  # (host, port); alpaca/udp.py turns IPv6 socket addresses into this form


@dataclass(slots=True)
class Path:
    addr: Addr
    relayed: bool
    static: bool = False
    last_rx: float = -math.inf


@dataclass(frozen=True)
class PeerEntry:
    """What secrets.txt says about a peer (the part the core needs)."""
    psk: str | None                 # None when this host never needs it (a smaller ID's key)
    static_addr: Addr | None = None


class Peer:
    __slots__ = ("id", "entry", "psk_key", "paths", "last_rx", "up", "rx_packets", "rx_bytes",
                 "tx_packets", "tx_bytes", "relayed_packets", "drops", "replay", "replay_floor", "relay_windows")

    def __init__(self, peer_id: int, entry: PeerEntry, now: float):
        self.id = peer_id
        self.entry = entry
        self.psk_key = derive_psk_key(entry.psk) if entry.psk is not None else None
        self.paths: dict[Addr, Path] = {}
        if entry.static_addr is not None:
            self.paths[entry.static_addr] = Path(entry.static_addr, relayed=False, static=True)
        self.last_rx = -math.inf
        self.up = False
        self.rx_packets = self.rx_bytes = 0
        self.tx_packets = self.tx_bytes = 0
        self.relayed_packets = 0
        self.drops: collections.Counter[DropReason] = collections.Counter()
        # one window per destination: the pair key (src, dst) is known to both
        # ends, so dst could forge "from src to dst" datagrams; keyed by dst,
        # such forgeries can only touch the window of traffic to the forger
        self.replay: dict[int, ReplayWindow] = {}
        # We keep no replay state across restarts or key changes, so accept
        # only timestamps after this peer entered the table: a datagram
        # captured before cannot be replayed into the fresh window.
        self.replay_floor = int(now) + 1
        # relay windows (at any source) charged to this peer: at most MAX_WINDOWS_PER_PEER
        self.relay_windows = 0

    def check_replay(self, dst: int, session: bytes, ts: int, seq: int, now: float,
                     charged: Peer | None = None) -> DropReason | None:
        """`charged`: None for the window of traffic to this node; for a pair
        it only relays, the peer a new window counts against (the bigger ID)."""
        if ts < self.replay_floor:
            return DropReason.REPLAY
        window = self.replay.get(dst)
        if window is None:
            if seq >= SEQ_LIMIT or abs(ts - int(now)) > REPLAY_WINDOW:
                return DropReason.REPLAY        # what the window would say: never open one for it
            if charged is not None:
                if charged.relay_windows >= MAX_WINDOWS_PER_PEER:
                    return DropReason.TOO_MANY_SESSIONS     # a slot frees when a window expires
                charged.relay_windows += 1
            window = self.replay[dst] = ReplayWindow(charged)
        return window.check_and_accept(session, ts, seq, now)

    @property
    def static_addr(self) -> Addr | None:
        return self.entry.static_addr

    def heard(self, addr: Addr, relayed: bool, now: float) -> bool:
        """Record an authenticated datagram from addr; True when the path is new."""
        self.last_rx = now
        path = self.paths.get(addr)
        if path is not None:
            path.last_rx = now
            if not path.static:
                path.relayed = relayed
            return False
        if len(self.paths) >= MAX_PATHS_PER_PEER:
            learned = [p for p in self.paths.values() if not p.static]
            oldest = min(learned, key=lambda p: p.last_rx)
            del self.paths[oldest.addr]
        self.paths[addr] = Path(addr, relayed, last_rx=now)
        return True

    def refresh(self, addr: Addr, now: float) -> None:
        """A copy of an already accepted datagram arrived on addr: keep an
        existing path alive, never add one."""
        path = self.paths.get(addr)
        if path is not None:
            path.last_rx = now

    def direct_paths(self, now: float) -> list[Addr]:
        """The peer's own address(es): static, plus live learned direct ones."""
        return [p.addr for p in self.paths.values()
                if p.static or (not p.relayed and now - p.last_rx <= PATH_LIFETIME)]

    def live_paths(self, now: float, keep_static: bool) -> list[Addr]:
        """Every path to send on (downward multi-path). The static address
        counts only while the peer was heard within PEER_LIFETIME, unless
        keep_static (inactive_downward_static)."""
        static_ok = keep_static or now - self.last_rx <= PEER_LIFETIME
        return [p.addr for p in self.paths.values()
                if (p.static and static_ok) or (not p.static and now - p.last_rx <= PATH_LIFETIME)]

    def prune(self, now: float) -> None:
        for addr in [a for a, p in self.paths.items() if not p.static and now - p.last_rx > PEER_LIFETIME]:
            del self.paths[addr]
        for dst in list(self.replay):
            self.replay[dst].expire(now)
            if not self.replay[dst].sessions:
                # keep what the window had forgotten before dropping it
                self.replay_floor = max(self.replay_floor, self.replay[dst].floor + 1)
                self.release_window(dst)

    def release_window(self, dst: int) -> None:
        """Drop the window for dst and free the slot it took."""
        window = self.replay.pop(dst)
        if window.charged is not None:
            window.charged.relay_windows -= 1

    def release_windows(self) -> None:
        """The peer leaves the table: free the slots its windows took."""
        for dst in list(self.replay):
            self.release_window(dst)


class PeerTable:
    """Peers by ID, and the pair keys between them (derived lazily, cached)."""

    def __init__(self, my_id: int, group_key: bytes):
        self.my_id = my_id
        self.group_key = group_key
        self.peers: dict[int, Peer] = {}
        # keys of pairs that include me: at most one per peer; keys of pairs we
        # only relay for: a bounded cache, since unauthenticated headers pick them
        self._pair_keys: dict[tuple[int, int], bytes] = {}
        self._relay_keys: dict[tuple[int, int], bytes] = {}

    def get(self, peer_id: int) -> Peer | None:
        return self.peers.get(peer_id)

    def pair_key(self, a: int, b: int) -> bytes | None:
        """Key for traffic between a and b: from the bigger ID's pre-shared key (SPEC §2).
        Both must be known (we need the smaller one's addresses and counters too)."""
        lo, hi = (a, b) if a < b else (b, a)
        cache = self._pair_keys if self.my_id in (lo, hi) else self._relay_keys
        key = cache.get((lo, hi))
        if key is None:
            if lo == hi or lo not in self.peers or hi not in self.peers or self.peers[hi].psk_key is None:
                return None
            key = derive_pair_key(self.group_key, self.peers[hi].psk_key, lo, hi)
            if cache is self._relay_keys and len(cache) >= RELAY_KEY_CACHE:
                del cache[next(iter(cache))]      # oldest first
            cache[(lo, hi)] = key
        return key

    def apply(self, entries: dict[int, PeerEntry], now: float) -> tuple[list[int], list[int], list[int]]:
        """Make the table match secrets.txt. Unchanged peers keep their paths,
        counters and replay state; changed ones start afresh. Returns
        (added, changed, removed) IDs."""
        added = [i for i in entries if i not in self.peers]
        removed = [i for i in self.peers if i not in entries]
        changed = [i for i in entries if i in self.peers and self.peers[i].entry != entries[i]]
        for peer_id in removed + changed:
            self.peers.pop(peer_id).release_windows()
        if removed or changed:
            gone = set(removed + changed)
            self._pair_keys = {k: v for k, v in self._pair_keys.items() if not gone.intersection(k)}
            self._relay_keys.clear()
        for peer_id in added + changed:
            self.peers[peer_id] = Peer(peer_id, entries[peer_id], now)
        return sorted(added), sorted(changed), sorted(removed)
