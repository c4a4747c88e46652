"""Fuzz the whole receive path of the protocol core (Node.from_udp) with real keys.

The invariant (docs/fuzzing.md), checked for every input:

    every input is either a valid packet (delivered once, relayed once, a
    shard held for its message, a keepalive, loss report or answer consumed,
    a challenge answered) or exactly one counted drop; no exception escapes,
    and unauthenticated input changes no per-peer state.

A small mesh of real Node objects runs on one simulated clock: a gateway 1.1
(server), a relay 1.2 (forwarder, no TUN) and two clients 16.1/16.2 (gateway
1.1, forwarder 1.2) with keys from crypto.genkey. The same nodes seal real
traffic (from_tun, tick) and receive the inputs; 16.1 sends with a fixed FEC
ratio, so its packets travel as shard datagrams (docs/protocol.md §12) that
1.2 relays and 1.1 reassembles. Each input belongs to one family (FAMILIES,
fixed shares per block of 100 inputs) and goes to one node.

Sessions are proven the real way, by challenge and answer (docs/protocol.md
§5), not trusted with the tests' shortcut (protocol_helpers.trust, which
calls peer.verify(session, 0, -1, start)): the fuzz is about the whole
receive path, and every datagram for a node goes through the session check,
challenges and answers skip the replay window and are answered or matched
instead, and a session verified by anything but the answer to a challenge
the node sent would be exactly the kind of bug to find. So the nodes start
knowing no session; the warm-up runs the first handshakes through the same
harness (with the same checks), and the oracle keeps its own account of the
sessions each node has verified, from the answers it saw matched.

The oracle knows every datagram a node ever sealed (bytes from offset 2 on,
since bytes 0-1 are the only ones a relay may change), the inner packet of
each message (a whole datagram's, or that of the message a shard belongs
to), the nonce of each challenge and answer, and, per receiving node, which
nonce identities (src, dst, session, ts, seq) it has accepted, which
messages it has delivered, and which sessions it has verified with the
(ts, seq) of their answer. From that it predicts each input's class and
checks the outcome:

  unauth   bytes no real sender sealed (or a real datagram the receiver holds
           no key for, or its own datagram reflected back): exactly one
           global drop (malformed / wrong_version / unknown_peer /
           auth_failure), no output, and the state fingerprint is unchanged.
           Shards included: a shard's MAC is checked before anything.
  unverified  a real datagram for us (not a challenge or an answer) in a
           session this node has not verified: one `unverified` drop; no
           output but one round of challenges to its source, at most every
           CHALLENGE_INTERVAL; nothing else changes.
  challenge  a real challenge for us: the first copy, inside the node's
           clock window and within RESPONSE_LIMIT a second per peer, is
           answered on our paths to its sender and, when the answer is no
           bigger, on the address it came from; nothing learned, no drop.
           A copy is one `duplicate` drop, a stale one one `replay`, one over
           the limit one `rate_limited`, each with no output.
  response  a real answer for us: consumed when it answers a challenge this
           node has outstanding (a nonce it sent that peer and that was not
           answered yet): the session is verified from the answer's (ts, seq)
           on, the address the challenge went to is proven and the one the
           answer came from learned. Otherwise exactly one drop, `duplicate`
           from a session verified (another copy of an answer taken), else
           `replay`, and nothing else changes.
  dup      a real datagram whose identity this node already accepted: exactly
           one duplicate/replay drop on the source peer (at a relay, ttl or
           no_path come first: what cannot be relayed never reaches the
           window), no output; nothing else changes but the last_rx of an
           existing path (a duplicate addressed to us refreshes it).
  stale    a real datagram this node has not accepted, outside the window,
           sealed before the relay's peer entered its table, or (for us)
           sealed at or before the answer that verified its session: exactly
           one replay drop (at a relay as for dup), no output.
  fresh    a real datagram this node has not accepted: accepted once, then
           delivered (the TUN packets are byte-identical to the inner
           packets the sender sealed; a message at most once), held (a shard
           filed for its message, or one more of a message decoded),
           consumed (a keepalive or loss report for us), relayed (every send
           is the same datagram from byte 2 on, TTL-1, path relayed, never
           back to where it came from), or dropped with exactly the reason
           the rules give (no_tun, ttl, no_path, loop; a relay's ttl and
           no_path drops leave the identity unaccepted). For us, the only
           other output is a round of challenges (a new or unproven path)
           and, when a shard completes the first tally for its source, one
           loss report to it (sent at once, not on the next report tick).

usage: scripts/fuzz.py [--inputs N] [--seed S] [--engine random|atheris]
"""

from __future__ import annotations

import argparse
import base64
import collections
import ipaddress
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from unittest import mock

import protocol_helpers as ph  # tests/protocol_helpers.py, beside this file

from alpaca.protocol import crypto, fec, wire
from alpaca.protocol.constants import (DEFAULT_TTL, FLAG_AES, FLAG_FRAG, KIND_CHALLENGE, KIND_DATA, KIND_KEEPALIVE,
                                       KIND_REPORT, KIND_RESPONSE, MAX_TTL, MIN_DATAGRAM, PATH_RELAYED,
                                       REPLAY_WINDOW, SEQ_LIMIT, TAG_SIZE)
from alpaca.protocol.drops import DropReason
from alpaca.protocol.constants import CHALLENGE_INTERVAL, RESPONSE_LIMIT, VERSION_NOTICE_INTERVAL
from alpaca.protocol.node import Node, NodeSettings
from alpaca.protocol.peers import CHALLENGE_WINDOW, PeerEntry  # (challenge state: compared with it)
from alpaca.protocol.replay import PAGE_SEQS, PAGE_SHIFT
from alpaca.protocol.wire import CLEAR, MUTABLE_BYTES, SUB, SUB_BITS, Header

# ---------------------------------------------------------------- the mesh

GROUP = "fuzz-mesh"
OTHER_GROUP = "fuzz-mesh-other"
NAMES = ("1.1", "1.2", "16.1", "16.2")
SERVERS = ("1.1", "1.2")
ADDR = {n: ph.addr(n) for n in NAMES}                  # ("192.0.2.X", 1040)
BY_ADDR = {a: n for n, a in ADDR.items()}
# each node's clock runs off the harness clock by a fixed amount; any two stay
# well inside REPLAY_WINDOW of each other (docs/protocol.md §5 clock requirement)
OFFSET = {"1.1": 0.0, "1.2": 0.7, "16.1": -1.3, "16.2": 1.9}
T0 = ph.T0
START = T0 - 10                                         # nodes start 10 s before traffic
STEP = 0.001                                            # simulated seconds per input
TICK_EVERY = 100                                        # inputs between tick() calls
# inputs between two packets a node reads from its TUN, besides those made
# when the wire runs empty: challenges and their answers (each answer goes to
# every path of the peer, docs/protocol.md §5, and a replayed challenge is
# answered anew) keep the wire busy, and the run needs data too
ORIGINATE_EVERY = 20
WIRE_LIMIT = 256       # datagrams in flight; beyond it the oldest is lost (a full queue)
PRUNE_EVERY = 20_000                                    # inputs between oracle prunes
KEEP_SEALED = 30.0                                      # s an unreferenced sealed datagram is kept
HISTORY = 2048                                          # recent real datagrams to mutate/replay
FEC_RATIO = (2, 1)                                      # 16.1's fixed FEC ratio: every packet as shards

# (name, share per 100 inputs)
FAMILIES = (
    ("random", 8),       # random bytes, random length 0..2000
    ("real", 18),        # real datagrams in flight, to their real target (the mesh runs)
    ("bitflip", 14),     # a real datagram with 1..8 random bit flips
    ("truncate", 8),     # a real datagram cut short (prefix or suffix)
    ("extend", 6),       # a real datagram with random bytes appended
    ("oversized", 4),    # 2001..65535 bytes: random, or a real datagram padded out
    ("wrong_group", 7),  # sealed under another group's key (whole, or just the mask)
    ("wrong_key", 7),    # right group, right header, pair key from a key string not in secrets (or shards)
    ("bad_body", 8),     # a correctly masked valid header (or shard header) over a random body
    ("replay", 8),       # exact replay of a datagram the receiver already accepted
    ("elsewhere", 8),    # a real datagram arriving from another source address
    ("session", 4),      # a member's datagram in a session never proven (a restart, a forgery)
)
OUTCOMES = ("delivered", "held", "relayed", "consumed", "answered", "dropped")
UNAUTH_REASONS = (DropReason.MALFORMED, DropReason.WRONG_VERSION, DropReason.UNKNOWN_PEER,
                  DropReason.AUTH_FAILURE, DropReason.AEAD_UNSUPPORTED)
CHALLENGE_KINDS = (KIND_CHALLENGE, KIND_RESPONSE)
OTHER_SOURCES = [("198.51.100.7", 1040), ("198.51.100.8", 51000), ("203.0.113.9", 5555),
                 ("2001:db8::9", 1040), ("2001:db8::a", 1040, 0, 0), ("0.0.0.0", 0),
                 ("192.0.2.200", 65535)]
INTERNET = ("8.8.8.8", "203.0.113.7", "192.0.2.1")      # 192.0.2.1: the gateway's own address (loop)


class Violation(Exception):
    """The invariant failed for one input."""


@dataclass(slots=True)
class Sealed:
    """One datagram a real node sealed (or the harness, as a member, for the
    `session` family)."""
    src: int
    dst: int
    kind: int
    ident: tuple           # (src, dst, session, ts, seq): the nonce, unique per pair key
    inner: bytes           # what the receiver must write to its TUN (empty but for whole data datagrams)
    sealed_at: float       # harness clock
    message: tuple | None = None   # a shard: (src, dst, session, ts, message seq)
    index: int = 0                 # ... and its index in the message
    nonce: bytes = b""             # a challenge or an answer: its 16 bytes


def _seeded_genkey(rng: random.Random) -> str:
    """crypto.genkey itself, fed from the seeded RNG so a seed reproduces the run."""
    with mock.patch.object(crypto.os, "urandom", rng.randbytes):
        return crypto.genkey()


def secrets_of(name: str, keys: dict[str, str]) -> dict[int, PeerEntry]:
    """secrets.txt as each node sees it: servers hold every key (they relay
    for the clients); a client holds its own key and null for everyone else."""
    out = {}
    for n in NAMES:
        static = ADDR[n] if n in SERVERS else None
        key = keys[n] if (name in SERVERS or n == name) else None
        out[ph.pid(n)] = PeerEntry(key, static)
    return out


def settings_of(name: str) -> NodeSettings:
    # FEC off but for 16.1's fixed ratio: under fec.AUTO the loss the fuzz's
    # own garbage and replays cause would move the parity from one run to the
    # next; a fixed ratio sends every packet of 16.1 that fits a datagram as
    # a FEC batch of one packet, k data shards and m parity shards
    common = {"my_id": ph.pid(name), "net": ph.NET, "group": GROUP, "fec": None,
              # 1.1 and 16.1 seal their data to each other with AES-256-GCM
              # (where the CPU has it); the others keep XChaCha20-Poly1305
              "aes": name in ("1.1", "16.1") and crypto.aes_available()}
    if name == "1.1":
        # the clients' IPv6 packets come from a network of their own (their
        # tunnel addresses are IPv4): configured, as peers.<id>.networks
        networks = {ph.pid(c): (ipaddress.ip_network(f"fd00::{c.replace('.', ':')}/128"),) for c in ("16.1", "16.2")}
        return NodeSettings(mode="server", inactive_downward_static=True, peer_networks=networks, **common)
    if name == "1.2":
        return NodeSettings(mode="forwarder", **common)
    extra = {"duplicate": 1, "duplicate_delay": 0.01, "padding": 200} if name == "16.2" else {}
    if name == "16.1":
        common["fec"] = FEC_RATIO
    return NodeSettings(mode="client", gateway=ph.pid("1.1"), forwarders=(ph.pid("1.2"),), **common, **extra)


def pairs_with_key(entries: dict[int, PeerEntry]) -> frozenset:
    """(lo, hi) pairs a node can derive a key for: both listed, the bigger's key not null."""
    ids = sorted(entries)
    return frozenset((lo, hi) for i, lo in enumerate(ids) for hi in ids[i + 1:]
                     if entries[hi].psk is not None)


def mask_of(group_key: bytes, body: bytes) -> int:
    """The whole 32-byte mask of a datagram ending in `body` (its last 16 bytes)."""
    h = crypto.mask_state(group_key).copy()
    h.update(body[-wire.SAMPLE:])
    return int.from_bytes(h.digest(), "big")


def in_window(peer, dst: int, session: bytes, ts: int, seq: int) -> bool:
    """Does the peer's window of traffic to dst hold (session, ts, seq)?"""
    window = peer.replay.get(dst)
    second = window.sessions.get(session, {}).get(ts) if window is not None else None
    if second is None:
        return False
    page = second if not isinstance(second, dict) else second.get(seq >> PAGE_SHIFT)
    if not isinstance(second, dict) and seq >> PAGE_SHIFT:
        page = None
    index = (seq & (PAGE_SEQS - 1)) >> 3
    return page is not None and index < len(page) and bool(page[index] >> (seq & 7) & 1)


def holds(node: Node, key: tuple, index: int) -> bool:
    """Is shard `index` of the message `key` (src, session, ts, seq) filed or
    counted (a surplus shard of a message decoded)?"""
    slot = node.reassembly.slots.get(key)
    if slot is not None:
        return index in slot.chunks
    seen = node.reassembly.done.get(key)
    return seen is not None and bool(seen[0] >> index & 1)


# ---------------------------------------------------------------- sources of choices

class RandomSource:
    """Choices from a seeded random.Random (the required engine)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:       # inclusive
        return lo + int(self.rng.random() * (hi - lo + 1))

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def choice(self, seq):
        return seq[int(self.rng.random() * len(seq))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


class FdpSource:
    """Choices from atheris' FuzzedDataProvider (coverage-guided engine)."""

    def __init__(self, fdp):
        self.fdp = fdp

    def int(self, lo: int, hi: int) -> int:
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bytes(self, n: int) -> bytes:
        b = self.fdp.ConsumeBytes(n)
        return b + bytes(n - len(b))

    def choice(self, seq):
        return seq[self.fdp.ConsumeIntInRange(0, len(seq) - 1)]

    def chance(self, p: float) -> bool:
        return self.fdp.ConsumeProbability() < p


# ---------------------------------------------------------------- state fingerprint
#
# A mask says what one input may change besides what is compared:
#   (peer_id, addr, loose): that peer's drops; the last_rx of its path at addr
#   (None: no path); and, when loose, the peer's challenge state (outstanding
#   challenges, the rate limits of challenges and answers) and the node's
#   (ts, seq) (a challenge or an answer was sealed).

# notices that unauthenticated input may cause, at most one a minute each
# whatever sent it (checked on their own in Harness.feed): their marker and
# the drop that must come with one
RATE_LIMITED_NOTICES = (("wire version", DropReason.WRONG_VERSION),
                        ("datagrams sealed with AES-256-GCM", DropReason.AEAD_UNSUPPORTED))


def _notices(node: Node) -> int:
    """Notices besides the rate-limited ones about unauthenticated input."""
    return sum(not any(marker in line for marker, _ in RATE_LIMITED_NOTICES) for line in node.notices)


def _challenge_state(p) -> tuple:
    w = p.replay.get(CHALLENGE_WINDOW)
    seen = None if w is None else tuple((s, ts, n, bytes(b)) for s, ts, n, b in w.bitmaps())
    return (tuple(p.challenges), p.next_challenge, tuple(p.responses), seen)


def _node_extras(node: Node) -> tuple:
    """What the node keeps besides its peers: reassembly and loss counts
    (only authenticated shards and datagrams may reach either)."""
    r = node.reassembly
    return (tuple((k, tuple(s.chunks), s.held) for k, s in r.slots.items()),
            tuple((k, seen[0]) for k, seen in r.done.items()),
            tuple((k, tuple(v)) for k, v in node.loss.tally.items()), r.bytes, len(r.expired),
            tuple((p, tuple(c.items())) for p, c in node.loss.arrived.items()))


def fingerprint(node: Node, mask: tuple | None = None) -> tuple:
    """The fields of protocol_helpers.peer_state (per-peer paths, last_rx, up,
    counters, drops, replay windows and floors; the node's session, sequence,
    notices and timers), plus what the challenges and the shard layer keep
    (verified sessions, outstanding challenges, proven paths and their
    credit, reassembly, loss counts), built without deepcopy so it can run on
    every input."""
    peers = []
    loose = False
    for peer_id, p in node.table.peers.items():
        masked = mask is not None and peer_id == mask[0]
        loose = loose or (masked and mask[2])
        peers.append((
            peer_id,
            tuple((a, x.relayed, x.static, None if masked and a == mask[1] else x.last_rx, x.proven, x.credit)
                  for a, x in p.paths.items()),
            p.last_rx, p.up, p.rx_packets, p.rx_bytes, p.tx_packets, p.tx_bytes, p.relayed_packets,
            None if masked else dict(p.drops),
            p.replay_floor, p.relay_windows,
            tuple((dst, tuple(sorted(w.floors.items())), tuple((s, ts, n, bytes(b)) for s, ts, n, b in w.bitmaps()))
                  for dst, w in p.replay.items() if dst != CHALLENGE_WINDOW),
            tuple((s, tuple(v)) for s, v in p.verified.items()),
            None if masked and mask[2] else _challenge_state(p),
        ))
    stamp = None if loose else (node._ts, node._seq)
    return (tuple(peers), node.session, stamp, _notices(node), len(node._timers), _node_extras(node))


def helpers_fingerprint(node: Node, mask: tuple | None = None) -> object:
    """protocol_helpers.peer_state itself (slower: deep copies), with the same
    mask, plus the state it does not cover (the same as in fingerprint)."""
    state = ph.peer_state(node)
    loose = mask is not None and mask[2]
    for peer_id, p in node.table.peers.items():
        s = state[peer_id]
        s["proven"] = {a: (x.proven, x.credit) for a, x in p.paths.items()}
        s["verified"] = {k: tuple(v) for k, v in p.verified.items()}
        s["floors"] = {dst: dict(w.floors) for dst, w in p.replay.items() if dst != CHALLENGE_WINDOW}
        windows, floor = s["replay"]
        s["replay"] = ({dst: w for dst, w in windows.items() if dst != CHALLENGE_WINDOW}, floor)
        s["relay_windows"] = p.relay_windows
        s["challenges"] = _challenge_state(p)
    if mask is not None and mask[0] in state:
        s = state[mask[0]]
        s["drops"] = None
        if mask[1] in s["paths"]:
            s["paths"][mask[1]] = s["paths"][mask[1]][:3]
        if loose:
            s["challenges"] = None
    session, ts, seq, notices, timers = state["node"]
    state["node"] = (session, None if loose else (ts, seq), _notices(node), timers, _node_extras(node))
    return state


# ---------------------------------------------------------------- the harness

class Harness:
    def __init__(self, seed: int = 1, fingerprint=fingerprint, check_every_state: bool = True):
        self.seed = seed
        self.rng = random.Random(seed)
        self._node_rng = random.Random(seed * 7919 + 17)   # sessions, keys and nonces
        self.fingerprint = fingerprint
        self.check_state = check_every_state
        self.keys = {n: _seeded_genkey(self._node_rng) for n in NAMES}
        self.entries = {n: secrets_of(n, self.keys) for n in NAMES}
        self.pairs = {n: pairs_with_key(self.entries[n]) for n in NAMES}
        self.nodes = {n: Node(settings_of(n), self.entries[n], START + OFFSET[n],
                              random_bytes=self._node_rng.randbytes) for n in NAMES}
        # Peer.replay_floor: a relay window takes nothing stamped before the start second
        self.floor = {n: int(START + OFFSET[n]) + 1 for n in NAMES}
        self.group_key = crypto.derive_group_key(GROUP)
        self.other_group_key = crypto.derive_group_key(OTHER_GROUP)
        self.psk_keys = {n: crypto.derive_psk_key(k) for n, k in self.keys.items()}
        self._pair_keys: dict[tuple[int, int], bytes] = {}
        self.max_chunk = self.nodes["1.1"].max_chunk
        self.now = T0
        self.index = 0
        # the oracle
        self.sealed: dict[bytes, Sealed] = {}           # datagram[2:] -> what was sealed
        self.idents: dict[tuple, bytes] = {}            # nonce identity -> datagram[2:]
        self.messages: dict[tuple, tuple] = {}          # message -> its inner packets
        self.accepted = {n: set() for n in NAMES}       # identities each node accepted
        self.delivered = {n: set() for n in NAMES}      # messages each node delivered (or counted no_tun)
        # sessions each node verified: (peer, session) -> (ts, seq) of the answer
        self.verified: dict[str, dict[tuple, tuple]] = {n: {} for n in NAMES}
        self.nonces: dict[str, dict[bytes, tuple]] = {n: {} for n in NAMES}  # challenges sent: nonce -> (peer, when)
        self.answered: dict[str, set] = {n: set() for n in NAMES}           # ... and answered
        self.challenged: dict[str, dict[bytes, tuple]] = {n: {} for n in NAMES}  # nonce -> address sent to
        self.rounds: dict[tuple, float] = {}            # (node, peer) -> when it last sent challenges
        self.answers: dict[tuple, list] = {}            # (node, peer) -> [second, answers sent in it]
        self.challenges_seen: dict[str, set] = {n: set() for n in NAMES}   # challenge idents taken in
        self.unanswered = 0                             # challenges past RESPONSE_LIMIT (consumed silently)
        self.last_notice: dict[tuple, float] = {}       # (node, marker) -> when it last gave that notice
        self.wire: collections.deque = collections.deque()   # (datagram, from, to) in flight
        self.history: list[tuple[bytes, tuple, tuple]] = []  # recent real datagrams
        self.accepted_ring: list[tuple[bytes, str, tuple]] = []  # (datagram, receiver, from)
        self._hist_i = self._acc_i = 0
        self._schedule: list[str] = []
        # figures
        self.family_counts: collections.Counter = collections.Counter()
        self.outcomes: collections.Counter = collections.Counter()      # (family, outcome)
        self.drop_hist: collections.Counter = collections.Counter()     # "global:malformed"
        self.classes: collections.Counter = collections.Counter()       # unauth / dup / fresh ...
        self.extra_loop = 0                            # loop drops beyond one per input
        self.sealed_count = 0
        self.lost = 0                                  # sent to an address no node owns
        self.overflow = 0                              # lost to a full wire (WIRE_LIMIT)
        self.last: tuple | None = None                 # the last input, for the reproducer

    # ------------------------------------------------------------ clocks and keys
    def clock(self, name: str) -> float:
        return self.now + OFFSET[name]

    def pair_key(self, a: int, b: int) -> bytes:
        lo, hi = min(a, b), max(a, b)
        key = self._pair_keys.get((lo, hi))
        if key is None:
            bigger = ph.format_id(hi)
            key = self._pair_keys[(lo, hi)] = crypto.derive_pair_key(self.group_key, self.psk_keys[bigger], lo, hi)
        return key

    # ------------------------------------------------------------ real traffic
    def _record(self, datagram: bytes, sender: str, inner: bytes | None) -> Sealed:
        tail = datagram[MUTABLE_BYTES:]
        rec = self.sealed.get(tail)
        if rec is not None:
            return rec                   # a delayed or multi-path copy: same bytes
        h, _, clear = wire.peek_shard(self.group_key, datagram)
        ident = (h.src, h.dst, h.session, h.ts, h.seq)
        if h.src != ph.pid(sender):
            raise Violation(f"{sender} sealed a datagram with src {h.src}")
        if ident in self.idents:
            old = self.sealed[self.idents[ident]]
            raise Violation(f"nonce reused by {sender}: {ident!r} kind {h.kind} flags {h.flags} len {len(datagram)}; "
                            f"before: kind {old.kind}")
        message, index, nonce = None, 0, b""
        if h.flags & FLAG_FRAG:
            # a shard: the oracle knows its message's packets (a FEC batch of
            # the one packet the harness gave the sender)
            if inner is None:
                raise Violation(f"{sender} sent a shard the harness never gave it a packet for: {datagram.hex()}")
            index = clear.index
            message = (h.src, h.dst, h.session, h.ts, h.seq - index)
            if self.messages.setdefault(message, (inner,)) != (inner,):
                raise Violation(f"{sender} sent shards of one message {message!r} for two packets")
            inner = b""
        elif h.kind in (KIND_KEEPALIVE, KIND_REPORT):
            inner = b""
        elif h.kind in CHALLENGE_KINDS:
            plaintext = wire.open_sealed(self.pair_key(h.src, h.dst), h, datagram)
            nonce, inner = plaintext[:len(plaintext) - h.pad], b""
            if h.kind == KIND_CHALLENGE:
                if nonce in self.nonces[sender]:
                    raise Violation(f"{sender} sent the same challenge nonce twice")
                self.nonces[sender][nonce] = (h.dst, self.now)
        elif inner is None:
            raise Violation(f"{sender} sent a data datagram the harness never gave it: {datagram.hex()}")
        rec = self.sealed[tail] = Sealed(h.src, h.dst, h.kind, ident, inner, self.now, message, index, nonce)
        self.idents[ident] = tail
        self.sealed_count += 1
        return rec

    def _push(self, sends, frm: tuple) -> None:
        for datagram, to in sends:
            self.wire.append((datagram, frm, to))
            self._remember(datagram, frm, to)
        while len(self.wire) > WIRE_LIMIT:
            self.wire.popleft()
            self.overflow += 1

    def _remember(self, datagram: bytes, frm: tuple, to: tuple) -> None:
        if len(self.history) < HISTORY:
            self.history.append((datagram, frm, to))
        else:
            self.history[self._hist_i] = (datagram, frm, to)
            self._hist_i = (self._hist_i + 1) % HISTORY

    def inner_packet(self, s, sender: str) -> bytes:
        """A real inner packet the sender's kernel could write to its TUN."""
        me = ph.tun_ip(sender)
        if sender == "1.1":               # a server: only tunnel destinations are routable
            dst = ph.tun_ip(s.choice(("1.2", "16.1", "16.2")))
        else:
            dst = s.choice(INTERNET + (ph.tun_ip("1.1"), ph.tun_ip("1.2"),
                                       ph.tun_ip("16.2" if sender == "16.1" else "16.1")))
        size = s.int(20000, 65000) if s.chance(0.005) else s.int(0, 1400)
        kind = s.int(0, 5)
        if kind == 0:
            return ph.tcp(me, dst, flags=s.choice((ph.SYN, ph.ACK, ph.SYN | ph.ACK)), data=s.bytes(size))
        if kind == 1:
            return ph.udp(me, dst, dport=53, data=s.bytes(min(size, 512)))
        if kind == 2 and sender != "1.1":
            return ph.udp6(f"fd00::{sender.replace('.', ':')}", "2001:db8::53", data=s.bytes(size))
        return ph.udp(me, dst, data=s.bytes(size))

    def originate(self, s, sender: str | None = None) -> None:
        sender = sender or s.choice(("16.1", "16.2", "1.1"))
        packet = self.inner_packet(s, sender)
        out = self.nodes[sender].from_tun([packet], self.clock(sender))
        for datagram, _ in out.sends:
            self._record(datagram, sender, packet)
        self._push(out.sends, ADDR[sender])

    def tick(self) -> None:
        for name, node in self.nodes.items():
            out = node.tick(self.clock(name))
            for datagram, to in out.sends:
                rec = self._record(datagram, name, None)
                if rec.kind == KIND_CHALLENGE:      # keepalive-time probes of its ways
                    self.challenged[name][rec.nonce] = to
            self._push(out.sends, ADDR[name])

    def prune(self) -> None:
        """Forget sealed datagrams nobody can send any more (keeps memory flat)."""
        keep = {d[MUTABLE_BYTES:] for d, _, _ in self.history}
        keep.update(d[MUTABLE_BYTES:] for d, _, _ in self.accepted_ring)
        keep.update(d[MUTABLE_BYTES:] for d, _, _ in self.wire)
        for node in self.nodes.values():
            keep.update(d[MUTABLE_BYTES:] for _, _, sends in node._timers for d, _ in sends)
        old = self.now - KEEP_SEALED
        for tail in [t for t, r in self.sealed.items() if r.sealed_at < old and t not in keep]:
            del self.idents[self.sealed.pop(tail).ident]
        # challenges: a node forgets them after CHALLENGE_LIFETIME (10 s)
        for name in NAMES:
            for nonce in [n for n, (_, when) in self.nonces[name].items() if when < old]:
                del self.nonces[name][nonce]
                self.answered[name].discard(nonce)
                self.challenged[name].pop(nonce, None)
        live = {r.message for r in self.sealed.values() if r.message is not None}
        for message in [m for m in self.messages if m not in live]:
            del self.messages[message]

    def next_in_flight(self, s) -> tuple[bytes, tuple, tuple] | None:
        """The next real datagram on the wire that some node owns the target of."""
        for _ in range(50):
            if not self.wire:
                self.originate(s)
                continue
            datagram, frm, to = self.wire.popleft()
            if to in BY_ADDR:
                return datagram, frm, to
            self.lost += 1
        return None

    # ------------------------------------------------------------ input families
    def _receiver(self, s, to: tuple | None = None) -> str:
        if to in BY_ADDR and s.chance(0.85):
            return BY_ADDR[to]
        return s.choice(NAMES)

    def _source(self, s) -> tuple:
        return s.choice(OTHER_SOURCES) if s.chance(0.4) else ADDR[s.choice(NAMES)]

    def _some_real(self, s) -> tuple[bytes, tuple, tuple]:
        if not self.history:
            self.next_in_flight(s)
        return s.choice(self.history)

    def _header(self, s, src: str, dst: str) -> Header:
        return Header(DEFAULT_TTL, s.int(0, 1), s.int(0, 1), ph.pid(src), ph.pid(dst), s.bytes(8),
                      int(self.clock(src)), s.int(0, SEQ_LIMIT - 1), 0)

    def _pair(self, s) -> tuple[str, str]:
        src = s.choice(NAMES)
        return src, s.choice([n for n in NAMES if n != src])

    def _shards(self, s, pair: bytes, header: Header, payload: bytes) -> list[bytes]:
        """The shard datagrams of a message sealed under `pair` (any key)."""
        header = header._replace(kind=KIND_DATA, pad=0, flags=FLAG_FRAG)
        body = wire.seal_message(pair, header, payload)
        chunks, k, m = fec.split(body, self.max_chunk, s.int(0, 2))
        return wire.frame_shards(self.group_key, crypto.derive_shard_key(pair), header, chunks, k, m, len(body))

    def generate(self, s, family: str) -> tuple[str, bytes, tuple, DropReason | None]:
        """(receiver, datagram, source address, the exact drop reason expected or None)."""
        if family == "random":
            return s.choice(NAMES), s.bytes(s.int(0, 2000)), self._source(s), None
        if family in ("real", "elsewhere"):
            got = self.next_in_flight(s) if (family == "real" or s.chance(0.5)) else None
            datagram, frm, to = got or self._some_real(s)
            if family == "elsewhere":
                frm = s.choice([a for a in OTHER_SOURCES + list(ADDR.values()) if a != frm])
            return (BY_ADDR[to] if to in BY_ADDR else s.choice(NAMES)), datagram, frm, None
        if family == "replay":
            if not self.accepted_ring:
                return self.generate(s, "real")
            datagram, name, frm = s.choice(self.accepted_ring)
            return name, datagram, (frm if s.chance(0.6) else self._source(s)), None
        if family == "bitflip":
            datagram, frm, to = self._some_real(s)
            data = bytearray(datagram)
            for _ in range(s.int(1, 8)):
                bit = s.int(0, len(data) * 8 - 1)
                data[bit >> 3] ^= 1 << (bit & 7)
            return self._receiver(s, to), bytes(data), frm, None
        if family == "truncate":
            datagram, frm, to = self._some_real(s)
            cut = s.int(0, len(datagram) - 1)
            data = datagram[:cut] if s.chance(0.7) else datagram[len(datagram) - cut:]
            return self._receiver(s, to), data, frm, None
        if family == "extend":
            datagram, frm, to = self._some_real(s)
            extra = s.int(1, 64) if s.chance(0.8) else s.int(65, 2000)
            return self._receiver(s, to), datagram + s.bytes(extra), frm, None
        if family == "oversized":
            size = s.int(2001, 65535)
            if s.chance(0.5):
                return s.choice(NAMES), s.bytes(size), self._source(s), None
            datagram, frm, to = self._some_real(s)
            return self._receiver(s, to), datagram + s.bytes(max(1, size - len(datagram))), frm, None
        if family == "wrong_group":
            src, dst = self._pair(s)
            header = self._header(s, src, dst)
            payload = b"" if header.kind == KIND_KEEPALIVE else self.inner_packet(s, "16.1")
            bigger = src if ph.pid(src) > ph.pid(dst) else dst
            if s.chance(0.5):    # a whole other mesh with the same key strings
                pair = crypto.derive_pair_key(self.other_group_key, self.psk_keys[bigger], header.src, header.dst)
            else:                # the right pair key, masked with the wrong group key
                pair = crypto.derive_pair_key(self.group_key, self.psk_keys[bigger], header.src, header.dst)
            data = wire.seal(self.other_group_key, pair, header, payload)
            return self._receiver(s, ADDR[dst]), data, ADDR[src], None
        if family == "wrong_key":
            src, dst = self._pair(s)
            header = self._header(s, src, dst)
            payload = b"" if header.kind == KIND_KEEPALIVE else self.inner_packet(s, "16.1")
            bigger = src if ph.pid(src) > ph.pid(dst) else dst
            real = self.keys[bigger]
            variant = s.int(0, 3)
            if variant == 0:       # another genkey-style key
                wrong = base64.urlsafe_b64encode(s.bytes(32)).rstrip(b"=").decode()
            elif variant == 1:     # the real key with its last character changed
                wrong = real[:-1] + ("A" if real[-1] != "A" else "B")
            elif variant == 2:     # a prefix of the real key
                wrong = real[:s.int(0, len(real) - 1)]
            else:                  # the real key and one character more
                wrong = real + "x"
            if wrong == real:
                wrong += "!"
            pair = crypto.derive_pair_key(self.group_key, crypto.derive_psk_key(wrong), header.src, header.dst)
            name = self._receiver(s, ADDR[dst])
            if s.chance(0.3):      # a shard of a message: its MAC under the wrong shard key
                data = s.choice(self._shards(s, pair, header, payload or b"x"))
            else:
                data = wire.seal(self.group_key, pair, header, payload)
            return name, data, ADDR[src], self._no_key_reason(name, header.src, header.dst, DropReason.AUTH_FAILURE,
                                                              header.flags)
        if family == "bad_body":
            if s.chance(0.5):      # the exact header (and sub-header) of a real datagram
                datagram, frm, to = self._some_real(s)
                header, _, clear = wire.peek_shard(self.group_key, datagram)
                shard = bool(header.flags & FLAG_FRAG)
                raw = CLEAR.pack(*clear) if shard else header.pack()
                length = len(datagram) - len(raw)
                name = self._receiver(s, to)
            else:                  # a fresh valid header, whole or a shard's with a valid sub-header
                src, dst = self._pair(s)
                header = self._header(s, src, dst)
                frm, name = ADDR[src], self._receiver(s, ADDR[dst])
                shard = s.chance(0.4)
                if shard:
                    k, m = s.int(1, 4), s.int(0, 2)
                    index, chunk = s.int(0, k + m - 1), s.int(TAG_SIZE, self.max_chunk)
                    total = s.int((k - 1) * chunk + 1, k * chunk)
                    header = header._replace(kind=KIND_DATA, flags=FLAG_FRAG)
                    raw = header.pack() + SUB.pack(index, k, m, total >> 16, total & 0xFFFF)
                    length = chunk + crypto.MAC_SIZE
                else:
                    raw = header.pack()
                    length = s.int(TAG_SIZE, 1500)
            body = s.bytes(length)
            mask = mask_of(self.group_key, body) >> (0 if shard else SUB_BITS)
            data = (int.from_bytes(raw, "big") ^ mask).to_bytes(len(raw), "big") + body
            return name, data, frm, self._no_key_reason(name, header.src, header.dst, DropReason.AUTH_FAILURE,
                                                        header.flags)
        if family == "session":
            # a datagram sealed with the real pair key in a session no node
            # has verified: a member that restarted, or one forging traffic
            # it has the key for (registered as authentic: it is)
            src, dst = self._pair(s)
            header = self._header(s, src, dst)._replace(ttl=DEFAULT_TTL, path=0)
            payload = b"" if header.kind == KIND_KEEPALIVE else self.inner_packet(s, src)
            data = wire.seal(self.group_key, self.pair_key(header.src, header.dst), header, payload)
            self._record(data, src, payload)
            frm = ADDR[src] if s.chance(0.7) else self._source(s)
            return self._receiver(s, ADDR[dst]), data, frm, None
        raise ValueError(f"unknown family {family!r}")

    def _ttl(self, data: bytes) -> int:
        return wire.peek(self.group_key, data)[0].ttl

    def _no_key_reason(self, name: str, src: int, dst: int, otherwise: DropReason, flags: int = 0) -> DropReason:
        """UNKNOWN_PEER when the receiver holds no key for (src, dst) or src
        is itself; AEAD_UNSUPPORTED when it is flagged AES-256-GCM and the
        receiver does not open that."""
        lo, hi = min(src, dst), max(src, dst)
        if src == ph.pid(name) or (lo, hi) not in self.pairs[name]:
            return DropReason.UNKNOWN_PEER
        if flags & FLAG_AES and not self.nodes[name].settings.aes:
            return DropReason.AEAD_UNSUPPORTED
        return otherwise

    # ------------------------------------------------------------ one input
    def next_family(self) -> str:
        if not self._schedule:
            block = [f for f, share in FAMILIES for _ in range(share)]
            self.rng.shuffle(block)
            self._schedule = block
        return self._schedule.pop()

    def step(self, s) -> str:
        """Generate one input, feed it, check it; returns its outcome."""
        family = self.next_family()
        name, data, frm, expect = self.generate(s, family)
        self.last = (family, name, frm, data)
        outcome = self.feed(name, data, frm, family, expect)
        self.index += 1
        self.now += STEP
        if self.index % ORIGINATE_EVERY == 0:
            self.originate(s)
        if self.index % TICK_EVERY == 0:
            self.tick()
        if self.index % PRUNE_EVERY == 0:
            self.prune()
        return outcome

    @staticmethod
    def _stale_challenge(node: Node, rec, now: float) -> bool:
        """Challenges are judged by the challenger's clock (docs/protocol.md
        §5 "Clock offsets"): the offset the node holds for the session, and
        at or below a second its challenge window forgot is stale."""
        peer, session, ts = node.table.peers[rec.src], rec.ident[2], rec.ident[3]
        offset = peer.session_offset(CHALLENGE_WINDOW, session, ts, now)
        window = peer.replay.get(CHALLENGE_WINDOW)
        floor = max(window.floors.get(session, -1) if window is not None else -1,
                    peer.old_floors.get((CHALLENGE_WINDOW, session), -1))
        return abs(ts - int(now) - offset) > REPLAY_WINDOW or ts <= floor

    def _sync_verified(self, name: str, node: Node, src: int) -> None:
        """The sessions `node` has verified for `src` against the oracle's:
        the node may forget one (it is challenged again), never verify one
        the oracle did not see answer a challenge, nor lower its floor."""
        mine = self.verified[name]
        have = node.table.peers[src].verified
        for session, (ts, seq, *_) in have.items():
            floor = mine.get((src, session))
            if floor is None:
                raise Violation(f"{name} verified a session of {ph.format_id(src)} that answered none of its "
                                f"challenges: {session.hex()}")
            if (ts, seq) < floor:
                raise Violation(f"{name} lowered the floor of a verified session: {(ts, seq)} < {floor}")
            mine[(src, session)] = (ts, seq)
        for key in [k for k in mine if k[0] == src and k[1] not in have]:
            del mine[key]

    def _check_replies(self, name: str, node: Node, src: int, sends, frm: tuple, now: float, fail,
                       answer: bytes | None = None) -> list:
        """Sends of a node that took a datagram from `src` for itself: only a
        round of challenges to src (at most one per CHALLENGE_INTERVAL), and
        for a challenge its answers (`answer`: the nonce), each on the address
        the input came from or a way to src. Returns them, recorded."""
        me = node.me
        peer = node.table.peers[src]
        ways = {frm} | set(peer.paths)          # and upward, the paths of our forwarders
        for f in node.settings.forwarders:
            ways.update(node.table.peers[f].paths)
        challenges = answers = 0
        reports: collections.Counter[bytes] = collections.Counter()
        report_sends: collections.Counter[tuple] = collections.Counter()
        for d, to in sends:
            if d in reports:
                reports[d] += 1             # (a copy: recorded once)
                report_sends[(d, to)] += 1
                if report_sends[(d, to)] > node.report_copies(src):
                    # (on each way to the peer, as a one-datagram message goes)
                    fail("sent a loss report more often than a one-datagram message to the peer")
                continue
            rec = self._record(d, name, None)
            if rec.src == me and rec.dst == src and rec.kind == KIND_REPORT and to in ways:
                # the first shard tally for src goes out at once (loss.py),
                # one report in its copies (node._send_reports)
                reports[d] += 1
                report_sends[(d, to)] += 1
                if len(reports) > 1 or src not in node.loss.told:
                    fail("sent a loss report on input other than its first tally for the peer")
                continue
            if rec.src != me or rec.dst != src or rec.kind not in CHALLENGE_KINDS:
                fail(f"sent {rec.kind} {ph.format_id(rec.src)}->{ph.format_id(rec.dst)}, not a challenge or an "
                     f"answer to {ph.format_id(src)}")
            if to not in ways:
                fail(f"sent a challenge or an answer to {to}, neither where the input came from nor a way to the peer")
            if rec.kind == KIND_CHALLENGE:
                challenges += 1
                self.challenged[name][rec.nonce] = to
            elif answer is None or rec.nonce != answer:
                fail("answered a challenge it was not given")
            else:
                answers += 1
        if challenges:
            last = self.rounds.get((name, src))
            if last is not None and now - last < CHALLENGE_INTERVAL - 1e-9:
                fail(f"challenged {ph.format_id(src)} again after {now - last:.3f} s")
            self.rounds[(name, src)] = now
        if answers:
            count = self.answers.setdefault((name, src), [int(now), 0])
            if count[0] != int(now):
                count[0], count[1] = int(now), 0
            count[1] += 1
        return [(d, to) for d, to in sends]

    def feed(self, name: str, data: bytes, frm: tuple, family: str = "direct",
             expect: DropReason | None = None) -> str:
        """Node.from_udp on one input, and the invariant for it."""
        node = self.nodes[name]
        me = node.me
        now = self.clock(name)
        rec = self.sealed.get(data[MUTABLE_BYTES:]) if len(data) >= MIN_DATAGRAM else None
        # a real datagram reflected, of a pair we hold no key for, or sealed
        # with AES-256-GCM (between 1.1 and 16.1) for a node that does not
        # open it: none can be told from garbage
        no_key = (self._no_key_reason(name, rec.src, rec.dst, None, wire.peek(self.group_key, data)[0].flags)
                  if rec is not None else None)
        if no_key is not None:
            klass, expect = "unauth", no_key
        elif rec is None:
            klass = "unauth"
        else:
            own = rec.dst == me
            session, ts, seq = rec.ident[2:]
            if own:
                self._sync_verified(name, node, rec.src)
            if own and rec.kind == KIND_CHALLENGE:
                klass = "challenge"
            elif own and rec.kind == KIND_RESPONSE:
                klass = "response"
            elif own and (rec.src, session) not in self.verified[name]:
                klass = "unverified"
            elif rec.ident in self.accepted[name]:
                klass = "dup"
            else:
                # judged by the sender's clock as this node measured it (0: unmeasured)
                offset = node.table.peers[rec.src].session_offset(rec.dst, session, ts, now)
                if own:
                    stale = (ts, seq) <= self.verified[name][(rec.src, session)]
                else:
                    stale = ts < self.floor[name] + offset
                stale = stale or abs(ts - int(now) - offset) > REPLAY_WINDOW
                klass = "stale" if stale else "fresh"
        self.classes[klass] += 1
        peer = node.table.peers.get(rec.src) if klass != "unauth" else None
        tot0 = ph.total_drops(node)
        g0 = node.global_drops.copy()
        notices0 = len(node.notices)
        p0 = peer.drops.copy() if peer is not None else None
        fp0, matched = None, False
        if klass == "response":
            matched = rec.nonce in peer.challenges       # an answer to a challenge outstanding
        # a verified session whose challenge strays from its measured clock is measured again
        remeasure = klass == "challenge" and peer.clock_moved(rec.ident[2], rec.ident[3], now)
        if self.check_state:
            if klass == "unauth":
                fp0 = self.fingerprint(node)
            elif klass in ("dup", "stale"):
                fp0 = self.fingerprint(node, (rec.src, frm, False))
            elif klass in ("unverified", "challenge"):
                fp0 = self.fingerprint(node, (rec.src, None, True))
            elif klass == "response" and not matched:
                fp0 = self.fingerprint(node, (rec.src, None, False))
        if peer is not None:
            rx0, last0, rel0, bytes0 = peer.rx_packets, peer.last_rx, peer.relayed_packets, peer.rx_bytes
            paths0 = {a: p.last_rx for a, p in peer.paths.items()}
        try:
            tally0 = self._tally(node, rec)
            out = node.from_udp([(data, frm)], now)
        except Exception:  # noqa: BLE001  (any exception escaping is the violation)
            raise Violation("exception escaped from Node.from_udp:\n" + traceback.format_exc()) from None
        tot1 = ph.total_drops(node)
        gd = node.global_drops - g0
        pd = (peer.drops - p0) if peer is not None else collections.Counter()
        ngd, npd = sum(gd.values()), sum(pd.values())

        def fail(what: str) -> None:
            raise Violation(f"{klass} input at {name}: {what}; tun={len(out.tun)} sends={len(out.sends)} "
                            f"global drops {dict(gd)} peer drops {dict(pd)}")

        if ngd + npd != tot1 - tot0:
            fail(f"drops changed elsewhere: {tot1 - tot0} counted")
        for r, n in gd.items():
            self.drop_hist[f"global:{r.value}"] += n
        for r, n in pd.items():
            self.drop_hist[f"peer:{r.value}"] += n

        outcome = "dropped"
        for marker, reason in RATE_LIMITED_NOTICES:
            lines = [line for line in node.notices[notices0:] if marker in line]
            if lines:
                if len(lines) > 1 or not gd[reason] or \
                        now - self.last_notice.get((name, marker), -VERSION_NOTICE_INTERVAL) < VERSION_NOTICE_INTERVAL:
                    fail(f"a notice about {marker} for another input, or more than one a minute")
                self.last_notice[(name, marker)] = now
        if klass in ("unauth", "dup", "stale"):
            if out.tun or out.sends:
                fail("produced output")
            if klass == "unauth":
                if npd or ngd != 1 or next(iter(gd)) not in UNAUTH_REASONS:
                    fail("not exactly one global unauthenticated drop")
                if expect is not None and gd[expect] != 1:
                    fail(f"expected {expect.value}")
                if fp0 is not None and self.fingerprint(node) != fp0:
                    fail("changed per-peer state")
            else:
                allowed = (DropReason.REPLAY,) if klass == "stale" else (DropReason.DUPLICATE, DropReason.REPLAY)
                if rec.dst != me:       # a relay drops what it cannot relay before the replay check
                    allowed = (DropReason.TTL,) if self._ttl(data) <= 1 else allowed + (DropReason.NO_PATH,)
                if ngd or npd != 1 or next(iter(pd)) not in allowed:
                    fail(f"not exactly one {'/'.join(r.value for r in allowed)} drop on the source peer")
                if fp0 is not None and self.fingerprint(node, (rec.src, frm, False)) != fp0:
                    fail("changed per-peer state beyond the source peer's drops and path last_rx")
                refresh = pd[DropReason.DUPLICATE] and rec.dst == me and frm in paths0
                after = peer.paths[frm].last_rx if frm in peer.paths else None
                if after != (now if refresh else paths0.get(frm)):
                    fail(f"path last_rx {paths0.get(frm)} -> {after}, refresh expected: {bool(refresh)}")
        elif klass == "unverified":
            if out.tun or ngd or npd != 1 or pd[DropReason.UNVERIFIED] != 1:
                fail("not exactly one unverified drop")
            self._push(self._check_replies(name, node, rec.src, out.sends, frm, now, fail), ADDR[name])
            if fp0 is not None and self.fingerprint(node, (rec.src, None, True)) != fp0:
                fail("changed per-peer state beyond the source peer's drops and challenges")
        elif klass == "challenge":
            # each challenge is answered once (its own window), within the
            # node's clock window, and at most RESPONSE_LIMIT a second per peer
            seen = self.challenges_seen[name]
            stale = self._stale_challenge(node, rec, now)
            count = self.answers.get((name, rec.src), [None, 0])
            limited = count[0] == int(now) and count[1] >= RESPONSE_LIMIT
            if rec.ident in seen or stale:
                want = DropReason.REPLAY if stale else DropReason.DUPLICATE
            elif limited:
                want = DropReason.RATE_LIMITED
            else:
                want = None
            if not stale:
                seen.add(rec.ident)
            if want is not None:
                if out.tun or out.sends or ngd or npd != 1 or pd[want] != 1:
                    fail(f"a challenge answered before, stale or over the limit: not exactly one {want.value} drop")
                self.unanswered += want is DropReason.RATE_LIMITED
                outcome = "dropped"
                sends = []
            elif out.tun or ngd or npd:
                fail("a challenge counted a drop or wrote to TUN")
            if want is None:
                sends = self._check_replies(name, node, rec.src, out.sends, frm, now, fail, answer=rec.nonce)
                answered = [d for d, _ in sends if self.sealed[d[MUTABLE_BYTES:]].kind == KIND_RESPONSE]
                if not answered:
                    fail("a fresh challenge within the limit was not answered")
                if len(answered[0]) <= len(data) and not any(to == frm for d, to in sends if d == answered[0]):
                    fail("an answer no bigger than its challenge did not go where the challenge came from")
                if len({d for d in answered}) != 1:
                    fail("more than one answer sealed for one challenge")
                outcome = "answered"
            if any(self.sealed[d[MUTABLE_BYTES:]].kind == KIND_CHALLENGE for d, _ in sends) \
                    and (rec.src, rec.ident[2]) in self.verified[name] and not remeasure:
                fail("challenged a session it has verified")
            self._push(sends, ADDR[name])
            if fp0 is not None and self.fingerprint(node, (rec.src, None, True)) != fp0:
                fail("changed per-peer state beyond the source peer's challenges")
        elif klass == "response":
            if matched and (self.nonces[name].get(rec.nonce, (None,))[0] != rec.src
                            or rec.nonce in self.answered[name]):
                fail("had an answer outstanding for a nonce it never sent that peer, or already answered")
            if ngd or out.tun:
                fail("an answer counted a global drop or wrote to TUN")
            if not matched:
                # another copy of an answer taken (answers go on every path), or
                # a stale or replayed one: duplicate from a session verified
                why = DropReason.DUPLICATE if (rec.src, rec.ident[2]) in self.verified[name] else DropReason.REPLAY
                if out.sends or npd != 1 or pd[why] != 1:
                    fail(f"an answer to no outstanding challenge: not exactly one {why.value} drop")
                if fp0 is not None and self.fingerprint(node, (rec.src, None, False)) != fp0:
                    fail("an answer to no outstanding challenge changed state beyond the source peer's drops")
            else:
                if npd:
                    fail("an answer to an outstanding challenge counted a drop")
                if rec.nonce in peer.challenges:
                    fail("the challenge is still outstanding after its answer")
                self.answered[name].add(rec.nonce)
                target = self.challenged[name].pop(rec.nonce, None)
                if target is None or (target in peer.paths and not peer.paths[target].proven):
                    fail(f"the address the challenge went to ({target}) is not proven by its answer")
                key = (rec.src, rec.ident[2])
                if key not in self.verified[name]:
                    self.verified[name][key] = rec.ident[3:]
                v = peer.verified.get(rec.ident[2])
                if v is None or tuple(v[:2]) != self.verified[name][key]:
                    fail(f"the session is not verified from its first answer on: {v} {self.verified[name][key]}")
                if peer.paths.get(frm) is None or peer.paths[frm].last_rx != now or peer.last_rx != now \
                        or peer.rx_bytes != bytes0 + len(data) or peer.rx_packets != rx0:
                    fail("an answer did not learn the address it came from (or counted a packet)")
                self._push(self._check_replies(name, node, rec.src, out.sends, frm, now, fail), ADDR[name])
                outcome = "consumed"
        else:   # fresh: must be accepted exactly once
            if ngd:
                fail("an authenticated datagram counted a global drop")
            if rec.dst == me:
                self._push(self._check_replies(name, node, rec.src, out.sends, frm, now, fail), ADDR[name])
                if peer.last_rx != now or peer.paths.get(frm) is None or peer.paths[frm].last_rx != now:
                    fail("an accepted datagram for us did not learn its path")
                rx = peer.rx_packets - rx0
                if rec.message is not None:
                    outcome = self._shard_outcome(name, node, rec, out, pd, npd, rx, fail,
                                                  self._tally(node, rec) != tally0)
                elif rx != 1:
                    fail("an accepted datagram for us did not count rx once")
                elif rec.kind in (KIND_KEEPALIVE, KIND_REPORT):
                    # a loss report may be malformed only if we sealed it so: never
                    if out.tun or npd:
                        fail("a keepalive or loss report for us was not consumed silently")
                    outcome = "consumed"
                elif not node.settings.has_tun:
                    if out.tun or npd != 1 or pd[DropReason.NO_TUN] != 1:
                        fail("data for a node without TUN: not exactly one no_tun drop")
                else:
                    if npd or out.tun != [rec.inner]:
                        fail("not delivered exactly once, byte-identical to the sealed inner packet")
                    outcome = "delivered"
            else:       # a relay: learns nothing
                if out.tun:
                    fail("wrote another pair's packet to TUN")
                if peer.rx_packets != rx0 or peer.last_rx != last0 or \
                        {a: p.last_rx for a, p in peer.paths.items()} != paths0:
                    fail("a relay learned from what it relayed")
                ttl = self._ttl(data)
                if ttl <= 1:
                    if out.sends or npd != 1 or pd[DropReason.TTL] != 1:
                        fail("ttl <= 1: not exactly one ttl drop")
                elif out.sends:
                    if set(pd) - {DropReason.LOOP}:
                        fail("relayed and counted a drop other than loop")
                    if peer.relayed_packets != rel0 + 1:
                        fail("relayed_packets did not count the relay once")
                    tail = data[MUTABLE_BYTES:]
                    for d, to in out.sends:
                        if d[MUTABLE_BYTES:] != tail:
                            fail("sent a datagram that is not a relay of the input")
                        if to == frm:
                            fail("split horizon: sent back where it came from")
                        h = wire.peek(self.group_key, d)[0]
                        if h.ttl != min(ttl, MAX_TTL) - 1 or h.path != PATH_RELAYED:
                            fail(f"relay header ttl {h.ttl} path {h.path} (input ttl {ttl})")
                    self._push(out.sends, ADDR[name])
                    outcome = "relayed"
                else:
                    if peer.relayed_packets != rel0:
                        fail("counted a relay that sent nothing")
                    if not (pd[DropReason.NO_PATH] in (0, 1) and npd >= 1
                            and set(pd) <= {DropReason.NO_PATH, DropReason.LOOP}):
                        fail("nothing relayed: not one no_path drop (besides loop drops) or loop drops only")
            # a relay drops what it cannot relay (ttl, no target) before its
            # window, and what its targets' credit does not cover (no_path) after
            if rec.dst == me or not (pd[DropReason.TTL] or pd[DropReason.NO_PATH]) or \
                    in_window(peer, rec.dst, *rec.ident[2:]):
                self.accepted[name].add(rec.ident)
        if outcome != "dropped" or klass == "fresh":
            entry = (data, name, frm)
            if len(self.accepted_ring) < HISTORY:
                self.accepted_ring.append(entry)
            else:
                self.accepted_ring[self._acc_i] = entry
                self._acc_i = (self._acc_i + 1) % HISTORY
        if outcome == "dropped" and npd + ngd == 0:
            fail("neither delivered, held, relayed, consumed, answered nor counted")
        # beyond one drop per dropped input only the loop guard counts (once per
        # skipped target, also when the input was relayed to another target)
        self.extra_loop += npd + ngd - (outcome == "dropped")
        self.family_counts[family] += 1
        self.outcomes[(family, outcome)] += 1
        return outcome

    @staticmethod
    def _tally(node: Node, rec) -> tuple:
        """What the node's loss meter holds of shards from rec's source: a
        message all of whose shards are in is tallied (and maybe reported) at once."""
        if rec is None:
            return ()
        return tuple(node.loss.tally.get(rec.src, (0, 0))), rec.src in node.loss.told

    def _shard_outcome(self, name: str, node: Node, rec: Sealed, out, pd, npd: int, rx: int, fail,
                       tallied: bool) -> str:
        """An accepted shard for us: filed (or one more of a message decoded),
        or the one that completes its message, which is then delivered once."""
        message = rec.message
        packets = list(self.messages[message])
        done = message in self.delivered[name]
        if out.tun:
            if npd or done or out.tun != packets or rx != len(packets):
                fail(f"a message not delivered exactly once, byte-identical to its sealed packets "
                     f"(delivered before: {done})")
            self.delivered[name].add(message)
            return "delivered"
        if rx:
            if node.settings.has_tun or done or npd != 1 or pd[DropReason.NO_TUN] != 1 or rx != len(packets):
                fail("a message for a node without TUN: not exactly one no_tun drop")
            self.delivered[name].add(message)
            return "dropped"
        if npd:
            if npd != 1 or not (pd[DropReason.REASSEMBLY_FULL] or (done and pd[DropReason.DUPLICATE])):
                fail("an authentic shard dropped, but not as reassembly_full or a message delivered before")
            return "dropped"
        key = (rec.src, message[2], message[3], message[4])
        if not holds(node, key, rec.index) and not tallied:
            fail("an accepted shard neither delivered, held, nor counted")
        return "held"

    # ------------------------------------------------------------ running and reporting
    def _drain(self, s) -> None:
        while self.wire:
            datagram, frm, to = self.wire.popleft()
            if to not in BY_ADDR:
                self.lost += 1
                continue
            self.feed(BY_ADDR[to], datagram, frm, "warmup")

    def warm_up(self) -> None:
        """Let the mesh form: keepalives so servers learn the clients' paths,
        and a few packets each way; the challenges they set off run through
        the same checks, so the sessions and paths are proven for real."""
        s = RandomSource(self.rng)
        for round_ in range(5):
            self.tick()
            self._drain(s)
            if round_:
                for sender in ("16.1", "16.2", "1.1", "1.1"):
                    self.originate(s, sender)
                self._drain(s)
            self.now += 1.0
        # the figures count the fuzz inputs only
        self.family_counts.clear()
        self.outcomes.clear()
        self.drop_hist.clear()
        self.classes.clear()
        self.extra_loop = 0
        self.unanswered = 0

    def run(self, n: int, progress=None) -> None:
        s = RandomSource(self.rng)
        t0 = time.perf_counter()
        for i in range(n):
            self.step(s)
            if progress and (i + 1) % progress == 0:
                dt = time.perf_counter() - t0
                print(f"{i + 1:>9} inputs  {dt:7.1f} s  {(i + 1) / dt:8.0f} inputs/s", flush=True)

    def reproducer(self) -> str:
        if self.last is None:
            return "no input yet"
        family, name, frm, data = self.last
        return (f"reproduce: scripts/fuzz.py --seed {self.seed} --inputs {self.index + 1}\n"
                f"  input index {self.index} (0-based), family {family}, to {name} {ADDR[name]}, "
                f"from {frm}, now {self.clock(name):.3f}\n  hex ({len(data)} bytes): {data.hex()}")

    def totals(self) -> dict:
        by_outcome = collections.Counter()
        for (_, o), n in self.outcomes.items():
            by_outcome[o] += n
        return by_outcome

    def report(self, elapsed: float | None = None) -> str:
        lines = []
        n = sum(self.family_counts.values())
        if elapsed:
            lines.append(f"{n} inputs in {elapsed:.1f} s: {n / elapsed:.0f} inputs/s (seed {self.seed})")
        lines.append(f"{'family':<12}{'inputs':>9}" + "".join(f"{o:>11}" for o in OUTCOMES))
        for f, _ in FAMILIES:
            lines.append(f"{f:<12}{self.family_counts[f]:>9}"
                         + "".join(f"{self.outcomes[(f, o)]:>11}" for o in OUTCOMES))
        t = self.totals()
        lines.append(f"{'total':<12}{n:>9}" + "".join(f"{t[o]:>11}" for o in OUTCOMES))
        lines.append("input classes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.classes.items())))
        lines.append("drop reasons (counted by from_udp on these inputs):")
        for reason, count in sorted(self.drop_hist.items(), key=lambda x: -x[1]):
            lines.append(f"  {reason:<26}{count:>9}")
        lines.append(f"  {'total':<26}{sum(self.drop_hist.values()):>9}"
                     f"  = {t['dropped']} dropped inputs + {self.extra_loop} loop drops on inputs"
                     " relayed to another target or skipped on several")
        lines.append(f"real datagrams sealed {self.sealed_count}, sent to addresses no node owns {self.lost}, "
                     f"lost to a full wire {self.overflow}; challenges past the answer limit {self.unanswered}")
        return "\n".join(lines)

    def check_totals(self) -> None:
        """Each input accounted once, and the run reached every outcome."""
        t = self.totals()
        n = sum(self.family_counts.values())
        if sum(t.values()) != n:
            raise Violation(f"{n} inputs but {sum(t.values())} outcomes")
        if sum(self.drop_hist.values()) != t["dropped"] + self.extra_loop:
            raise Violation(f"{sum(self.drop_hist.values())} drops counted for {t['dropped']} dropped inputs "
                            f"and {self.extra_loop} extra loop drops")
        missing = [o for o in OUTCOMES if not t[o]]
        if missing:
            raise Violation(f"the run never reached: {', '.join(missing)} (harness too weak)")


# ---------------------------------------------------------------- engines

def run_random(n: int, seed: int) -> int:
    h = Harness(seed)
    h.warm_up()
    t0 = time.perf_counter()
    try:
        h.run(n, progress=100_000 if n >= 200_000 else max(1, n // 10))
        h.check_totals()
    except Violation as e:
        print(f"VIOLATION: {e}\n{h.reproducer()}", flush=True)
        return 1
    print(h.report(time.perf_counter() - t0))
    return 0


def run_atheris(n: int, seed: int) -> int:
    import atheris

    h = Harness(seed)
    h.warm_up()
    t0 = time.perf_counter()

    def one(data: bytes) -> None:
        try:
            h.step(FdpSource(atheris.FuzzedDataProvider(data)))
            if h.index % 100_000 == 0:
                dt = time.perf_counter() - t0
                print(f"{h.index:>9} inputs  {dt:7.1f} s  {h.index / dt:8.0f} inputs/s", flush=True)
            if h.index >= n:
                h.check_totals()
                print(h.report(time.perf_counter() - t0), flush=True)
                os._exit(0)
        except Violation as e:
            print(f"VIOLATION: {e}\n{h.reproducer()}", flush=True)
            os._exit(1)

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], f"-runs={n + 1}", f"-seed={seed or 1}", "-max_len=4096"], one)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--engine", choices=("random", "atheris"), default="random")
    args = ap.parse_args(argv)
    if args.engine == "atheris":
        return run_atheris(args.inputs, args.seed)
    return run_random(args.inputs, args.seed)


if __name__ == "__main__":
    sys.exit(main())
