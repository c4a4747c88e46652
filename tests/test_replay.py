"""Tier 1: the replay/dedup window (alpaca.protocol.replay, docs/protocol.md §5), and
how a peer uses it (alpaca.protocol.peers: the own window -1 behind the
session proven by a challenge, and a window per destination it relays to).

Each case is a list of steps (session, ts, seq, receiver's now, expected result);
all steps of a case run against one fresh ReplayWindow, in order.
"""

from __future__ import annotations

import copy
import random

import pytest

from alpaca.protocol.constants import MAX_SESSIONS_PER_PEER, REPLAY_WINDOW, SEQ_LIMIT
from alpaca.protocol.drops import DropReason
from alpaca.protocol.peers import Peer, PeerEntry
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


@pytest.mark.parametrize("seed", range(10))
def test_a_run_of_seqs_is_judged_and_recorded_as_one_at_a_time(seed):
    """fresh_run and accept_run (a whole message's shards at once,
    inbound._whole) say and record what check_and_accept would for each seq
    of the run: across pages (4096 seqs each), around seqs seen before, at
    the sequence limit and the edges of the window."""
    rng = random.Random(seed)
    one, run = ReplayWindow(), ReplayWindow()       # kept alike: one seq at a time, and by runs
    for step in range(60):
        ts = T + rng.choice([0, 0, 1, W, W + 1])
        first = rng.choice([0, 4090, 8180, 12000, SEQ_LIMIT - 40]) + rng.randrange(40)
        count = rng.randrange(1, 60)
        if rng.random() < 0.3:
            seen = first + rng.randrange(count)
            assert one.check_and_accept(A, ts, seen, T) == run.check_and_accept(A, ts, seen, T)
        probe = copy.deepcopy(one)
        expected = all(probe.check_and_accept(A, ts, q, T) is None for q in range(first, first + count))
        assert run.fresh_run(A, ts, first, count, T) == expected, f"step {step}: {ts - T} {first} {count}"
        if expected:
            one = probe
            assert run.accept_run(A, ts, first, count, T)
        assert list(run.bitmaps()) == list(one.bitmaps()), f"step {step}"


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


# ---------------------------------------------------------------- floors: forgotten seconds stay refused

def test_forgotten_seconds_stay_refused_per_session():
    """The seconds a session had that left the window stay refused when the
    receiver's clock comes back (the session's floor); another session, a
    sender that restarted after its own clock stepped, is not bound by it."""
    window = ReplayWindow()
    assert window.check_and_accept(A, T + 20, 0, T + 20) is None     # the receiver's clock 20 s ahead
    assert window.check_and_accept(A, T + 26, 0, T + 26) is None
    window.expire(T + 26)                                            # T + 20 left the window
    assert window.floors == {A: T + 20}
    # the receiver's clock comes back to T + 20
    assert window.check_and_accept(A, T + 20, 0, T + 20) is REPLAY
    assert window.check_and_accept(A, T + 20, 1, T + 20) is REPLAY     # never seen, but forgotten
    assert window.check_and_accept(A, T + 19, 0, T + 20) is REPLAY
    assert window.check_and_accept(A, T + 21, 0, T + 20) is None
    assert window.check_and_accept(B, T + 20, 0, T + 20) is None       # another session: a floor of its own
    assert window.check_and_accept(B, T + 19, 0, T + 20) is None


@pytest.mark.parametrize("how", ["prune", "new-session"])
def test_a_session_forgotten_whole_stays_refused_when_the_clock_comes_back(how):
    """The receiver's clock steps ahead beyond the window, every second of a
    session is forgotten (at a prune, or when another session opens), and
    the clock comes back: what the session sent is still refused."""
    window = ReplayWindow(keep_floors=True)
    assert window.check_and_accept(A, T, 0, T) is None
    assert window.check_and_accept(A, T, 1, T) is None
    if how == "prune":
        window.expire(T + 20)
    else:
        assert window.check_and_accept(B, T + 20, 0, T + 20) is None
    assert A not in window.sessions
    assert window.check_and_accept(A, T, 0, T) is REPLAY
    assert window.check_and_accept(A, T, 1, T) is REPLAY


# ---------------------------------------------------------------- the windows of a peer

def test_a_relay_window_released_at_a_prune_still_refuses_when_the_clock_comes_back():
    """A relay relays one datagram at T, its clock steps 20 s ahead (a prune
    forgets the session and releases the window, freeing its slot), then
    comes back: the same datagram is not relayed again (Peer.old_floors)."""
    src, charged = Peer(0x1001, PeerEntry("k"), T - 100), Peer(0x1002, PeerEntry("k"), T - 100)
    assert src.check_replay(0x0102, A, T, 0, T, charged) is None
    src.prune(T + 20)
    assert 0x0102 not in src.replay and charged.relay_windows == 0
    assert src.check_replay(0x0102, A, T, 0, T, charged) is REPLAY
    assert src.check_replay(0x0102, A, T, 1, T, charged) is REPLAY
    assert src.check_replay(0x0102, A, T + 1, 0, T, charged) is None       # later seconds of it pass



UNVERIFIED = DropReason.UNVERIFIED
OTHER_ID = 0x0102                      # a peer this node relays to


def test_own_window_takes_only_a_verified_session_sealed_after_its_answer():
    """Datagrams for this node (Peer.check_own, window -1): nothing from a
    session that has not answered a challenge (and nothing is kept for it),
    nothing sealed at or before the answer, then each (ts, seq) once."""
    peer = Peer(0x1001, PeerEntry("k"), T - 100)
    assert peer.check_own(A, T, 0, T) is UNVERIFIED
    assert not peer.replay, "an unverified session opens no window"
    peer.verify(A, T, 5, T)                  # A answered a challenge with a datagram sealed at (T, 5)
    assert peer.check_own(A, T, 5, T) is REPLAY
    assert peer.check_own(A, T, 4, T) is REPLAY
    assert peer.check_own(A, T - 1, 9, T) is REPLAY
    assert peer.check_own(A, T, 6, T) is None
    assert peer.check_own(A, T, 6, T) is DUP
    assert peer.check_own(A, T + 1, 0, T) is None
    assert list(peer.replay) == [-1]
    assert peer.check_own(B, T, 7, T) is UNVERIFIED       # each session proves itself
    # the window of a pair this node relays is separate (keyed by dst) and
    # refuses what was sealed before the peer entered the table
    late = Peer(0x1002, PeerEntry("k"), T - 2)
    late.verify(A, 0, -1, T)
    assert late.check_replay(OTHER_ID, A, T - 2, 0, T, charged=late) is REPLAY
    assert late.check_replay(OTHER_ID, A, T, 6, T, charged=late) is None
    assert late.check_own(A, T, 6, T) is None             # the same (session, ts, seq) to this node
    assert late.check_own(A, T - 2, 0, T) is None          # (the own window has the answer's floor instead)
    assert set(late.replay) == {-1, OTHER_ID} and late.relay_windows == 1


def test_own_window_floor_outlives_the_seconds_while_the_session_is_verified():
    """A verified session's datagrams stay refused when the receiver's clock
    steps ahead, a prune forgets their seconds, and the clock comes back; a
    session no longer verified is forgotten with its floor, and is refused
    as unverified until it answers a new challenge (whose floor is then)."""
    peer = Peer(0x1001, PeerEntry("k"), T - 100)
    peer.verify(A, T - 1, 0, T - 1)
    assert peer.check_own(A, T, 0, T) is None
    peer.prune(T + 20)
    assert not peer.replay[-1].sessions
    assert peer.check_own(A, T, 0, T) is REPLAY
    assert peer.check_own(A, T, 1, T) is REPLAY
    # MAX_SESSIONS_PER_PEER newer sessions answer: A is no longer verified
    for s in sessions(MAX_SESSIONS_PER_PEER):
        peer.verify(s, T, 0, T)
    assert A not in peer.verified
    peer.prune(T + 20)
    assert -1 not in peer.replay or A not in peer.replay[-1].floors
    assert peer.check_own(A, T, 0, T) is UNVERIFIED
    peer.verify(A, T, 3, T)
    assert peer.check_own(A, T, 0, T) is REPLAY
    assert peer.check_own(A, T, 4, T) is None
