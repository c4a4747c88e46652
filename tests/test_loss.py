"""Tier 1: loss reports and the shard tally behind them (alpaca/protocol/loss.py,
reassembly.py; docs/protocol.md §12)."""

from __future__ import annotations

import pytest

from alpaca.protocol import loss
from alpaca.protocol.fec import parity_for
from alpaca.protocol.constants import REASSEMBLY_TIMEOUT
from alpaca.protocol.loss import PRIOR_LOSS, BadReport, LossMeter
from alpaca.protocol.reassembly import Reassembler, send_position

T = 1_700_000_000


def test_a_report_covers_complete_seconds_with_zeros_and_only_once():
    rx, tx = LossMeter(47), LossMeter(47)
    for ts, sent, arrived in ((T, 100, 90), (T + 1, 100, 0), (T + 2, 100, 80)):
        tx.count_sent(7, ts, sent)
        if arrived:
            rx.count_arrived(7, ts, arrived)
    assert rx.reports(T + 1.9) == []                       # T is not REPORT_DELAY behind yet
    (peer, payload), = rx.reports(T + 3)                   # T and T + 1
    assert peer == 7
    assert tx.on_report(7, payload) == pytest.approx(1 - 90 / 200)   # the silent second counts as lost
    assert rx.reports(T + 3.5) == []                       # nothing new
    (_, payload), = rx.reports(T + 4)                      # T + 2
    assert tx.on_report(7, payload) == pytest.approx(0.5 * 0.2 + 0.5 * 0.55)
    assert not tx.sent.get(7)


def test_estimates_need_a_sample_and_weigh_samples_by_their_size():
    rx, tx = LossMeter(47), LossMeter(47)
    tx.count_sent(1, T, 6)
    rx.count_arrived(1, T, 3)
    (_, payload), = rx.reports(T + 2)
    assert tx.on_report(1, payload) is None                # 6 transmissions: not enough yet
    tx.count_sent(1, T + 1, 14)
    rx.count_arrived(1, T + 1, 12)
    (_, payload), = rx.reports(T + 3)
    assert tx.on_report(1, payload) == pytest.approx(0.25)  # 15 of 20
    tx.count_sent(1, T + 2, 100)
    rx.count_arrived(1, T + 2, 100)
    (_, payload), = rx.reports(T + 4)
    # 100 clean: the 20 before weigh half, so (5 / 2) lost of (20 / 2 + 100)
    assert tx.on_report(1, payload) == pytest.approx(2.5 / 110)
    assert (tx.parity(1, 47), tx.parity(1, 1)) == (parity_for(2.5 / 110, 47), parity_for(2.5 / 110, 1))
    # and a small clean sample after a big one barely moves it (the last
    # report of a transfer does not halve what the transfer measured)
    tx.count_sent(1, T + 3, 10_000)
    rx.count_arrived(1, T + 3, 9_000)
    (_, payload), = rx.reports(T + 5)
    big = tx.on_report(1, payload)
    tx.count_sent(1, T + 4, 12)
    rx.count_arrived(1, T + 4, 12)
    (_, payload), = rx.reports(T + 6)
    assert 0.098 < tx.on_report(1, payload) < big < 0.1
    # no report from peer 2 yet: parity for the prior (a cold tunnel on a lossy path)
    assert (tx.parity(2, 47), tx.parity(2, 1)) == (parity_for(PRIOR_LOSS, 47), parity_for(PRIOR_LOSS, 1))


@pytest.mark.parametrize("payload", [b"", b"\x00" * 4, b"\x00\x00\x00\x01\x00", b"\x00\x00\x00\x01\x02" + b"\x00" * 4,
                                     b"\x00\x00\x00\x01\x11" + b"\x00" * 68])
def test_malformed_reports_are_refused(payload):
    with pytest.raises(BadReport):
        LossMeter(47).on_report(1, payload)


def test_state_is_bounded_in_time_and_by_the_table():
    m = LossMeter(47)
    for ts in range(T, T + 100):
        m.count_sent(1, ts, 1)
        m.count_arrived(2, ts, 1)
        m.count_arrived(3, ts, 1)
    m.prune(T + 100, peers={1: None, 2: None})
    assert len(m.sent[1]) == loss.REPORT_HORIZON and len(m.arrived[2]) == loss.REPORT_HORIZON
    assert 3 not in m.arrived
    (_, payload), = m.reports(T + 100)
    assert len(payload) == 5 + 4 * loss.REPORT_MAX_SECONDS + 8


def test_shard_tallies_are_reported_at_once_and_need_no_seconds():
    rx, tx = LossMeter(47), LossMeter(47)
    rx.count_shards(5, 85, 60)
    rx.count_shards(5, 47, 33)
    (peer, payload), = rx.reports(T + 0.5)                 # no complete second needed
    assert peer == 5 and rx.reports(T + 1.0) == []
    assert tx.on_report(5, payload) == pytest.approx(1 - 93 / 132)
    assert tx.parity(5, 47) == parity_for(1 - 93 / 132, 47)
    with pytest.raises(BadReport):                         # more arrived than sent
        tx.on_report(5, payload[:5] + (10).to_bytes(4, "big") + (11).to_bytes(4, "big"))


def test_a_shard_that_arrives_after_its_gap_was_reported_waits_for_more_sent():
    rx, tx = LossMeter(47), LossMeter(47)
    rx.count_shards(5, 20, 18)
    (_, payload), = rx.reports(T)
    tx.on_report(5, payload)
    rx.count_shards(5, 0, 1)                               # one of the two "lost" came late
    assert rx.reports(T + 0.5) == []                       # never more arrived than sent on the wire
    rx.count_shards(5, 20, 20)
    (_, payload), = rx.reports(T + 1)
    assert payload[-8:] == (20).to_bytes(4, "big") * 2 and rx.tally[5] == [0, 1]


def _file(reassembler, message, indices, k=4, m=3, size=64, now=0.0):
    """File shards `indices` of message number `message` from peer 9;
    returns the slot when it completes."""
    done = None
    for i in indices:
        slot, reason = reassembler.add((9, 1, T, message * 16), i, k, m, k * size, False, bytes(size), now)
        assert reason is None
        if slot is not None:
            reassembler.finish((9, 1, T, message * 16), slot)
            done = slot
    return done


def test_reassembly_counts_a_lossy_message_when_it_decodes_not_when_it_is_forgotten():
    # A report once held back every message that lost a shard (counted when
    # forgotten, 0.5 s on) while those that lost none went out at once: the
    # first report after a burst read 0 % on a 10 % path. k = 4, m = 3: the
    # sender sends indices 0 1 2 4 5 6 3 (the short last data shard last).
    tally = [0, 0]

    def count(src, sent, arrived):
        tally[0] += sent
        tally[1] += arrived

    assert [send_position(i, 4, 3) for i in (0, 1, 2, 4, 5, 6, 3)] == list(range(7))
    r = Reassembler(count)
    assert _file(r, 1, [0, 1, 2, 4, 5, 6, 3]) is not None and tally == [7, 7]    # all in: 7 of 7
    assert _file(r, 2, [0, 2, 4, 5]) is not None and tally == [12, 11]           # decoded at 4: 1 lost of 5
    _file(r, 2, [3])                                                             # the last: 6 lost, 5 came
    assert tally == [14, 12]
    _file(r, 2, [1])                                                             # out of order: it came after all
    assert tally == [14, 13]
    r.expire(REASSEMBLY_TIMEOUT)                                                 # nothing after 3 to add
    assert tally == [14, 13]
    assert _file(r, 3, [1, 2, 4, 5]) is not None and tally == [19, 17]
    r.expire(REASSEMBLY_TIMEOUT)                                                 # 6 and 3 never came
    assert tally == [21, 17] and not r.done
    _file(r, 4, [0, 5])                                                          # short of k: counted when it expires
    assert tally == [21, 17]
    r.expire(REASSEMBLY_TIMEOUT)
    assert tally == [28, 19]
    # without parity the order is the index's
    assert [send_position(i, 4, 0) for i in range(4)] == [0, 1, 2, 3] and send_position(0, 1, 5) == 0
