"""Replay protection and de-duplication (docs/protocol.md §5).

Each datagram carries (session, ts, seq): a random per-start session ID, the
sender's clock in seconds and a 20-bit per-second sequence. Per source peer we
remember, for each session seen inside the window and each second of it, a
bitmap of accepted sequence numbers. The window is judged by the sender's
clock: the caller passes each session's clock offset (whole seconds the
sender's clock is ahead of ours, measured when the session was proven:
peers.Peer.verify), so two peers need not agree on the time. Only authenticated datagrams reach this
module (the caller checks the AEAD first), so forged input cannot move it.

Memory: the bitmap of a second is paged. A page covers PAGE_SEQS = 4096
sequence numbers (at most PAGE_BYTES = 512 bytes), is made on first use and
grows in powers of two up to the highest sequence seen in it. A second holds
page 0 as a bare bytearray as long as no other page is used (every sender
below 4096 datagrams/s), else a dict {seq >> PAGE_SHIFT: page}. So one
datagram costs at most one page (seq = 2**20 - 1 costs 512 B, not 128 KiB),
a second of r < 4096 datagrams about r/8 bytes, and a second at most 2**20
bits = 128 KiB; one session at most (2*REPLAY_WINDOW+1) * 128 KiB.
"""

from __future__ import annotations

from collections.abc import Iterator

from .constants import MAX_SESSIONS_PER_PEER, REPLAY_WINDOW, SEQ_LIMIT
from .drops import DropReason

PAGE_SHIFT = 12                   # 4096 sequence numbers per page
PAGE_SEQS = 1 << PAGE_SHIFT
PAGE_BYTES = PAGE_SEQS // 8       # 512

Second = bytearray | dict[int, bytearray]     # page 0 alone, or pages by number


def _pages(second: Second) -> Iterator[tuple[int, bytearray]]:
    return iter(second.items()) if isinstance(second, dict) else iter(((0, second),))


def _runs(first: int, last: int) -> Iterator[tuple[int, int, int]]:
    """The seqs first .. last page by page: (page number, the first one's
    bit in the page, a mask of as many bits as the page holds of them). A
    page read as a little-endian int has seq s at bit s % PAGE_SEQS."""
    for number in range(first >> PAGE_SHIFT, (last >> PAGE_SHIFT) + 1):
        lo = max(first, number << PAGE_SHIFT) & (PAGE_SEQS - 1)
        hi = min(last, ((number + 1) << PAGE_SHIFT) - 1) & (PAGE_SEQS - 1)
        yield number, lo, (1 << (hi - lo + 1)) - 1


class ReplayWindow:
    __slots__ = ("sessions", "floors", "offsets", "keep_floors", "charged", "_hot_session", "_hot_ts", "_hot_number", "_hot_page")

    def __init__(self, charged: object = None, keep_floors: bool = False) -> None:
        # the peer whose window slot this is (peers.Peer.relay_windows), or None
        self.charged = charged
        # session -> {ts: page 0, or {page number: page}}
        self.sessions: dict[bytes, dict[int, Second]] = {}
        # per session, the newest second we have forgotten: anything at or
        # below it is refused, so a receiver clock that jumps ahead and back
        # cannot reopen seconds whose bitmaps are gone. Per session, not per
        # window: a sender whose clock came back from an excursion starts a
        # new session, which must not inherit the old one's future seconds.
        self.floors: dict[bytes, int] = {}
        # per session, the sender's clock offset it was last checked with:
        # its seconds expire by the sender's clock, not ours
        self.offsets: dict[bytes, int] = {}
        # a window that keeps a session's floor after the session's last
        # second is gone (the owner prunes floors: peers.Peer.prune)
        self.keep_floors = keep_floors
        # the page used last and its (session, ts, page number): a sender's
        # datagrams mostly land on one page after another. A page is only
        # dropped with its second, and then the shortcut is reset.
        self._hot_session, self._hot_ts, self._hot_number = b"", -1, -1
        self._hot_page = bytearray()

    def check_and_accept(self, session: bytes, ts: int, seq: int, now: float, offset: int = 0) -> DropReason | None:
        """None when (session, ts, seq) is new and inside the window around
        the sender's clock, int(now) + offset (then it is recorded)."""
        now_s = int(now) + offset
        if seq >= SEQ_LIMIT or abs(ts - now_s) > REPLAY_WINDOW or ts <= self.floors.get(session, -1):
            return DropReason.REPLAY
        number = seq >> 12               # PAGE_SHIFT: literals on this per-datagram path
        if ts == self._hot_ts and number == self._hot_number and session == self._hot_session:
            page = self._hot_page
        else:
            page = self._page(session, ts, number, now, offset)
            if page is None:
                return DropReason.TOO_MANY_SESSIONS
        index, bit = (seq >> 3) & 511, 1 << (seq & 7)
        if index < len(page):
            if page[index] & bit:
                return DropReason.DUPLICATE
        else:
            # powers of two: a page is resized a few times at most and is
            # never more than twice what its highest seq needs
            page.extend(bytes((1 << index.bit_length()) - len(page)))
        page[index] |= bit
        return None

    def fresh_run(self, session: bytes, ts: int, first: int, count: int, now: float, offset: int = 0) -> bool:
        """Would check_and_accept take each of the seqs first .. first +
        count - 1? Changes nothing (a whole message's shards are asked
        before their AEAD is checked: inbound.Inbound._whole)."""
        last = first + count - 1
        if last >= SEQ_LIMIT or abs(ts - int(now) - offset) > REPLAY_WINDOW or ts <= self.floors.get(session, -1):
            return False
        second = self.sessions.get(session, {}).get(ts)
        if second is None:
            return True
        for number, lo, bits in _runs(first, last):
            page = second.get(number) if isinstance(second, dict) else second if number == 0 else None
            if page is not None and int.from_bytes(page, "little") >> lo & bits:
                return False
        return True

    def accept_run(self, session: bytes, ts: int, first: int, count: int, now: float, offset: int = 0) -> bool:
        """Record the seqs first .. first + count - 1, which fresh_run found
        new; False (nothing recorded) when the session would be one too many."""
        for number, lo, bits in _runs(first, first + count - 1):
            page = self._page(session, ts, number, now, offset)
            if page is None:
                return False            # (only ever at the first page: the session is new)
            need = (lo + bits.bit_length() - 1) >> 3
            if need >= len(page):
                page.extend(bytes((1 << need.bit_length()) - len(page)))     # as check_and_accept grows it
            page[:] = (int.from_bytes(page, "little") | bits << lo).to_bytes(len(page), "little")
        return True

    def _page(self, session: bytes, ts: int, number: int, now: float, offset: int) -> bytearray | None:
        """The page of (session, ts) for seq >> PAGE_SHIFT == number, made when
        new; None when the session would be one too many."""
        seconds = self.sessions.get(session)
        if seconds is None:
            self._expire(now)
            if len(self.sessions) >= MAX_SESSIONS_PER_PEER:
                # Refuse rather than evict: evicting would forget what an old
                # session already delivered and let its datagrams be replayed.
                return None
            seconds = self.sessions[session] = {}
        second = seconds.get(ts)
        if second is None:
            self.offsets[session] = offset
            if len(seconds) > 2 * REPLAY_WINDOW:
                self._expire_session(session, seconds, int(now) + offset)
            page = bytearray(1)
            seconds[ts] = page if number == 0 else {number: page}
        elif isinstance(second, dict):
            page = second.get(number)
            if page is None:
                page = second[number] = bytearray(1)
        elif number == 0:
            page = second
        else:
            page = bytearray(1)
            seconds[ts] = {0: second, number: page}
        self._hot_session, self._hot_ts, self._hot_number, self._hot_page = session, ts, number, page
        return page

    def _expire_session(self, session: bytes, seconds: dict[int, Second], now_s: int) -> None:
        # Only seconds that fell out of the back of the window are forgotten.
        # Seconds "from the future" (the receiver's clock stepped back) stay
        # until the clock passes them again, so they cannot be replayed then.
        for ts in [t for t in seconds if t < now_s - REPLAY_WINDOW]:
            del seconds[ts]
            if ts > self.floors.get(session, -1):
                self.floors[session] = ts
        if self._hot_session == session and self._hot_ts not in seconds:
            self._hot_ts = -1               # the shortcut must never reach a forgotten page

    def _expire(self, now: float) -> None:
        now_s = int(now)
        for session in list(self.sessions):
            seconds = self.sessions[session]
            self._expire_session(session, seconds, now_s + self.offsets.get(session, 0))
            if not seconds:
                # every second of it is older than the window, which refuses
                # them by the clock alone: the floor can go with the session
                del self.sessions[session]
                self.offsets.pop(session, None)
                if not self.keep_floors:
                    self.floors.pop(session, None)

    def expire(self, now: float) -> None:
        """Forget seconds (and whole sessions) that left the window."""
        self._expire(now)

    def bitmaps(self) -> Iterator[tuple[bytes, int, int, bytearray]]:
        """(session, ts, page number, page) of every page held."""
        for session, seconds in self.sessions.items():
            for ts, second in seconds.items():
                for number, page in _pages(second):
                    yield session, ts, number, page

    def memory_bytes(self) -> int:
        """Bytes of bitmap pages held (without the objects that hold them)."""
        return sum(len(page) for *_, page in self.bitmaps())
