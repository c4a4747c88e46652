"""The peer and path table (docs/protocol.md §5-6).

A peer is reached on one or more paths, each a UDP address:
  - its static addresses from secrets.txt (the ip and ip6 columns: one
    path per address family, both used at once),
  - direct addresses learned from its authenticated datagrams (path byte 0),
  - relay addresses learned from its authenticated datagrams that a forwarder
    carried (path byte != 0): the forwarder's address.
Learned paths count as live for PATH_LIFETIME after they last carried
something. Nothing is learned from a datagram that failed authentication or
replay checks: the caller only calls `heard` after both passed.

A learned path is not yet proven to reach the peer: a member can put any
source address on its datagrams. Until a challenge sent on it comes back
answered (Path.proven), a path carries at most as many bytes as arrived on
it (Path.credit), so no one can make this node send more to an address than
that address sent (docs/security.md "Reflection").

Sessions: a datagram for this node is accepted only from a session proven
live after this node started, by the answer to a challenge (Peer.verified,
docs/protocol.md §5), and only if it was sealed after that answer. So a
restart keeps no replay state and still admits no replay, and a sender's new
session after a clock step is taken as soon as it answers.

Clocks: each answer also measures how far the peer's clock is from ours
(measure_offset), and a verified session's datagrams are judged by its own
clock, so two peers need not agree on the time (docs/protocol.md §5 "Clock
offsets").
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from .constants import (MAX_PATHS_PER_PEER, MAX_SESSIONS_PER_PEER, MAX_WINDOWS_PER_PEER, PATH_LIFETIME,
                        PEER_LIFETIME, REPLAY_WINDOW, SEQ_LIMIT)
from .crypto import derive_pair_key, derive_psk_key, derive_shard_key
from .drops import DropReason
from .pmtu import PathMtu
from .replay import ReplayWindow

RELAY_KEY_CACHE = 4096
# Peer.replay keys besides the destination IDs of pairs this node relays
OWN_WINDOW = -1             # datagrams and shards for this node
MESSAGE_WINDOW = -2         # messages reassembled from shards: each delivered once
CHALLENGE_WINDOW = -3       # challenges: each answered once
CREDIT_LIMIT = 1 << 20      # bytes an unproven path may bank
CHALLENGE_LIFETIME = 10.0   # an answer later than this proves nothing
OLD_FLOORS = 64             # floors of sessions gone from relay windows, kept per peer
PROBE_HISTORY = 16          # outcomes of the latest challenges kept per way to a peer
PROBE_TIMEOUT = 2.0         # a way whose challenge is unanswered this long does not deliver
DELIVERS_WITHIN = 12.0      # ... and one answered this recently does (3 keepalive intervals)
MAX_PROBED = 16             # ways to a peer whose probes are kept
CLOCK_NOTICE = 30.0         # a peer's clock further off than this is logged (once per session)
CLOCK_MOVED = 2             # seconds a verified session's challenge may stray from its measured clock

Addr = tuple  # (host, port); alpaca/host/udp.py turns IPv6 socket addresses into this form


def measure_offset(ts: int, sent: float, received: float, at_least: float | None = None) -> float:
    """Seconds the peer's clock is ahead of ours, from its answer stamped
    with second `ts` to our challenge sent at `sent` and answered by
    `received` (our clock). The answer was sealed in between, so the truth
    lies in [ts - received, ts + 1 - sent]; this is the point of that
    interval nearest to 0: 0 when the clocks agree within the round trip.
    `at_least`: what the session's own earlier datagrams showed
    (Peer.clock_floor). An answer dated behind it contradicts its session
    (whose clock never goes back, §4): the session keeps the later clock,
    so it cannot date its answer back to reopen seconds it has left."""
    low, high = ts - received, ts + 1 - sent
    if at_least is not None and at_least > low:
        low = at_least
        if low > high:
            return low
    return low if low > 0 else high if high < 0 else 0.0


def addr_family(addr: Addr) -> str:
    """The underlay address family of a path: "ipv6" or "ipv4"."""
    return "ipv6" if ":" in addr[0] else "ipv4"


def addr_text(addr: Addr) -> str:
    """host:port, an IPv6 host in brackets ([2001:db8::1]:1040)."""
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


@dataclass(slots=True)
class Path:
    addr: Addr
    relayed: bool
    static: bool = False
    last_rx: float = -math.inf
    proven: bool = False        # a challenge sent on it was answered (static paths: configured)
    credit: int = 0             # bytes it may still carry while not proven

    def __post_init__(self):
        self.proven = self.proven or self.static


@dataclass(slots=True)
class Probe:
    """What the challenges sent on one of our ways to a peer found: the
    round trip (challenge out this way, its answer back on any path) works
    or not. Each challenge is one probe; a way to a gateway or forwarder is
    probed every keepalive, so even a silent client sees whether its path
    through each forwarder delivers (docs/operations.md "status")."""
    last_sent: float = -math.inf
    last_answer: float = -math.inf
    unanswered_since: float | None = None    # the oldest probe sent since the last answer
    outcomes: int = 0                         # bit i: the (i+1)-th latest probe was answered
    count: int = 0                            # outcomes kept (<= PROBE_HISTORY)
    mtu: PathMtu = field(default_factory=PathMtu)   # the largest datagram this way carries

    def sent(self, now: float) -> None:
        self.last_sent = now
        if self.unanswered_since is None:
            self.unanswered_since = now

    def record(self, answered: bool, now: float) -> None:
        self.outcomes = ((self.outcomes << 1) | answered) & ((1 << PROBE_HISTORY) - 1)
        self.count = min(self.count + 1, PROBE_HISTORY)
        if answered:
            self.last_answer = now
            self.unanswered_since = None

    def loss(self) -> float | None:
        """Probes lost of the latest PROBE_HISTORY (None before the first outcome)."""
        return None if not self.count else 1 - bin(self.outcomes).count("1") / self.count

    def delivers(self, now: float) -> bool | None:
        """True: answered lately; False: a probe waits in vain; None: not known yet."""
        if now - self.last_answer <= DELIVERS_WITHIN:
            return True
        if self.unanswered_since is not None and now - self.unanswered_since >= PROBE_TIMEOUT:
            return False
        return None


@dataclass(frozen=True)
class PeerEntry:
    """What secrets.txt says about a peer (the part the core needs)."""
    psk: str | None                 # None when this host never needs it (a smaller ID's key)
    static_addr: Addr | None = None     # the ip column (IPv4), resolved, with the port
    static_addr6: Addr | None = None    # the ip6 column, with the port

    @property
    def static_addrs(self) -> tuple[Addr, ...]:
        """Every configured address: a peer with both columns is two static
        paths, one per address family, used at once (multi-path)."""
        return tuple(a for a in (self.static_addr, self.static_addr6) if a is not None)


class Peer:
    __slots__ = ("id", "entry", "psk_key", "paths", "last_rx", "up", "rx_packets", "rx_bytes",
                 "tx_packets", "tx_bytes", "relayed_packets", "drops", "replay", "replay_floor", "relay_windows",
                 "verified", "clock_offset", "clock_seen", "challenges", "next_challenge", "responses", "old_floors", "probes",
                 "limited", "sent_big", "aes")

    def __init__(self, peer_id: int, entry: PeerEntry, now: float):
        self.id = peer_id
        self.entry = entry
        self.psk_key = derive_psk_key(entry.psk) if entry.psk is not None else None
        self.paths: dict[Addr, Path] = {}
        for addr in entry.static_addrs:
            self.paths[addr] = Path(addr, relayed=False, static=True)
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
        # sessions proven live: session -> [ts, seq, when, clock offset (whole
        # seconds), clock noticed]; only datagrams sealed after (ts, seq) are
        # accepted for this node (oldest evicted), judged by the session's clock
        self.verified: collections.OrderedDict[bytes, list] = collections.OrderedDict()
        self.clock_offset: float | None = None    # the latest measure_offset; None before an answer
        # (session, ts - our time, our time) of the latest authenticated
        # challenge or unverified datagram: how far ahead its clock is at least
        self.clock_seen: tuple[bytes, float, float] | None = None
        # challenges outstanding: nonce -> (when sent, address, relayed, probed, size probed or 0)
        self.challenges: collections.OrderedDict[bytes, tuple] = collections.OrderedDict()
        # our ways to the peer (its paths, or forwarders) -> what challenges on them found
        self.probes: dict[Addr, Probe] = {}
        self.limited = False        # a way to the peer carries less than full-size datagrams
        self.sent_big = -math.inf   # when it was last sent a message a path MTU could stop
        self.aes = False            # its latest answer to our challenge said it opens AES-256-GCM
        self.next_challenge = -math.inf
        self.responses = [0.0, 0]      # [second, responses sent in it]: answers are rate-limited
        # (window, session) -> newest second forgotten, for sessions gone from
        # a window other than the own one (whose floors follow `verified`):
        # a relay whose clock jumps ahead and back never relays them again
        self.old_floors: collections.OrderedDict[tuple[int, bytes], int] = collections.OrderedDict()

    def verify(self, session: bytes, ts: int, seq: int, now: float, offset: float = 0.0) -> bool:
        """`session` answered a challenge with (ts, seq), its clock `offset`
        seconds ahead of ours (measure_offset): accept what it seals after,
        judged by its clock. A session verified before keeps its floor and
        takes the new offset (its clock may have been set since). True when
        its clock is first found more than CLOCK_NOTICE off."""
        self.clock_offset = offset
        entry = self.verified.get(session)
        if entry is None:
            if len(self.verified) >= MAX_SESSIONS_PER_PEER:
                self.verified.popitem(last=False)
            entry = self.verified[session] = [ts, seq, now, 0, False]
        entry[3] = round(offset)
        if abs(offset) > CLOCK_NOTICE and not entry[4]:
            entry[4] = True
            return True
        return False

    def saw_clock(self, session: bytes, ts: int, now: float) -> None:
        """An authenticated datagram of `session` stamped `ts` arrived at
        `now`: sealed before, so the session's clock is at least ts - now
        ahead of ours. A replay only shows less: the highest is kept."""
        seen = self.clock_seen
        if seen is not None and seen[0] == session and now - seen[2] <= CHALLENGE_LIFETIME:
            if ts - now <= seen[1]:
                return
        self.clock_seen = (session, ts - now, now)

    def clock_floor(self, session: bytes, now: float) -> float | None:
        """The least offset `session` has shown within CHALLENGE_LIFETIME
        (our clock may have been set before that): for measure_offset."""
        seen = self.clock_seen
        if seen is None or seen[0] != session or now - seen[2] > CHALLENGE_LIFETIME:
            return None
        return seen[1]

    def clock_moved(self, session: bytes, ts: int, now: float) -> bool:
        """A verified session stamped `ts` more than CLOCK_MOVED off the
        clock it was measured to have: it was set since (a device without a
        real-time clock that gets its time through the tunnel), so measure
        it again before its datagrams leave the window."""
        entry = self.verified.get(session)
        return entry is not None and abs(ts - int(now) - entry[3]) > CLOCK_MOVED

    def check_own(self, session: bytes, ts: int, seq: int, now: float) -> DropReason | None:
        """The replay check of a datagram for this node: a verified session,
        sealed after its answer, and new in the window around its clock."""
        floor = self.verified.get(session)
        if floor is None:
            return DropReason.UNVERIFIED
        if ts < floor[0] or (ts == floor[0] and seq <= floor[1]):
            return DropReason.REPLAY
        return self.check_replay(OWN_WINDOW, session, ts, seq, now, offset=floor[3])

    def session_offset(self, dst: int, session: bytes, ts: int, now: float) -> int:
        """Whole seconds the clock of `session` is ahead of ours, for the
        window of dst: as measured when it answered us (0 when it never did:
        our clock). Challenges (their sessions are not proven yet) follow
        the peer's clock as its latest answer measured it; the first
        challenge of a peer never measured sets its session's offset. A
        later one ahead of the window moves it on, never back, so each
        challenge is answered once whatever the two clocks say, and an old
        one replayed in a session forgotten since is refused."""
        entry = self.verified.get(session)
        if dst != CHALLENGE_WINDOW:
            return 0 if entry is None else entry[3]
        window = self.replay.get(dst)
        offset = window.offsets.get(session) if window is not None else None
        if offset is None:
            offset = entry[3] if entry is not None else \
                ts - int(now) if self.clock_offset is None else round(self.clock_offset)
        return max(offset, ts - int(now)) if ts - int(now) - offset > REPLAY_WINDOW else offset

    def check_replay(self, dst: int, session: bytes, ts: int, seq: int, now: float,
                     charged: Peer | None = None, offset: int | None = None) -> DropReason | None:
        """The window of traffic from this peer to dst (OWN_WINDOW: to this node).
        `charged`: None for the window of traffic to this node; for a pair
        it only relays, the peer a new window counts against (the bigger ID).
        A relay window refuses what was sealed before the peer entered the
        table (a relay keeps no state across restarts either), by the
        session's clock (session_offset; `offset` when the caller knows it)."""
        if offset is None:
            offset = self.session_offset(dst, session, ts, now)
        if dst >= 0 and ts < self.replay_floor + offset:     # (a relay window: not one of this node's own)
            return DropReason.REPLAY
        if dst != OWN_WINDOW and ts <= self.old_floors.get((dst, session), -1):
            return DropReason.REPLAY
        window = self.replay.get(dst)
        if window is None:
            if seq >= SEQ_LIMIT or abs(ts - int(now) - offset) > REPLAY_WINDOW:
                return DropReason.REPLAY        # what the window would say: never open one for it
            if charged is not None:
                if charged.relay_windows >= MAX_WINDOWS_PER_PEER:
                    return DropReason.TOO_MANY_SESSIONS     # a slot frees when a window expires
                charged.relay_windows += 1
            # every window keeps a session's floor when the session's last
            # second goes, so a clock that steps back never reopens seconds it
            # forgot; prune drops the own window's with the verified session
            # and moves the others' to old_floors (bounded)
            window = self.replay[dst] = ReplayWindow(charged, keep_floors=True)
        return window.check_and_accept(session, ts, seq, now, offset)

    @property
    def static_addr(self) -> Addr | None:
        return self.entry.static_addr

    def heard(self, addr: Addr, relayed: bool, now: float, size: int = 0) -> Path | None:
        """Record an authenticated datagram of `size` bytes from addr; the
        path when it is new (not yet proven), else None."""
        self.last_rx = now
        path = self.paths.get(addr)
        if path is not None:
            path.last_rx = now
            if not path.static:
                path.relayed = relayed
            if not path.proven:
                path.credit = min(path.credit + size, CREDIT_LIMIT)
            return None
        self._make_room()
        path = self.paths[addr] = Path(addr, relayed, last_rx=now, credit=min(size, CREDIT_LIMIT))
        return path

    def _make_room(self) -> None:
        """Before a new path: at MAX_PATHS_PER_PEER the oldest learned one goes, unproven ones first."""
        if len(self.paths) >= MAX_PATHS_PER_PEER:
            learned = [p for p in self.paths.values() if not p.static]
            del self.paths[min(learned, key=lambda p: (p.proven, p.last_rx)).addr]

    def prove(self, addr: Addr, relayed: bool, now: float) -> bool:
        """A challenge sent to addr came back answered: it reaches the peer.
        True when that changed something."""
        path = self.paths.get(addr)
        if path is None:
            self._make_room()
            self.paths[addr] = Path(addr, relayed, last_rx=now, proven=True)
            return True
        changed = not path.proven
        path.proven = True
        return changed

    def sendable(self, targets: list[Addr], size: int) -> list[Addr]:
        """The targets a datagram of `size` bytes may go to: proven paths, and
        unproven ones while their credit lasts (it is spent here)."""
        paths = self.paths
        out = []
        for addr in targets:
            path = paths.get(addr)
            if path is None or path.proven:
                out.append(addr)         # (not a path of this peer: a forwarder's, checked as its own)
            elif path.credit >= size:
                path.credit -= size
                out.append(addr)
        return out

    def unlimited(self, targets: list[Addr]) -> bool:
        """Would sendable pass every target, whatever the size (no credit to spend)?"""
        paths = self.paths
        return all((path := paths.get(addr)) is None or path.proven for addr in targets)

    def heard_within(self, targets: list[Addr], now: float, within: float) -> list[Addr]:
        """The targets that are paths of this peer and carried something from it within `within`."""
        paths = self.paths
        return [a for a in targets if (p := paths.get(a)) is not None and now - p.last_rx <= within]

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
            window = self.replay[dst]
            window.expire(now)
            for session in [s for s in window.floors if s not in window.sessions or dst == OWN_WINDOW]:
                if dst == OWN_WINDOW:
                    if session not in self.verified:
                        del window.floors[session]
                    continue
                self.old_floors.pop((dst, session), None)
                self.old_floors[(dst, session)] = window.floors.pop(session)
                if len(self.old_floors) > OLD_FLOORS:
                    self.old_floors.popitem(last=False)
            if not window.sessions and not window.floors:
                self.release_window(dst)
        for nonce in [n for n, c in self.challenges.items() if now - c[0] > CHALLENGE_LIFETIME]:
            self.challenge_done(nonce, False, now)
        for addr in [a for a, p in self.probes.items() if now - p.last_sent > PEER_LIFETIME]:
            del self.probes[addr]
        self.note_limits()

    def note_limits(self) -> None:
        """Whether any way to the peer carries less than full-size datagrams
        (kept, so the send path asks datagram_limit only then)."""
        self.limited = any(p.mtu.limit for p in self.probes.values())

    def challenge_sent(self, nonce: bytes, target: Addr, relayed: bool, probed: bool, now: float,
                       size: int = 0) -> None:
        """A challenge went to target; probed: target is one of our ways to
        the peer (not only the source of a datagram), so its outcome counts.
        size: a padded challenge probing the way's MTU (its outcome counts
        there, not in the way's probe loss)."""
        if len(self.challenges) >= 16:
            self.challenge_done(next(iter(self.challenges)), False, now)
        self.challenges[nonce] = (now, target, relayed, probed, size)
        if probed:
            self.probe_of(target).sent(now)

    def probe_of(self, target: Addr) -> Probe:
        probe = self.probes.get(target)
        if probe is None:
            if len(self.probes) >= MAX_PROBED:
                del self.probes[min(self.probes, key=lambda a: self.probes[a].last_sent)]
            probe = self.probes[target] = Probe()
        return probe

    def datagram_limit(self, targets: list[Addr], full: int) -> int:
        """The largest datagram all of `targets` carry (path MTU probes)."""
        if not self.limited:
            return full
        limits = [p.mtu.limit for p in map(self.probes.get, targets) if p is not None and p.mtu.limit]
        return min(limits + [full])

    def challenge_done(self, nonce: bytes, answered: bool, now: float) -> tuple | None:
        """The challenge was answered, or is given up: (when, target, relayed,
        probed, size), None when it was not outstanding."""
        challenge = self.challenges.pop(nonce, None)
        if challenge is not None and (challenge[3] or challenge[4]):
            probe = self.probes.get(challenge[1])
            if probe is not None and challenge[3]:
                probe.record(answered, now)
            elif probe is not None and answered:
                probe.mtu.answer(challenge[4])
        return challenge

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
        self._shard_keys: dict[bytes, bytes] = {}      # pair key -> shard MAC key

    def shard_key(self, pair_key: bytes) -> bytes:
        key = self._shard_keys.get(pair_key)
        if key is None:
            if len(self._shard_keys) >= 2 * RELAY_KEY_CACHE:
                self._shard_keys.clear()
            key = self._shard_keys[pair_key] = derive_shard_key(pair_key)
        return key

    def get(self, peer_id: int) -> Peer | None:
        return self.peers.get(peer_id)

    def pair_key(self, a: int, b: int) -> bytes | None:
        """Key for traffic between a and b: from the bigger ID's pre-shared key (docs/protocol.md §3).
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
