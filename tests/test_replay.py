"""Tier 1: the replay/dedup window (alpaca.protocol.replay, SPEC §4).

Each case is a list of steps (session, ts, seq, receiver's now, expected result);
all steps of a case run against one fresh ReplayWindow, in order.
"""

from __future__ import annotations

import pytest

from alpaca.protocol.constants import MAX_SESSIONS_PER_PEER, REPLAY_WINDOW, SEQ_LIMIT
from alpaca.protocol.drops import DropReason
from alpaca.protocol.replay import ReplayWindow

T = 1_700_000_000
A, B = b"A" * 8, b"B" * 8
OK = None
DUP, REPLAY, MANY = DropReason.DUPLICATE, DropReason.REPLAY, DropReason.TOO_MANY_SESSIONS
W = REPLAY_WINDOW

CASES = {
    "in order": [(A, T, s, T + 0.5, OK) for s in range(50)],
    "reordered within a second": [
        (A, T, 5, T, OK), (A, T, 1, T, OK), (A, T, 3, T, OK), (A, T, 0, T, OK), (A, T, 4, T, OK),
        (A, T, 2, T, OK), (A, T, 3, T, DUP)],
    "reordered across seconds inside the window": [
        (A, T + 1, 0, T + 1, OK), (A, T + 1, 1, T + 1, OK), (A, T, 7, T + 1.2, OK),
        (A, T - W + 1, 9, T + 1.3, OK), (A, T + 1, 0, T + 1.4, DUP), (A, T, 7, T + 1.5, DUP),
        (A, T, 6, T + 1.6, OK)],
    "exact duplicates": [
        (A, T, 0, T, OK), (A, T, 0, T, DUP), (A, T, 0, T + 0.9, DUP), (A, T, 0, T + W, DUP),
        (A, T, 1, T, OK), (A, T, 1, T, DUP)],
    "ts at the edges of the window": [
        (A, T - W, 0, T, OK), (A, T + W, 0, T, OK), (A, T - W, 0, T, DUP), (A, T + W, 0, T, DUP)],
    "ts older than the window": [
        (A, T - W - 1, 0, T, REPLAY), (A, T - 3600, 0, T, REPLAY), (A, 0, 0, T, REPLAY)],
    "ts too far in the future": [
        (A, T + W + 1, 0, T, REPLAY), (A, T + 3600, 0, T, REPLAY), (A, 2**32 - 1, 0, T, REPLAY)],
    "accepted, then too old as the receiver's clock moves on": [
        (A, T, 0, T, OK), (A, T, 0, T + W + 1, REPLAY), (A, T, 1, T + W + 1, REPLAY)],
    "sequence limit": [
        (A, T, SEQ_LIMIT - 1, T, OK), (A, T, SEQ_LIMIT - 1, T, DUP), (A, T, SEQ_LIMIT, T, REPLAY),
        (A, T, 2**32 - 1, T, REPLAY), (A, T, 0, T, OK)],
    "a new session may reuse (ts, seq) of an old one": [
        (A, T, 0, T, OK), (A, T, 1, T, OK), (B, T, 0, T, OK), (B, T, 1, T, OK), (B, T, 0, T, DUP),
        (A, T, 1, T, DUP)],
    "receiver clock steps back inside the window": [
        (A, T, 0, T, OK), (A, T + 1, 0, T + 1, OK), (A, T, 0, T - 3, DUP), (A, T + 1, 0, T - 3, DUP),
        (A, T, 1, T - 3, OK), (A, T - 3, 0, T - 3, OK), (A, T + 1, 1, T - 3.9, OK)],
    "receiver clock steps back beyond the window": [
        (A, T, 0, T, OK), (A, T, 1, T - W - 1, REPLAY), (A, T - W - 1, 0, T - W - 1, OK),
        (A, T, 0, T, DUP)],
    "receiver clock steps forward inside the window": [
        (A, T, 0, T, OK), (A, T, 0, T + 4, DUP), (A, T, 1, T + 4, OK), (A, T + 4, 0, T + 4, OK),
        (A, T, 1, T, DUP)],
    "receiver clock steps forward beyond the window and back": [
        (A, T, 0, T, OK), (A, T, 1, T + 20, REPLAY), (A, T + 20, 0, T + 20, OK),
        (A, T, 0, T, DUP), (A, T + 20, 0, T + 20, DUP)],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=CASES.keys())
def test_check_and_accept(steps):
    window = ReplayWindow()
    for i, (session, ts, seq, now, expected) in enumerate(steps):
        got = window.check_and_accept(session, ts, seq, now)
        assert got == expected, f"step {i}: {(session, ts - T, seq, now - T)} gave {got}, expected {expected}"


def test_every_sequence_number_of_a_second_once():
    window = ReplayWindow()
    for seq in range(0, SEQ_LIMIT, 997):
        assert window.check_and_accept(A, T, seq, T) is None
    for seq in range(0, SEQ_LIMIT, 997):
        assert window.check_and_accept(A, T, seq, T) is DUP
    assert window.check_and_accept(A, T, SEQ_LIMIT - 1, T) is None
    assert window.memory_bytes() == SEQ_LIMIT // 8        # one full bitmap, no more


def sessions(n):
    return [bytes([i]) * 8 for i in range(n)]


def test_too_many_sessions_then_the_window_passes():
    window = ReplayWindow()
    for s in sessions(MAX_SESSIONS_PER_PEER):
        assert window.check_and_accept(s, T, 0, T) is None
    extra = b"\xee" * 8
    assert window.check_and_accept(extra, T, 0, T) is MANY
    assert window.check_and_accept(extra, T + 1, 0, T + 1) is MANY
    # refused, not evicted: the known sessions are still remembered
    for s in sessions(MAX_SESSIONS_PER_PEER):
        assert window.check_and_accept(s, T, 0, T + 1) is DUP
        assert window.check_and_accept(s, T + 1, 5, T + 1) is None
    # once their seconds left the window, a new session is welcome again
    later = T + 1 + W + 1
    assert window.check_and_accept(extra, later, 0, later) is None
    assert len(window.sessions) == 1
    assert window.check_and_accept(extra, later, 0, later) is DUP


def test_too_many_sessions_counts_only_sessions_still_in_the_window():
    window = ReplayWindow()
    old = sessions(MAX_SESSIONS_PER_PEER - 1)
    for s in old:
        assert window.check_and_accept(s, T, 0, T) is None
    assert window.check_and_accept(b"\x80" * 8, T + W, 0, T + W) is None   # 8th, still fine
    assert window.check_and_accept(b"\x81" * 8, T + W, 0, T + W) is MANY
    # at T+W+1 the seven old sessions left the window; the 8th has not
    assert window.check_and_accept(b"\x81" * 8, T + W + 1, 0, T + W + 1) is None
    assert set(window.sessions) == {b"\x80" * 8, b"\x81" * 8}


def test_expire_frees_memory():
    window = ReplayWindow()
    for s in sessions(3):
        for ts in range(T - 2, T + 3):
            for seq in (0, 100, 5000):
                assert window.check_and_accept(s, ts, seq, T) is None
    assert window.memory_bytes() > 0
    window.expire(T)                              # nothing left the window yet
    before = window.memory_bytes()
    assert before > 0 and len(window.sessions) == 3
    window.expire(T + W - 1)                      # the oldest seconds go
    assert 0 < window.memory_bytes() < before
    window.expire(T + 2 + W + 1)                  # everything left the window
    assert window.memory_bytes() == 0
    assert window.sessions == {}


def test_a_long_lived_session_keeps_only_the_window():
    window = ReplayWindow()
    for second in range(100):
        for seq in range(10):
            assert window.check_and_accept(A, T + second, seq, T + second) is None
    # at most 2*W+1 seconds (plus the one being added) are remembered
    assert len(window.sessions[A]) <= 2 * W + 2
    assert window.memory_bytes() <= (2 * W + 2) * 2
