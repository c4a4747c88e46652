"""Inbound: a datagram from UDP, for this node (docs/protocol.md §5-6, §12).

  1. unmask the header (group key) -> pair key -> AEAD open, or for a shard
     its MAC. Any failure is a global drop and changes nothing else.
  2. for someone else: relay.py. Challenges and answers: challenges.py.
  3. for me: a session proven live by a challenge, the replay window, then
     learn the path it came on; a shard goes to reassembly, a whole message
     to the TUN (keepalives and reports stop here).
The next shard of a message in progress is predicted (_Next) and still has
its MAC, the replay window and the filing checked; so is the next whole
data datagram from an address (_Single), which still has its AEAD, the
replay window and its source checked, and the next shard to relay
(relay._RelayNext), which still has its MAC and the relay window checked.
"""

from __future__ import annotations

import ipaddress

from . import inner
from .constants import (FLAG_AES, FLAG_BATCH, FLAG_FRAG, FLAG_ISAL, FLAG_VNET, KIND_CHALLENGE, KIND_DATA, KIND_KEEPALIVE,
                        KIND_MAX, KIND_REPORT, KIND_RESPONSE, KNOWN_FLAGS, MASK_SIZE, MIN_DATAGRAM, PATH_DIRECT,
                        TAG_SIZE, VNET_HDR_SIZE, WIRE_VERSION)
from .constants import (PRUNE_INTERVAL, PATH_NOTICES_PER_INTERVAL, HOST_CACHE_LIMIT, ZERO_VNET, INNER_HEAD,
                        BATCH_ENTRY, VERSION_NOTICE_INTERVAL)
from .crypto import MAC_SIZE, CryptoError
from .drops import DropReason
from .ids import format_id
from .output import Output
from .peers import MESSAGE_WINDOW, OWN_WINDOW, Addr, Peer
from .wire import (NEXT_SHARD, SAME_SENDER_BITS, SAMPLE, SEQ_FIELD, SEQ_SHIFT, SHARD_OVERHEAD, Header,
                   fields, open_clear, open_message, open_sealed, shard_authentic)


NEXT_LIMIT = 16        # source addresses with a shard predicted (a few paths of a few peers)
SINGLES_LIMIT = 4096   # source addresses with a whole datagram predicted (a server's clients)


class _Next:
    """The shard expected next from one address (Node.from_udp): its 32
    unmasked bytes as an int, its size, and what filing it needs. Shards
    lost on the way only move it on (`skip`); after its message is decoded
    it still predicts the late parity (`done`: filed as surplus)."""
    __slots__ = ("clear", "addr", "size", "src", "rkey", "slot", "index", "shard_key", "last", "total", "done")

    def __init__(self, clear: int, addr: Addr, src: Peer, rkey: tuple, slot, index: int, shard_key: bytes):
        self.clear, self.addr, self.src, self.rkey, self.slot = clear, addr, src, rkey, slot
        self.index, self.shard_key = index, shard_key
        self.last = slot.k - 1                                      # the short data chunk
        self.total = slot.k + slot.m
        self.size = MASK_SIZE + (slot.last if index == self.last else slot.size) + MAC_SIZE
        self.done = False

    def skip(self, j: int) -> bool:
        """Expect the shard j after the one expected; False when there is none."""
        self.index += j
        if self.index >= self.total:
            return False
        self.clear += j * NEXT_SHARD
        self.size = MASK_SIZE + (self.slot.last if self.index == self.last else self.slot.size) + MAC_SIZE
        return True

    def advance(self) -> bool:
        return self.skip(1)


class _Single:
    """What the next whole data datagram from one address is expected to
    be (Node.from_udp): the last one taken from there, but for its seq (and
    its ciphertext). Made only from an authenticated datagram for this node,
    on a proven path; `header` is that datagram's, whose seq is not read."""
    __slots__ = ("same", "addr", "src", "key", "header")

    def __init__(self, same: int, addr: Addr, src: Peer, key: bytes, header: Header):
        self.same, self.addr, self.src, self.key, self.header = same, addr, src, key, header


class Inbound:
    """Methods of Node (node.py): they share its state."""

    def from_udp(self, datagrams: list[tuple[bytes, Addr]], now: float) -> Output:
        out = Output()
        state, from_bytes, nexts, singles, relays = (self._mask_state, int.from_bytes, self._next, self._singles,
                                                     self._relay_next)
        i, n = 0, len(datagrams)
        tried = None                        # the message a whole train was tried for (_whole)
        while i < n:
            data, addr = datagrams[i]
            i += 1
            if len(data) < MIN_DATAGRAM:
                self.global_drops[DropReason.MALFORMED] += 1
                continue
            h = state.copy()                # wire.unmask, inlined: once per datagram
            h.update(data[-SAMPLE:])
            full = from_bytes(h.digest(), "big")
            clear = from_bytes(data[:MASK_SIZE], "big") ^ full
            # The next shard of a message in progress from this address (a
            # sender sends a message's shards on a path in order) is
            # predicted exactly: same header but seq + j, index + j, where
            # j - 1 shards were lost. It still has its MAC, the replay window
            # and the filing checked; only the parsing is skipped. So are the
            # shards after it in the batch (a GRO train): _train.
            nxt = nexts.get(addr) if nexts else None
            if nxt is not None:
                gap = clear - nxt.clear
                taken = -1
                if gap == 0:
                    if len(data) == nxt.size:
                        if nxt.slot is not tried:       # (a forged shard would fail it for each after it)
                            tried = nxt.slot
                            taken = self._whole(nxt, clear, data, datagrams, i, now, out)
                        if taken < 0:
                            taken = self._train(nxt, clear, data, datagrams, i, now, out)
                elif gap > 0 and not gap % NEXT_SHARD:
                    taken = self._skip_to(nxt, gap // NEXT_SHARD, clear, data, datagrams, i, now, out)
                if taken >= 0:
                    i += taken
                    continue
            # likewise the next shard of a message this node relays
            relay_next = relays.get(addr) if relays else None
            if relay_next is not None and clear == relay_next.clear:
                taken = self._relay_train(relay_next, full, data, datagrams, i, addr, now, out)
                if taken >= 0:
                    i += taken
                    continue
            # the next whole datagram from a sender: only the parsing is skipped
            single = singles.get(addr) if singles else None
            if (single is not None and clear & SAME_SENDER_BITS == single.same
                    and self._next_single(single, clear, data, now, out)):
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
        if flags & FLAG_AES and not self.settings.aes:
            self._aes_unsupported(addr, now)
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
            if self._relay(header, full, data, plaintext, addr, src, now, out) and shard is not None:
                self._predict_relay(src, header, shard, addr)
        elif kind == KIND_CHALLENGE:
            self._on_challenge(src, header, plaintext, len(data), addr, now, out)
        elif kind == KIND_RESPONSE:
            self._on_response(src, header, plaintext, len(data), addr, now, out)
        elif self._accept(src, header, data, plaintext, shard, addr, now, out) and plaintext is not None:
            self._predict_single(src, header, clear, key, addr)

    def _wrong_version(self, addr: Addr, version: int, now: float) -> None:
        self.global_drops[DropReason.WRONG_VERSION] += 1
        if now >= self._next_version_notice:
            self._next_version_notice = now + VERSION_NOTICE_INTERVAL
            self.notices.append(f"datagrams of wire version {version} from {addr[0]}:{addr[1]} (this release "
                                f"speaks {WIRE_VERSION}): every peer of a group must run a release of the same "
                                f"wire version; counted as wrong_version, not logged for {VERSION_NOTICE_INTERVAL:.0f} s")

    def _aes_unsupported(self, addr: Addr, now: float) -> None:
        """A datagram sealed with AES-256-GCM for a node that does not use it:
        its sender took an older answer of ours (we restarted without it),
        or it is garbage (nothing here is authenticated yet)."""
        self.global_drops[DropReason.AEAD_UNSUPPORTED] += 1
        if now >= self._next_aes_notice:
            self._next_aes_notice = now + VERSION_NOTICE_INTERVAL
            self.notices.append(f"datagrams sealed with AES-256-GCM from {addr[0]}:{addr[1]}, which this node does "
                                f"not open (config aead is xchacha20poly1305, or the CPU has no AES instructions); "
                                f"the sender switches once our next answer to its challenge tells it; counted as "
                                f"aead_unsupported, not logged for {VERSION_NOTICE_INTERVAL:.0f} s")

    def _accept(self, src: Peer, header: Header, data: bytes, plaintext: bytes | None, shard: tuple | None,
                addr: Addr, now: float, out: Output) -> bool:
        """An authenticated datagram (plaintext) or shard (shard: its fields,
        its 32 unmasked bytes and the pair's shard key) for this node. True
        when it was taken (its path learned)."""
        reason = src.check_own(header.session, header.ts, header.seq, now)
        if reason is not None:
            src.drops[reason] += 1
            if reason is DropReason.DUPLICATE:
                # another copy over another path: it keeps that path alive,
                # but only a first copy may add a path (a replay could come
                # from anywhere)
                src.refresh(addr, now)
            elif reason is DropReason.UNVERIFIED:
                src.saw_clock(header.session, header.ts, now)
                self._challenge(src, addr, header.path != PATH_DIRECT, now, out)
            return False
        if shard is not None:
            self._learn(src, header, addr, len(data), now, out)
            self._file_shard(src, header, shard, data, addr, now, out)
            return True
        return self._take(src, header, plaintext, addr, len(data), now, out)

    def _take(self, src: Peer, header: Header, plaintext: bytes, addr: Addr, size: int, now: float,
              out: Output) -> bool:
        """A whole datagram for this node that passed the own window (by the
        full path or predicted): counted, its source checked, its path
        learned, its message taken. False when its source is refused."""
        if header.kind == KIND_DATA:
            # a first copy (shards are counted by the reassembly): the
            # union of the paths. Data only: keepalives and reports must
            # not make the other end report back (loss.py)
            self.loss.count_arrived(src.id, header.ts)
            if (not header.flags & FLAG_BATCH and header.src > self.me and self.settings.has_tun
                    and self._spoofed(header.src, plaintext, header.flags)):
                src.drops[DropReason.SPOOFED] += 1      # before it can teach a path or mark the peer up
                return False
        self._learn(src, header, addr, size, now, out)
        # a single datagram's source was checked above (before it could teach a path)
        self._message(src, header, plaintext, now, out, source_checked=not header.flags & FLAG_BATCH)
        return True

    def _predict_single(self, src: Peer, header: Header, clear: bytes, key: bytes, addr: Addr) -> None:
        """After a whole data datagram was taken from addr on a proven path:
        expect the next one from there to be alike (_Single)."""
        path = src.paths.get(addr)
        if header.kind != KIND_DATA or path is None or not path.proven:
            return
        singles = self._singles
        if len(singles) >= SINGLES_LIMIT and addr not in singles:
            singles.clear()
        singles[addr] = _Single(int.from_bytes(clear, "big") & SAME_SENDER_BITS, addr, src, key, header)

    def _next_single(self, single: _Single, clear: int, data: bytes, now: float, out: Output) -> bool:
        """The predicted whole datagram: True when it was dealt with, False
        to let the full path look at it (nothing has changed then). What
        the full path does for it (_accept), less the parsing."""
        src, header = single.src, single.header
        path = src.paths.get(single.addr)
        if path is None or not path.proven:
            return False
        try:
            plaintext = open_clear(single.key, clear.to_bytes(MASK_SIZE, "big"), data)
        except CryptoError:
            return False
        if header.pad > len(plaintext):
            return False
        reason = src.check_own(header.session, header.ts, (clear >> SEQ_SHIFT) & SEQ_FIELD, now)
        if reason is DropReason.DUPLICATE:     # a copy over another path (see _accept)
            src.drops[reason] += 1
            src.refresh(single.addr, now)
            return True
        if reason is not None:
            return False            # (the window recorded nothing)
        self._take(src, header, plaintext, single.addr, len(data), now, out)
        return True

    def _learn(self, src: Peer, header: Header, addr: Addr, size: int, now: float, out: Output) -> None:
        """Paths are learned only from datagrams addressed to us: a relayed
        datagram "from src" may have been sealed by dst, who shares the key.
        A new path is challenged before it carries more than it brought."""
        relayed = header.path != PATH_DIRECT
        out.heard.add(addr)
        if src.heard(addr, relayed, now, size) is not None:
            self._path_notice(src.id, f"new {'relayed' if relayed else 'direct'} path {addr[0]}:{addr[1]}")
        if not src.paths[addr].proven:
            self._challenge(src, addr, relayed, now, out)
        if not src.up:
            src.up = True
            self.notices.append(f"peer {format_id(src.id)} up")
        if header.kind == KIND_DATA:
            self.last_data[src.id] = now        # status tells a peer carrying traffic from an idle one
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
                self._expect(_Next(int.from_bytes(clear, "big"), addr, src, rkey, filed, f.index, shard_key))
            return
        self._complete(src, header, rkey, slot, base, now, out)
        if rkey in self.reassembly.done and src.paths[addr].proven:
            # this shard completed it (a message of one shard: a FEC batch
            # of one small packet): its parity follows, predicted as surplus
            nxt = _Next(int.from_bytes(clear, "big"), addr, src, rkey, slot, f.index, shard_key)
            nxt.done = True
            self._expect(nxt)

    def _expect(self, nxt: _Next, j: int = 1) -> None:
        """Predict the shard j after `nxt`'s from its address, if the message has one."""
        if nxt.skip(j):
            if len(self._next) >= NEXT_LIMIT and nxt.addr not in self._next:
                self._next.clear()
            self._next[nxt.addr] = nxt
        else:
            self._next.pop(nxt.addr, None)

    def _skip_to(self, nxt: _Next, j: int, clear: int, data, datagrams: list, i: int, now: float,
                 out: Output) -> int:
        """The shard j - 1 after the predicted one (those between were lost
        or come later): taken as predicted (_train) when it is one of the
        message's; else, or when it fails, the prediction stays as it was."""
        index, at, size = nxt.index, nxt.clear, nxt.size
        if nxt.skip(j) and len(data) == nxt.size:
            taken = self._train(nxt, clear, data, datagrams, i, now, out)
            if taken >= 0:
                return taken
        nxt.index, nxt.clear, nxt.size = index, at, size
        return -1

    def _own_train(self, nxt: _Next) -> tuple | None:
        """Peer.check_own, its parts that cannot change during a train of
        `nxt`'s message, hoisted: (path, own window, the session's clock
        offset, the seq at or below which its message's second is refused,
        -1 for none); None when the path is no longer proven, the session
        no longer verified or the message older than its floor."""
        src, rkey = nxt.src, nxt.rkey
        path = src.paths.get(nxt.addr)
        floor = src.verified.get(rkey[1])
        window = src.replay.get(OWN_WINDOW)
        if path is None or not path.proven or floor is None or window is None or rkey[2] < floor[0]:
            return None
        return path, window, floor[3], floor[1] if rkey[2] == floor[0] else -1

    def _train(self, nxt: _Next, clear: int, data, datagrams: list, i: int, now: float, out: Output) -> int:
        """The predicted shard `data` (clear: its 32 unmasked bytes as an
        int), and after it the datagrams from datagrams[i] on as long as each
        is the next one predicted from the same address (a GRO train): each
        has its MAC, the session floor and the replay window checked and is
        filed, as the full path would. Returns how many of datagrams[i:] were
        taken besides `data`; -1 when `data` was not taken, to let the full
        path look at it (nothing has changed then). A later datagram that
        does not match or fails is left for the caller's loop."""
        src, rkey, addr = nxt.src, nxt.rkey, nxt.addr
        own = self._own_train(nxt)
        if own is None:
            return -1
        path, window, offset, seq_floor = own
        session, ts, base = rkey[1], rkey[2], rkey[3]
        check, add_next, nexts = window.check_and_accept, self.reassembly.add_next, self._next
        shard_key, state, from_bytes = nxt.shard_key, self._mask_state, int.from_bytes
        taken, size, n = -1, 0, len(datagrams)
        while True:
            head = clear.to_bytes(MASK_SIZE, "big")
            chunk = data[MASK_SIZE:-MAC_SIZE]
            index = nxt.index
            seq = base + index
            if (seq <= seq_floor
                    or not shard_authentic(shard_key, head, data)
                    or check(session, ts, seq, now, offset) is not None):
                break           # (the full path counts it: the window recorded nothing)
            taken += 1
            size += len(data)
            done = None if nxt.done else add_next(rkey, nxt.slot, index, chunk)
            if done is not False:
                self._file_rest(nxt, done, head, chunk, now, out)
                if nexts.get(addr) is not nxt:
                    break       # (decoding it replaced the prediction)
            if not nxt.advance():
                del nexts[addr]
                break
            if i + taken >= n:
                break
            data, at = datagrams[i + taken]
            if at != addr or len(data) != nxt.size:
                break
            h = state.copy()
            h.update(data[-SAMPLE:])
            clear = from_bytes(data[:MASK_SIZE], "big") ^ from_bytes(h.digest(), "big")
            if clear != nxt.clear:
                break           # (the caller's loop unmasks it again: once a train)
        if taken >= 0:
            path.last_rx = src.last_rx = now
            src.rx_bytes += size
            out.heard.add(addr)
        return taken

    def _whole(self, nxt: _Next, clear: int, data, datagrams: list, i: int, now: float, out: Output) -> int:
        """The predicted shard `data` and the datagrams after it, when they
        are the rest of its message's data shards (a GRO train holding the
        message's end): they are authenticated by the message's AEAD, one
        call, instead of a MAC each, and only then recorded in the replay
        window, filed and delivered. Returns how many of datagrams[i:] were
        taken besides `data`; -1 when they were not (nothing has changed,
        and _train checks them one by one: so a forged or damaged train
        costs one AEAD attempt more than it would there)."""
        slot, j, addr = nxt.slot, nxt.index, nxt.addr
        k, chunks = slot.k, slot.chunks
        n = k - j                           # data shards missing: data and n - 1 after it
        # (n >= j: the AEAD covers the filed chunks too, so an attempt on a
        # forged train costs at most twice the bytes that train brings)
        if (nxt.done or n < 2 or n < j or not j or i + n - 1 > len(datagrams) or len(chunks) != j
                or max(chunks) != j - 1 or self.reassembly.slots.get(nxt.rkey) is not slot):
            return -1
        body = [chunks[x] for x in range(j)]
        body.append(data[MASK_SIZE:-MAC_SIZE])
        size = MASK_SIZE + slot.size + MAC_SIZE
        for t in range(i, i + n - 1):
            d, at = datagrams[t]
            if at != addr or len(d) != (size if t < i + n - 2 else MASK_SIZE + slot.last + MAC_SIZE):
                return -1
            body.append(d[MASK_SIZE:-MAC_SIZE])
        # the last one is unmasked: when a shard was lost on the way, it is
        # not the last data shard, and no AEAD is spent on the train
        h = self._mask_state.copy()
        h.update(d[-SAMPLE:])
        if int.from_bytes(d[:MASK_SIZE], "big") ^ int.from_bytes(h.digest(), "big") != clear + (n - 1) * NEXT_SHARD:
            return -1
        src, rkey = nxt.src, nxt.rkey
        session, ts, base = rkey[1], rkey[2], rkey[3]
        own = self._own_train(nxt)
        if own is None:
            return -1
        path, window, offset, seq_floor = own
        if base + j <= seq_floor or not window.fresh_run(session, ts, base + j, n, now, offset):
            return -1
        header = fields(clear.to_bytes(MASK_SIZE, "big")).header()._replace(seq=base)
        try:
            plaintext = open_message(self.table.pair_key(src.id, self.me), header, b"".join(body))
        except (CryptoError, ValueError):
            return -1
        if not window.accept_run(session, ts, base + j, n, now, offset):
            return -1
        chunks.update(zip(range(j, k), body[j:]))     # (not charged to the budget: finish frees the slot now)
        path.last_rx = src.last_rx = now
        src.rx_bytes += (n - 1) * size + len(d)         # (the datagrams' sizes were checked above)
        out.heard.add(addr)
        nxt.done = True
        self.reassembly.finish(rkey, slot)
        reason = src.check_replay(MESSAGE_WINDOW, session, ts, base, now)
        if reason is not None:
            src.drops[reason] += 1
        else:
            self._message(src, header, plaintext, now, out)
        if self._next.get(addr) is nxt:
            self._expect(nxt, n)            # its parity, if any, is predicted as surplus
        return n - 1

    def _file_rest(self, nxt: _Next, done: bool | None, head: bytes, chunk, now: float, out: Output) -> None:
        """A predicted shard that add_next did not simply file: decode its
        message when it was the k-th (done); file it the full way when it is
        a surplus shard of a decoded message or a budget is full (None)."""
        src, rkey, slot = nxt.src, nxt.rkey, nxt.slot
        if done is None:
            # (the window has it now: the full path would call it a duplicate)
            slot, reason = self.reassembly.add(rkey, nxt.index, slot.k, slot.m, slot.length, slot.isal, chunk, now)
            if reason is not None:
                src.drops[reason] += 1
            done = slot is not None
        if done:
            nxt.done = True
            self._complete(src, fields(head).header(), rkey, slot, rkey[3], now, out)

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
        self._message(src, header, plaintext, now, out)

    def _message(self, src: Peer, header: Header, plaintext: bytes, now: float, out: Output,
                 source_checked: bool = False) -> None:
        """An authenticated, fresh message for this node: a whole datagram's
        plaintext or a reassembled one. `source_checked`: its inner source
        address has passed _spoofed already."""
        if header.kind == KIND_KEEPALIVE:
            src.rx_packets += 1
            return
        if header.kind == KIND_REPORT:
            src.rx_packets += 1
            self._loss_report(src, plaintext[:len(plaintext) - header.pad], now)
            return
        if not self.settings.has_tun:
            src.rx_packets += 1
            src.drops[DropReason.NO_TUN] += 1
            return
        if header.pad:
            plaintext = plaintext[:len(plaintext) - header.pad]
        vnet = header.flags & FLAG_VNET
        spoof_check = header.src > self.me and not source_checked
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
        while at + BATCH_ENTRY <= end:
            n = plaintext[at] << 8 | plaintext[at + 1]
            if n == 0:
                break
            at += BATCH_ENTRY
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
        if source in self._own_addresses(src):
            return False
        networks = self.settings.peer_networks.get(src)
        if networks:
            address = ipaddress.ip_address(source)
            return not any(address in n for n in networks)
        return True

    def _own_addresses(self, peer_id: int) -> tuple[bytes, ...]:
        """A peer's tunnel addresses, packed: IPv4, and IPv6 when the tunnel has it."""
        packed = self._addresses.get(peer_id)
        if packed is None:
            if len(self._addresses) >= HOST_CACHE_LIMIT:
                self._addresses.clear()
            v6 = self.net.address6(peer_id)
            packed = self._addresses[peer_id] = (self.net.address(peer_id).packed,) + ((v6.packed,) if v6 else ())
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
