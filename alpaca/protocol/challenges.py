"""Challenges: sessions and paths proven live (docs/protocol.md §5).

A node accepts a peer's traffic for itself only from a session that
answered one of its challenges, and a learned path carries more than it
brought only once a challenge sent on it was answered. Each challenge on one
of our ways to a peer is also a probe of that way (peers.Probe), and a
challenge padded to a size probes the way's MTU (pmtu.py).
"""

from __future__ import annotations


from . import pmtu
from .constants import CAP_AES, KIND_CHALLENGE, KIND_RESPONSE, OVERHEAD, PATH_DIRECT
from .constants import NONCE_SIZE, CHALLENGE_INTERVAL, RESPONSE_LIMIT
from .drops import DropReason
from .ids import format_id
from .output import Output
from .peers import CHALLENGE_WINDOW, Addr, Peer
from .wire import Header


class Challenges:
    """Methods of Node (node.py): they share its state."""

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
            out.sends.append((self._seal(KIND_CHALLENGE, peer.id, key, nonce, now, caps=True), target))

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
            if reason is DropReason.REPLAY and header.session not in src.verified:
                # a replay, or a new session whose clock is not the one we
                # measured (it was set): measure it, as for unverified data
                self._challenge(src, addr, header.path != PATH_DIRECT, now, out)
            return
        src.saw_clock(header.session, header.ts, now)       # (its answer may not date itself back)
        second = int(now)
        if src.responses[0] != second:
            src.responses[0], src.responses[1] = second, 0
        if src.responses[1] >= RESPONSE_LIMIT:
            src.drops[DropReason.RATE_LIMITED] += 1
            return
        src.responses[1] += 1
        out.heard.add(addr)
        # what we can do, in the padding, only when the challenge has padding
        # too: the answer must stay no bigger than an older release's challenge
        response = self._seal(KIND_RESPONSE, src.id, key, nonce, now, caps=header.pad > 0)
        targets = [a for a in self._towards(src, now) if a != addr]
        if len(response) <= size or addr in src.paths and src.paths[addr].proven:
            targets.insert(0, addr)
        out.sends.extend((response, a) for a in targets)
        if header.session not in src.verified or src.clock_moved(header.session, header.ts, now):
            self._challenge(src, addr, header.path != PATH_DIRECT, now, out)     # and prove (or measure) theirs

    def _on_response(self, src: Peer, header: Header, plaintext: bytes, size: int, addr: Addr, now: float,
                     out: Output) -> None:
        """An answer to one of our challenges: its session is live (from this
        answer on) and the address the challenge went to reaches the peer."""
        end = len(plaintext) - header.pad
        challenge = src.challenge_done(plaintext[:end], True, now)
        if challenge is None:
            # a nonce we are not waiting for: another copy of an answer we
            # took (it is sent on every path), or a stale or replayed one
            src.drops[DropReason.DUPLICATE if header.session in src.verified else DropReason.REPLAY] += 1
            return
        sent, target, relayed, _, _ = challenge
        self._session_proven(src, header, sent, now)
        # the first padding byte: what the peer's session can do (none from an older release)
        aes = bool(header.pad and plaintext[end] & CAP_AES)
        if aes != src.aes and self.settings.aes:
            self.notices.append(f"peer {format_id(src.id)}: data on direct paths sealed with "
                                f"{'AES-256-GCM' if aes else 'XChaCha20-Poly1305 (it does not open AES-256-GCM)'}")
        src.aes = aes
        src.prove(target, relayed, now)
        self._learn(src, header, addr, size, now, out)

    def _path_mtus(self, now: float, out: Output) -> None:
        """Probe the MTU of our ways to the peers we send big messages to
        (bigger than pmtu.FLOOR): pmtu.PathMtu says which sizes, when. Each
        round is a few padded challenges and one small one per way, at most
        every pmtu.RETRY: a budget of its own, apart from CHALLENGE_INTERVAL
        (which bounds what others can make us send)."""
        full = self.settings.max_datagram
        for peer_id in list(self._sending_big):      # (not the whole table: it may hold 65k peers)
            peer = self.table.get(peer_id)
            if peer is None or now - peer.sent_big > pmtu.ACTIVE:
                self._sending_big.discard(peer_id)   # (a TCP sender in backoff sends rarely: kept for ACTIVE)
                continue
            key = self.table.pair_key(self.me, peer.id)
            if key is None:
                continue
            for way in self._towards(peer, now):
                probe = peer.probe_of(way)
                mtu = probe.mtu
                before = mtu.limit
                sizes = mtu.step(full, probe.last_answer, now)
                if mtu.limit != before:
                    self._mtu_notice(peer, way, mtu.limit)
                    peer.note_limits()
                if sizes:
                    for size in [0] + sizes:
                        self._mtu_probe(peer, key, way, size, now, out)

    def _mtu_probe(self, peer: Peer, key: bytes, way: Addr, size: int, now: float, out: Output) -> None:
        """A challenge on `way`, padded to a datagram of `size` bytes (0: a small one)."""
        nonce = self._random_bytes(NONCE_SIZE)
        pad = max(size - OVERHEAD - NONCE_SIZE, 0)
        path = peer.paths.get(way)
        peer.challenge_sent(nonce, way, path is None or path.relayed, size == 0, now, size)
        out.sends.append((self._seal(KIND_CHALLENGE, peer.id, key, nonce, now, pad=pad, caps=True), way))

    def _mtu_notice(self, peer: Peer, way: Addr, limit: int | None) -> None:
        where = f"peer {format_id(peer.id)} via {way[0]}:{way[1]}"
        if limit is None:
            self.notices.append(f"{where}: full-size datagrams pass again; no longer split")
            return
        self.notices.append(
            f"{where}: datagrams over {limit} bytes are lost without an ICMP error (a path MTU black hole); "
            f"sending them as shards of at most {limit} bytes (mtu {limit - self.settings.max_datagram + self.settings.mtu}"
            f" or less avoids the split)")
