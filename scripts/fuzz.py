#!/usr/bin/env python3
"""Fuzz the whole receive path of the protocol core (Node.from_udp) with real keys.

The invariant (docs/fuzzing.md), checked for every input:

    every input is either a valid packet (delivered once, relayed once, or a
    keepalive consumed) or exactly one counted drop; no exception escapes,
    and unauthenticated input changes no per-peer state.

A small mesh of real Node objects runs on one simulated clock: a gateway 1.1
(server), a relay 1.2 (forwarder, no TUN) and two clients 16.1/16.2 (gateway
1.1, forwarder 1.2) with keys from crypto.genkey. The same nodes seal real
traffic (from_tun, tick) and receive the inputs. Each input belongs to one
family (FAMILIES, fixed shares per block of 100 inputs) and goes to one node.

The oracle knows every datagram a node ever sealed (bytes from offset 2 on,
since bytes 0-1 are the only ones a relay may change) and, per receiving
node, which nonce identities (src, dst, session, ts, seq) it has accepted.
From that alone it predicts each input's class and checks the outcome:

  unauth  bytes no real sender sealed (or a real datagram the receiver holds
          no key for, or its own datagram reflected back): exactly one global
          drop (malformed / unknown_peer / auth_failure), no output, and the
          per-peer state fingerprint is unchanged.
  dup     a real datagram whose identity this node already accepted: exactly
          one duplicate/replay drop on the source peer (at a relay, ttl or
          no_path come first: what cannot be relayed never reaches the
          window), no output; nothing else changes but the last_rx of an
          existing path (a duplicate addressed to us refreshes it).
  fresh   a real datagram this node has not accepted: inside the window it
          must be accepted once, then delivered (the TUN packet is
          byte-identical to the inner packet the sender sealed), consumed (a
          keepalive for us), relayed (every send is the same datagram from
          byte 2 on, TTL-1, path relayed, never back to where it came from),
          or dropped with exactly the reason the rules give (no_tun, ttl,
          no_path, loop; a relay's ttl and no_path drops leave the identity
          unaccepted); outside the window exactly one replay drop.

usage: scripts/fuzz.py [--inputs N] [--seed S] [--engine random|atheris]
"""

from __future__ import annotations

import argparse
import base64
import collections
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import protocol_helpers as ph  # tests/protocol_helpers.py

from alpaca.protocol import crypto, wire
from alpaca.protocol.constants import (
    DEFAULT_TTL,
    FLAG_FRAG,
    HEADER_SIZE,
    KIND_KEEPALIVE,
    KIND_REPORT,
    MIN_DATAGRAM,
    PATH_RELAYED,
    REPLAY_WINDOW,
    SEQ_LIMIT,
    TAG_SIZE,
)
from alpaca.protocol.wire import MUTABLE_BYTES, Header
from alpaca.protocol.drops import DropReason
from alpaca.protocol.node import Node, NodeSettings
from alpaca.protocol.peers import PeerEntry

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
PRUNE_EVERY = 20_000                                    # inputs between oracle prunes
KEEP_SEALED = 30.0                                      # s an unreferenced sealed datagram is kept
HISTORY = 2048                                          # recent real datagrams to mutate/replay

# (name, share per 100 inputs)
FAMILIES = (
    ("random", 12),      # random bytes, random length 0..2000
    ("real", 18),        # real datagrams in flight, to their real target (the mesh runs)
    ("bitflip", 14),     # a real datagram with 1..8 random bit flips
    ("truncate", 8),     # a real datagram cut short (prefix or suffix)
    ("extend", 6),       # a real datagram with random bytes appended
    ("oversized", 4),    # 2001..65535 bytes: random, or a real datagram padded out
    ("wrong_group", 7),  # sealed under another group's key (whole, or just the mask)
    ("wrong_key", 7),    # right group, right header, pair key from a key string not in secrets
    ("bad_body", 8),     # a correctly masked valid header over a random body of the right length
    ("replay", 8),       # exact replay of a datagram the receiver already accepted
    ("elsewhere", 8),    # a real datagram arriving from another source address
)
OUTCOMES = ("delivered", "relayed", "consumed", "dropped")
UNAUTH_REASONS = (DropReason.MALFORMED, DropReason.UNKNOWN_PEER, DropReason.AUTH_FAILURE,
                  # what a well-formed shard header can meet before any authentication
                  DropReason.REASSEMBLY_FULL, DropReason.TTL, DropReason.NO_PATH)
# an unauthenticated input whose header is a well-formed shard's (docs/protocol.md
# "Fragments"): held for reassembly (counted as incomplete when it expires), or
# relayed by header at a relay. Neither changes per-peer state.
SHARD_OUTCOMES = ("held", "relayed_shard")
OTHER_SOURCES = [("198.51.100.7", 1040), ("198.51.100.8", 51000), ("203.0.113.9", 5555),
                 ("2001:db8::9", 1040), ("2001:db8::a", 1040, 0, 0), ("0.0.0.0", 0),
                 ("192.0.2.200", 65535)]
INTERNET = ("8.8.8.8", "203.0.113.7", "192.0.2.1")      # 192.0.2.1: the gateway's own address (loop)


def held_shards(node: Node) -> int:
    """Shards a node holds for reassembly, or remembers of decoded messages."""
    return (sum(len(slot.shards) for slot in node.reassembly.slots.values())
            + sum(seen[0].bit_count() for seen in node.reassembly.done.values()))


class Violation(Exception):
    """The invariant failed for one input."""


@dataclass(slots=True)
class Sealed:
    """One datagram a real node sealed."""
    src: int
    dst: int
    kind: int
    ident: tuple           # (src, dst, session, ts, seq): the nonce, unique per pair key
    inner: bytes           # what the receiver must write to its TUN (empty for keepalives)
    sealed_at: float       # harness clock


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
    # FEC off: the invariant below models one inner packet per datagram; FEC
    # batches and shards of real traffic are covered by tests/test_fragments.py
    common = {"my_id": ph.pid(name), "net": ph.NET, "group": GROUP, "fec": None}
    if name == "1.1":
        return NodeSettings(mode="server", inactive_downward_static=True, **common)
    if name == "1.2":
        return NodeSettings(mode="forwarder", **common)
    extra = {"duplicate": 1, "duplicate_delay": 0.01, "padding": 200} if name == "16.2" else {}
    return NodeSettings(mode="client", gateway=ph.pid("1.1"), forwarders=(ph.pid("1.2"),), **common, **extra)


def pairs_with_key(entries: dict[int, PeerEntry]) -> frozenset:
    """(lo, hi) pairs a node can derive a key for: both listed, the bigger's key not null."""
    ids = sorted(entries)
    return frozenset((lo, hi) for i, lo in enumerate(ids) for hi in ids[i + 1:]
                     if entries[hi].psk is not None)


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

def fingerprint(node: Node, mask: tuple | None = None) -> tuple:
    """The fields of protocol_helpers.peer_state (per-peer paths, last_rx, up,
    counters, drops, replay windows and floor; the node's session, sequence,
    notices and timers), built without deepcopy so it can run on every input.
    mask=(peer_id, addr): leave out that peer's drops and the last_rx of its
    path at addr (what a duplicate may legitimately change)."""
    peers = []
    for peer_id, p in node.table.peers.items():
        masked = mask is not None and peer_id == mask[0]
        peers.append((
            peer_id,
            tuple((a, x.relayed, x.static, None if masked and a == mask[1] else x.last_rx)
                  for a, x in p.paths.items()),
            p.last_rx, p.up, p.rx_packets, p.rx_bytes, p.tx_packets, p.tx_bytes, p.relayed_packets,
            None if masked else dict(p.drops),
            p.replay_floor,
            tuple((dst, w.floor, tuple((s, ts, n, bytes(b)) for s, ts, n, b in w.bitmaps()))
                  for dst, w in p.replay.items()),
        ))
    return (tuple(peers), node.session, node._ts, node._seq, len(node.notices), len(node._timers))


def helpers_fingerprint(node: Node, mask: tuple | None = None) -> object:
    """protocol_helpers.peer_state itself (slower: deep copies), with the same mask."""
    state = ph.peer_state(node)
    if mask is not None and mask[0] in state:
        s = state[mask[0]]
        s["drops"] = None
        if mask[1] in s["paths"]:
            s["paths"][mask[1]] = s["paths"][mask[1]][:3]
    return state


# ---------------------------------------------------------------- the harness

class Harness:
    def __init__(self, seed: int = 1, fingerprint=fingerprint, check_every_state: bool = True):
        self.seed = seed
        self.rng = random.Random(seed)
        self._node_rng = random.Random(seed * 7919 + 17)   # sessions and keys
        self.fingerprint = fingerprint
        self.check_state = check_every_state
        self.keys = {n: _seeded_genkey(self._node_rng) for n in NAMES}
        self.entries = {n: secrets_of(n, self.keys) for n in NAMES}
        self.pairs = {n: pairs_with_key(self.entries[n]) for n in NAMES}
        self.nodes = {n: Node(settings_of(n), self.entries[n], START + OFFSET[n],
                              random_bytes=self._node_rng.randbytes) for n in NAMES}
        # Peer.replay_floor: nothing stamped in or before the start second is accepted
        self.floor = {n: int(START + OFFSET[n]) + 1 for n in NAMES}
        self.group_key = crypto.derive_group_key(GROUP)
        self.other_group_key = crypto.derive_group_key(OTHER_GROUP)
        self.psk_keys = {n: crypto.derive_psk_key(k) for n, k in self.keys.items()}
        self.now = T0
        self.index = 0
        # the oracle
        self.sealed: dict[bytes, Sealed] = {}           # datagram[2:] -> what was sealed
        self.idents: dict[tuple, bytes] = {}            # nonce identity -> datagram[2:]
        self.accepted = {n: set() for n in NAMES}       # identities each node accepted
        self.wire: collections.deque = collections.deque()   # (datagram, from, to) in flight
        self.history: list[tuple[bytes, tuple, tuple]] = []  # recent real datagrams
        self.accepted_ring: list[tuple[bytes, str, tuple]] = []  # (datagram, receiver, from)
        self._hist_i = self._acc_i = 0
        self._schedule: list[str] = []
        # figures
        self.family_counts: collections.Counter = collections.Counter()
        self.outcomes: collections.Counter = collections.Counter()      # (family, outcome)
        self.drop_hist: collections.Counter = collections.Counter()     # "global:malformed"
        self.classes: collections.Counter = collections.Counter()       # unauth / dup / fresh
        self.extra_loop = 0                            # loop drops beyond one per input
        self.sealed_count = 0
        self.lost = 0                                  # sent to an address no node owns
        self.last: tuple | None = None                 # the last input, for the reproducer

    # ------------------------------------------------------------ clocks
    def clock(self, name: str) -> float:
        return self.now + OFFSET[name]

    # ------------------------------------------------------------ real traffic
    def _record(self, datagram: bytes, sender: str, inner: bytes | None) -> None:
        tail = datagram[MUTABLE_BYTES:]
        if tail in self.sealed:
            return                       # a delayed or multi-path copy: same bytes
        h, _ = wire.peek(self.group_key, datagram)
        ident = (h.src, h.dst, h.session, h.ts, h.seq)
        if h.src != ph.pid(sender):
            raise Violation(f"{sender} sealed a datagram with src {h.src}")
        if ident in self.idents:
            old = self.sealed[self.idents[ident]]
            raise Violation(f"nonce reused by {sender}: {ident!r} kind {h.kind} flags {h.flags} len {len(datagram)}; before: kind {old.kind}")
        if h.kind in (KIND_KEEPALIVE, KIND_REPORT):
            inner = b""
        elif inner is None:
            raise Violation(f"{sender} sent a data datagram the harness never gave it: {datagram.hex()}")
        self.sealed[tail] = Sealed(h.src, h.dst, h.kind, ident, inner, self.now)
        self.idents[ident] = tail
        self.sealed_count += 1

    def _push(self, sends, frm: tuple) -> None:
        for datagram, to in sends:
            self.wire.append((datagram, frm, to))
            self._remember(datagram, frm, to)

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

    def originate(self, s) -> None:
        sender = s.choice(("16.1", "16.2", "1.1"))
        packet = self.inner_packet(s, sender)
        out = self.nodes[sender].from_tun([packet], self.clock(sender))
        for datagram, _ in out.sends:
            self._record(datagram, sender, packet)
        self._push(out.sends, ADDR[sender])

    def tick(self) -> None:
        for name, node in self.nodes.items():
            out = node.tick(self.clock(name))
            for datagram, _ in out.sends:
                self._record(datagram, name, None)
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
            return name, wire.seal(self.group_key, pair, header, payload), ADDR[src], self._no_key_reason(
                name, header.src, header.dst, DropReason.AUTH_FAILURE)
        if family == "bad_body":
            if s.chance(0.5):      # the exact header of a real datagram
                datagram, frm, to = self._some_real(s)
                header = wire.peek(self.group_key, datagram)[0]
                length = len(datagram) - HEADER_SIZE
                name = self._receiver(s, to)
            else:                  # a fresh valid header
                src, dst = self._pair(s)
                header = self._header(s, src, dst)
                length = s.int(TAG_SIZE, 1500)
                frm, name = ADDR[src], self._receiver(s, ADDR[dst])
            body = s.bytes(length)
            raw = header.pack()
            mask = crypto.header_mask(self.group_key, body[-TAG_SIZE:])
            data = (int.from_bytes(raw, "big") ^ mask).to_bytes(HEADER_SIZE, "big") + body
            return name, data, frm, self._no_key_reason(name, header.src, header.dst, DropReason.AUTH_FAILURE)
        raise ValueError(f"unknown family {family!r}")

    def _ttl(self, data: bytes) -> int:
        return data[0] ^ crypto.header_mask(self.group_key, data[-TAG_SIZE:]).to_bytes(HEADER_SIZE, "big")[0]

    def _no_key_reason(self, name: str, src: int, dst: int, otherwise: DropReason) -> DropReason:
        """UNKNOWN_PEER when the receiver holds no key for (src, dst) or src is itself."""
        lo, hi = min(src, dst), max(src, dst)
        if src == ph.pid(name) or (lo, hi) not in self.pairs[name]:
            return DropReason.UNKNOWN_PEER
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
        if self.index % TICK_EVERY == 0:
            self.tick()
        if self.index % PRUNE_EVERY == 0:
            self.prune()
        return outcome

    def feed(self, name: str, data: bytes, frm: tuple, family: str = "direct",
             expect: DropReason | None = None) -> str:
        """Node.from_udp on one input, and the invariant for it."""
        node = self.nodes[name]
        me = node.me
        now = self.clock(name)
        rec = self.sealed.get(data[MUTABLE_BYTES:]) if len(data) >= MIN_DATAGRAM else None
        if rec is not None and self._no_key_reason(name, rec.src, rec.dst, None) is not None:
            klass, expect = "unauth", DropReason.UNKNOWN_PEER     # reflected, or a pair we hold no key for
        elif rec is None:
            klass = "unauth"
        elif rec.ident in self.accepted[name]:
            klass = "dup"
        else:
            ts = rec.ident[3]
            stale = ts < self.floor[name] or abs(ts - int(now)) > REPLAY_WINDOW
            klass = "stale" if stale else "fresh"
        self.classes[klass] += 1
        peer = node.table.peers.get(rec.src) if klass != "unauth" else None
        tot0 = ph.total_drops(node)
        g0 = node.global_drops.copy()
        p0 = peer.drops.copy() if peer is not None else None
        fp0 = None
        if self.check_state:
            if klass == "unauth":
                fp0 = self.fingerprint(node)
            elif klass in ("dup", "stale"):
                fp0 = self.fingerprint(node, (rec.src, frm))
        if peer is not None:
            rx0, last0, rel0 = peer.rx_packets, peer.last_rx, peer.relayed_packets
            paths0 = {a: p.last_rx for a, p in peer.paths.items()}
        held0, shards0 = held_shards(node), node.relayed_shards
        try:
            out = node.from_udp([(data, frm)], now)
        except Exception:  # noqa: BLE001  (any exception escaping is the violation)
            raise Violation("exception escaped from Node.from_udp:\n" + traceback.format_exc()) from None
        tot1 = ph.total_drops(node)
        gd = node.global_drops - g0
        pd = (peer.drops - p0) if peer is not None else collections.Counter()
        ngd, npd = sum(gd.values()), sum(pd.values())
        if ngd + npd != tot1 - tot0:
            raise Violation(f"drops changed elsewhere: {tot1 - tot0} counted, global {dict(gd)}, "
                            f"source peer {dict(pd)} ({klass})")
        for r, n in gd.items():
            self.drop_hist[f"global:{r.value}"] += n
        for r, n in pd.items():
            self.drop_hist[f"peer:{r.value}"] += n

        def fail(what: str) -> None:
            raise Violation(f"{klass} input at {name}: {what}; tun={len(out.tun)} sends={len(out.sends)} "
                            f"global drops {dict(gd)} peer drops {dict(pd)}")

        if klass == "unauth" and not (ngd or npd) and not out.tun:
            # a well-formed shard header: held, or relayed by header; nothing else changes
            if out.sends:
                m = crypto.header_mask(self.group_key, data[-TAG_SIZE:]).to_bytes(HEADER_SIZE, "big")
                if node.relayed_shards != shards0 + 1 or not (data[3] ^ m[3]) & FLAG_FRAG:
                    fail("relayed something that is not a shard, or did not count it")
                if any(d[MUTABLE_BYTES:] != data[MUTABLE_BYTES:] or to == frm for d, to in out.sends):
                    fail("a relayed shard is not the input, or went back where it came from")
                outcome = "relayed_shard"
            elif held_shards(node) == held0 + 1:
                outcome = "held"
            else:
                fail("neither dropped, held nor relayed")
            if fp0 is not None and self.fingerprint(node) != fp0:
                fail("a shard changed per-peer state")
        elif klass in ("unauth", "dup", "stale"):
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
                if fp0 is not None and self.fingerprint(node, (rec.src, frm)) != fp0:
                    fail("changed state beyond the source peer's drops and path last_rx")
                refresh = pd[DropReason.DUPLICATE] and rec.dst == me and frm in paths0
                after = peer.paths[frm].last_rx if frm in peer.paths else None
                if after != (now if refresh else paths0.get(frm)):
                    fail(f"path last_rx {paths0.get(frm)} -> {after}, refresh expected: {bool(refresh)}")
            outcome = "dropped"
        else:   # fresh: must be accepted exactly once
            if ngd:
                fail("an authenticated datagram counted a global drop")
            if rec.dst == me:
                if out.sends:
                    fail("a datagram for us was also sent on")
                if peer.rx_packets != rx0 + 1 or peer.last_rx != now or peer.paths.get(frm) is None \
                        or peer.paths[frm].last_rx != now:
                    fail("an accepted datagram for us did not count rx / learn its path")
                if rec.kind in (KIND_KEEPALIVE, KIND_REPORT):
                    # a loss report may be malformed only if we sealed it so: never
                    if out.tun or npd:
                        fail("a keepalive or loss report for us was not consumed silently")
                    outcome = "consumed"
                elif not node.settings.has_tun:
                    if out.tun or npd != 1 or pd[DropReason.NO_TUN] != 1:
                        fail("data for a node without TUN: not exactly one no_tun drop")
                    outcome = "dropped"
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
                m = crypto.header_mask(self.group_key, data[-TAG_SIZE:]).to_bytes(HEADER_SIZE, "big")
                ttl = self._ttl(data)
                if ttl <= 1:
                    if out.sends or npd != 1 or pd[DropReason.TTL] != 1:
                        fail("ttl <= 1: not exactly one ttl drop")
                    outcome = "dropped"
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
                        if d[0] ^ m[0] != ttl - 1 or d[1] ^ m[1] != PATH_RELAYED:
                            fail(f"relay header ttl {d[0] ^ m[0]} path {d[1] ^ m[1]} (input ttl {ttl})")
                    self._push(out.sends, ADDR[name])
                    outcome = "relayed"
                else:
                    if peer.relayed_packets != rel0:
                        fail("counted a relay that sent nothing")
                    if not (pd == {DropReason.NO_PATH: 1} or (npd >= 1 and set(pd) == {DropReason.LOOP})):
                        fail("nothing relayed: not one no_path drop (or loop drops only)")
                    outcome = "dropped"
            if rec.dst == me or not (pd[DropReason.TTL] or pd[DropReason.NO_PATH]):
                self.accepted[name].add(rec.ident)
            entry = (data, name, frm)
            if len(self.accepted_ring) < HISTORY:
                self.accepted_ring.append(entry)
            else:
                self.accepted_ring[self._acc_i] = entry
                self._acc_i = (self._acc_i + 1) % HISTORY
        if outcome == "dropped" and npd + ngd == 0:
            fail("neither delivered, relayed, consumed nor counted")
        # beyond one drop per dropped input only the loop guard counts (once per
        # skipped target, also when the input was relayed to another target)
        self.extra_loop += npd + ngd - (outcome == "dropped")
        self.family_counts[family] += 1
        self.outcomes[(family, outcome)] += 1
        return outcome

    # ------------------------------------------------------------ running and reporting
    def warm_up(self) -> None:
        """Let the mesh form: keepalives so servers learn the clients' paths."""
        s = RandomSource(self.rng)
        for _ in range(4):
            self.tick()
            while self.wire:
                got = self.next_in_flight(s)
                if got is None:
                    break
                datagram, frm, to = got
                self.feed(BY_ADDR[to], datagram, frm, "warmup")
            self.now += 1.0
        # the figures count the fuzz inputs only
        self.family_counts.clear()
        self.outcomes.clear()
        self.drop_hist.clear()
        self.classes.clear()
        self.extra_loop = 0

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
        lines.append(f"real datagrams sealed {self.sealed_count}, sent to addresses no node owns {self.lost}")
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
