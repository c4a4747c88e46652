"""Replay protection and de-duplication (SPEC §4, docs/protocol.md).

Each datagram carries (session, ts, seq): a random per-start session ID, the
sender's clock in seconds and a 20-bit per-second sequence. Per source peer we
remember, for each session seen inside the window and each second of it, a
bitmap of accepted sequence numbers. Only authenticated datagrams reach this
module (the caller checks the AEAD first), so forged input cannot move it.

Memory: a bitmap grows to the highest sequence seen in its second, at most
2**20 bits = 128 KiB, so one session costs at most (2*REPLAY_WINDOW+1)*128 KiB
and typically a few hundred bytes per second of traffic.
"""

from __future__ import annotations

from .constants import MAX_SESSIONS_PER_PEER, REPLAY_WINDOW, SEQ_LIMIT
from .drops import DropReason


class ReplayWindow:
    __slots__ = ("sessions", "floor", "charged")

    def __init__(self, charged: object = None) -> None:
        # the peer whose window slot this is (peers.Peer.relay_windows), or None
        self.charged = charged
        # session -> {ts: bitmap}
        self.sessions: dict[bytes, dict[int, bytearray]] = {}
        # the newest second we have forgotten: anything at or below it is
        # refused, so a receiver clock that jumps ahead and back cannot
        # reopen seconds whose bitmaps are gone
        self.floor = -1

    def check_and_accept(self, session: bytes, ts: int, seq: int, now: float) -> DropReason | None:
        """None when (session, ts, seq) is new and inside the window (then it is recorded)."""
        now_s = int(now)
        if seq >= SEQ_LIMIT or ts <= self.floor or abs(ts - now_s) > REPLAY_WINDOW:
            return DropReason.REPLAY
        seconds = self.sessions.get(session)
        if seconds is None:
            self._expire(now_s)
            if len(self.sessions) >= MAX_SESSIONS_PER_PEER:
                # Refuse rather than evict: evicting would forget what an old
                # session already delivered and let its datagrams be replayed.
                return DropReason.TOO_MANY_SESSIONS
            seconds = self.sessions[session] = {}
        bitmap = seconds.get(ts)
        if bitmap is None:
            if len(seconds) > 2 * REPLAY_WINDOW:
                self._expire_session(seconds, now_s)
            bitmap = seconds[ts] = bytearray()
        index, bit = seq >> 3, 1 << (seq & 7)
        if index < len(bitmap):
            if bitmap[index] & bit:
                return DropReason.DUPLICATE
        else:
            bitmap.extend(bytes(index + 1 - len(bitmap)))
        bitmap[index] |= bit
        return None

    def _expire_session(self, seconds: dict[int, bytearray], now_s: int) -> None:
        # Only seconds that fell out of the back of the window are forgotten.
        # Seconds "from the future" (the receiver's clock stepped back) stay
        # until the clock passes them again, so they cannot be replayed then.
        for ts in [t for t in seconds if t < now_s - REPLAY_WINDOW]:
            del seconds[ts]
            self.floor = max(self.floor, ts)

    def _expire(self, now_s: int) -> None:
        for session in list(self.sessions):
            seconds = self.sessions[session]
            self._expire_session(seconds, now_s)
            if not seconds:
                del self.sessions[session]

    def expire(self, now: float) -> None:
        """Forget seconds (and whole sessions) that left the window."""
        self._expire(int(now))

    def memory_bytes(self) -> int:
        return sum(len(b) for s in self.sessions.values() for b in s.values())
