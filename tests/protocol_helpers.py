"""Helpers for the tier-1 protocol tests (no root, no sockets, no clock).

Peers are named by their `a.b` text; each has a fake UDP address in
192.0.2.0/24 (TEST-NET-1). Inner IP packets are built with struct. `Wire`
is the plain function-style "network" of the tests: it hands each datagram
to the Node owning the destination address and follows whatever that node
relays, recording every hop and every TUN write.
"""

from __future__ import annotations

import collections
import copy
import socket
import struct
from dataclasses import dataclass, field

from alpaca.protocol.constants import DEFAULT_TTL, KIND_DATA
from alpaca.protocol.crypto import derive_group_key, derive_pair_key, derive_psk_key
from alpaca.protocol.wire import Header, peek, rewrite_mutable, seal
from alpaca.protocol.ids import format_id, parse_id
from alpaca.protocol.inner import checksum
from alpaca.protocol.node import Node, NodeSettings
from alpaca.protocol.peers import PeerEntry

GROUP = "example"
NET = (10, 17)
PORT = 1040
T0 = 1_700_000_000.0            # a fixed "now" (seconds); the core never reads the clock
START = T0 - 10                 # when the test nodes start (they accept only later timestamps)
SERVERS = ("1.1", "1.2", "1.3")
EVERYONE = ("1.1", "1.2", "1.3", "16.1", "16.2")
INTERNET = "8.8.8.8"

_HOST = {"1.1": 1, "1.2": 2, "1.3": 3, "1.4": 4, "16.1": 161, "16.2": 162, "16.9": 169}


def pid(peer: str | int) -> int:
    """A peer ID from its `a.b` text (an int is taken as it is)."""
    return peer if isinstance(peer, int) else parse_id(peer)


def psk(text: str) -> str:
    """A long pre-shared key string per peer (distinct beyond any short prefix)."""
    return f"test-psk-{text}-" + "q" * 40 + text


def addr(text: str) -> tuple[str, int]:
    """The fake public UDP address of a peer."""
    return (f"192.0.2.{_HOST[text]}", PORT)


def tun_ip(text: str) -> str:
    a, b = text.split(".")
    return f"{NET[0]}.{NET[1]}.{a}.{b}"


def entries(ids=EVERYONE, static=SERVERS, keys: dict[str, str] | None = None) -> dict[int, PeerEntry]:
    """secrets.txt as the core sees it. `static`: the peers whose own fake address
    is given (by default the servers), or a dict name -> static address."""
    keys = keys or {}
    where = static if isinstance(static, dict) else {t: addr(t) for t in static}
    return {pid(t): PeerEntry(keys.get(t, psk(t)), where.get(t)) for t in ids}


def make_node(me: str, ids=EVERYONE, static=SERVERS, now: float = START, mode: str | None = None,
              gateway: str | None = None, forwarders=(), group: str = GROUP,
              keys: dict[str, str] | None = None, trust_test_session: bool = True,
              peer_entries: dict[int, PeerEntry] | None = None, **settings) -> Node:
    """A Node for `me`; its peers are `ids` (as entries() makes them) or `peer_entries`."""
    if mode is None:
        mode = "server" if pid(me) < pid("16.0") else "client"
    ids = tuple(ids) if me in ids else tuple(ids) + (me,)
    s = NodeSettings(my_id=pid(me), net=NET, group=group, mode=mode,
                     gateway=pid(gateway) if gateway else None,
                     forwarders=tuple(pid(f) for f in forwarders), **settings)
    node = Node(s, entries(ids, static, keys) if peer_entries is None else peer_entries, now)
    if trust_test_session:
        trust(node, TEST_SESSION)
    return node


TEST_SESSION = b"\x07" * 8     # make_datagram's default session


def trust(node: Node, session: bytes, peers=None) -> None:
    """Take `session` as proven live from every peer (or those named), as if
    it had answered a challenge before anything it sealed: the shortcut of
    tests that are not about challenges (tests/test_challenge.py is)."""
    wanted = None if peers is None else {pid(p) for p in peers}
    for peer_id, peer in node.table.peers.items():
        if wanted is None or peer_id in wanted:
            peer.verify(session, 0, -1, START)


def name(node: Node) -> str:
    return format_id(node.me)


# ---------------------------------------------------------------- inner packets

def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 1) -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack(">H", checksum(header)) + header[12:]
    return header + payload


def udp(src: str, dst: str, sport: int = 40000, dport: int = 443, data: bytes = b"hello") -> bytes:
    return ipv4(src, dst, 17, struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data)


def ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return struct.pack(">IHBB16s16s", 0x6 << 28, len(payload), next_header, hop_limit,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def udp6(src: str, dst: str, sport: int = 40000, dport: int = 443, data: bytes = b"hello6") -> bytes:
    return ipv6(src, dst, 17, struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data)


SYN, ACK, PSH = 0x02, 0x10, 0x08


def tcp(src: str, dst: str, sport: int = 40000, dport: int = 443, flags: int = ACK, data: bytes = b"") -> bytes:
    segment = struct.pack(">HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, flags, 65535, 0, 0) + data
    return ipv4(src, dst, 6, segment)


# ---------------------------------------------------------------- datagrams

def pair_key(a: str | int, b: str | int, group: str = GROUP, keys: dict[str, str] | None = None) -> bytes:
    bigger = a if pid(a) > pid(b) else b
    key_text = keys[bigger] if keys and bigger in keys else psk(bigger)
    return derive_pair_key(derive_group_key(group), derive_psk_key(key_text), pid(a), pid(b))


def make_datagram(src: str, dst: str, payload: bytes, ts: float = T0, seq: int = 0,
                  session: bytes = b"\x07" * 8, ttl: int = DEFAULT_TTL, path: int = 0,
                  kind: int = KIND_DATA, pad: int = 0, group: str = GROUP,
                  keys: dict[str, str] | None = None, key: bytes | None = None) -> bytes:
    """A datagram exactly as peer `src` would seal it (made without a Node);
    `key`: the pair key to seal it with instead of the one src and dst share."""
    header = Header(ttl, path, kind, pid(src), pid(dst), session, int(ts), seq, pad)
    key = pair_key(src, dst, group, keys) if key is None else key
    return seal(derive_group_key(group), key, header, payload + bytes(pad))


def header_of(datagram: bytes, group: str = GROUP) -> Header:
    return peek(derive_group_key(group), datagram)[0]


def relayed(datagram: bytes, group: str = GROUP, ttl: int | None = None, path: int = 1) -> bytes:
    """What a forwarder makes of a datagram: TTL-1 (or `ttl`), path byte set."""
    header, mask = peek(derive_group_key(group), datagram)
    return rewrite_mutable(datagram, mask, header.ttl - 1 if ttl is None else ttl, path)


def data_only(sends, group: str = GROUP):
    """Drop keepalives from a list of (datagram, addr)."""
    return [(d, a) for d, a in sends if header_of(d, group).kind == KIND_DATA]


# ---------------------------------------------------------------- moving datagrams

@dataclass
class Delivery:
    tun: dict[str, list[bytes]] = field(default_factory=lambda: collections.defaultdict(list))
    hops: list[tuple[tuple, tuple, bytes]] = field(default_factory=list)   # (from, to, datagram)
    lost: list[tuple[tuple, bytes]] = field(default_factory=list)          # sent to nobody we know

    def targets(self, sender: str) -> list[tuple]:
        return [to for frm, to, _ in self.hops if frm == addr(sender)]


class Wire:
    """The network between Node objects: datagrams go to the node whose fake
    address they were sent to, in FIFO order, with one `now` for the whole run.
    `skews`: seconds a node's clock is ahead of that `now`, by name."""

    def __init__(self, *nodes: Node, trusted: bool = True, skews: dict[str, float] | None = None):
        self.nodes = {addr(name(n)): n for n in nodes}
        self.skews = skews or {}
        if trusted:         # every node's session proven at every other (tests/test_challenge.py does it for real)
            for a in nodes:
                for b in nodes:
                    if a is not b:
                        trust(b, a.session, (name(a),))

    def run(self, sends, sender: str | tuple, now: float, max_hops: int = 200) -> Delivery:
        frm0 = addr(sender) if isinstance(sender, str) else sender
        queue = collections.deque((dg, frm0, to) for dg, to in sends)
        result = Delivery()
        while queue:
            assert len(result.hops) < max_hops, "datagrams are looping"
            dg, frm, to = queue.popleft()
            result.hops.append((frm, to, dg))
            node = self.nodes.get(to)
            if node is None:
                result.lost.append((to, dg))
                continue
            out = node.from_udp([(dg, frm)], self.clock(node, now))
            result.tun[name(node)].extend(out.tun)
            for dg2, to2 in out.sends:
                # split horizon holds for every relay of every test (answers
                # to challenges go back where the challenge came from)
                assert to2 != frm or not header_of(dg2).path, f"{name(node)} relayed a datagram back to {frm}"
                queue.append((dg2, to, to2))
        return result

    def clock(self, node: Node, now: float) -> float:
        return now + self.skews.get(name(node), 0.0)

    def originate(self, node: Node, packets: list[bytes], now: float) -> Delivery:
        return self.run(node.from_tun(packets, self.clock(node, now)).sends, name(node), now)

    def tick(self, node: Node, now: float) -> Delivery:
        return self.run(node.tick(self.clock(node, now)).sends, name(node), now)


# ---------------------------------------------------------------- observing state

def peer_state(node: Node) -> dict:
    """Everything per peer that unauthenticated input must not change."""
    state = {}
    for peer_id, p in node.table.peers.items():
        state[peer_id] = {
            "paths": {a: (x.addr, x.relayed, x.static, x.last_rx) for a, x in p.paths.items()},
            "last_rx": p.last_rx, "up": p.up,
            "counters": (p.rx_packets, p.rx_bytes, p.tx_packets, p.tx_bytes, p.relayed_packets),
            "drops": dict(p.drops),
            "replay": _replay_state(p),
        }
    state["node"] = (node.session, node._ts, node._seq, len(node.notices), len(node._timers))
    return state


def _replay_state(peer) -> object:
    windows = peer.replay if isinstance(peer.replay, dict) else {None: peer.replay}
    return ({dst: copy.deepcopy(w.sessions) for dst, w in windows.items()},
            getattr(peer, "replay_floor", None))


def full_path_of(node: Node, monkeypatch) -> list[bytes]:
    """The datagrams that reach the node's full receive path (Node._receive)
    from now on, not a prediction (inbound._Next, _Single, relay._RelayNext)."""
    seen = []
    receive = node._receive
    monkeypatch.setattr(node, "_receive", lambda data, *a: (seen.append(data), receive(data, *a)))
    return seen


def total_drops(node: Node) -> int:
    return sum(node.global_drops.values()) + sum(sum(p.drops.values()) for p in node.table.peers.values())
