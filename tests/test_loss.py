"""Tier 1: loss reports and the shard tally behind them (alpaca/protocol/loss.py,
reassembly.py; docs/protocol.md §12)."""

from __future__ import annotations

import pytest

from alpaca.protocol import loss
from alpaca.protocol.fec import parity_for
from alpaca.protocol.constants import REASSEMBLY_TIMEOUT
from alpaca.protocol.loss import KEEP, PRIOR_LOSS, PRIOR_WEIGHT, BadReport, LossMeter
from alpaca.protocol.reassembly import Reassembler

T = 1_700_000_000


def expected_loss(*samples: tuple[int, int]) -> float:
    """The estimate after these (lost, sent) samples: the prior first, as
    PRIOR_WEIGHT shards sent, then every sample weighing down what came before."""
    lost, sent = PRIOR_LOSS * PRIOR_WEIGHT, PRIOR_WEIGHT
    for sample_lost, sample_sent in samples:
        lost, sent = KEEP * lost + sample_lost, KEEP * sent + sample_sent
    return lost / sent


def test_a_small_clean_first_sample_keeps_parity():
    # 5 % loss shows none in a dozen shards more often than not: such a
    # sample moves the prior, it does not replace it
    rx, tx = LossMeter(47), LossMeter(47)
    rx.count_shards(1, 12, 12)
    (_, payload), = rx.reports(T)
    assert tx.on_report(1, payload, 0.0) == pytest.approx(expected_loss((0, 12))) and expected_loss((0, 12)) > 0.08
    assert tx.parity(1, 14) >= parity_for(0.05, 14) > 0
    # a bulk transfer's next sample says the path is clean
    rx.count_shards(1, 5000, 5000)
    (_, payload), = rx.reports(T + 1)
    assert tx.on_report(1, payload, 0.5) < 0.0005 and tx.parity(1, 47) == 0


def test_a_report_covers_complete_seconds_with_zeros_and_only_once():
    rx, tx = LossMeter(47), LossMeter(47)
    for ts, sent, arrived in ((T, 100, 90), (T + 1, 100, 0), (T + 2, 100, 80)):
        tx.count_sent(7, ts, sent)
        if arrived:
            rx.count_arrived(7, ts, arrived)
    assert rx.reports(T + 1.9) == []                       # T is not REPORT_DELAY behind yet
    (peer, payload), = rx.reports(T + 3)                   # T and T + 1
    assert peer == 7
    assert tx.on_report(7, payload, 0.0) == pytest.approx(expected_loss((110, 200)))   # the silent second counts as lost
    assert rx.reports(T + 3.5) == []                       # nothing new
    (_, payload), = rx.reports(T + 4)                      # T + 2
    assert tx.on_report(7, payload, 0.0) == pytest.approx(expected_loss((110, 200), (20, 100)))
    assert not tx.sent.get(7)


def test_estimates_need_a_sample_and_weigh_samples_by_their_size():
    rx, tx = LossMeter(47), LossMeter(47)
    tx.count_sent(1, T, 6)
    rx.count_arrived(1, T, 3)
    (_, payload), = rx.reports(T + 2)
    assert tx.on_report(1, payload, 0.0) is None                # 6 transmissions: not enough yet
    tx.count_sent(1, T + 1, 14)
    rx.count_arrived(1, T + 1, 12)
    (_, payload), = rx.reports(T + 3)
    assert tx.on_report(1, payload, 0.0) == pytest.approx(expected_loss((5, 20)))  # 15 of 20
    tx.count_sent(1, T + 2, 100)
    rx.count_arrived(1, T + 2, 100)
    (_, payload), = rx.reports(T + 4)
    # 100 clean: the 20 before (and the prior) weigh half
    after = expected_loss((5, 20), (0, 100))
    assert tx.on_report(1, payload, 0.0) == pytest.approx(after) and after < 0.04
    assert (tx.parity(1, 47), tx.parity(1, 1)) == (parity_for(after, 47), parity_for(after, 1))
    # and a small clean sample after a big one barely moves it (the last
    # report of a transfer does not halve what the transfer measured)
    tx.count_sent(1, T + 3, 10_000)
    rx.count_arrived(1, T + 3, 9_000)
    (_, payload), = rx.reports(T + 5)
    big = tx.on_report(1, payload, 0.0)
    tx.count_sent(1, T + 4, 12)
    rx.count_arrived(1, T + 4, 12)
    (_, payload), = rx.reports(T + 6)
    assert 0.098 < tx.on_report(1, payload, 0.0) < big < 0.1
    # no report from peer 2 yet: parity for the prior (a cold tunnel on a lossy path)
    assert (tx.parity(2, 47), tx.parity(2, 1)) == (parity_for(PRIOR_LOSS, 47), parity_for(PRIOR_LOSS, 1))


@pytest.mark.parametrize("payload", [b"", b"\x00" * 4, b"\x00\x00\x00\x01\x00", b"\x00\x00\x00\x01\x02" + b"\x00" * 4,
                                     b"\x00\x00\x00\x01\x11" + b"\x00" * 68])
def test_malformed_reports_are_refused(payload):
    with pytest.raises(BadReport):
        LossMeter(47).on_report(1, payload, 0.0)


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
    assert tx.on_report(5, payload, 0.0) == pytest.approx(expected_loss((39, 132)))
    assert tx.parity(5, 47) == parity_for(expected_loss((39, 132)), 47)
    with pytest.raises(BadReport):                         # more arrived than sent
        tx.on_report(5, payload[:5] + (10).to_bytes(4, "big") + (11).to_bytes(4, "big"), 0.0)


def test_a_shard_that_arrives_after_its_gap_was_reported_waits_for_more_sent():
    rx, tx = LossMeter(47), LossMeter(47)
    rx.count_shards(5, 20, 18)
    (_, payload), = rx.reports(T)
    tx.on_report(5, payload, 0.0)
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
    # sender sends indices 0 to 6 in order.
    tally = [0, 0]

    def count(src, sent, arrived):
        tally[0] += sent
        tally[1] += arrived

    r = Reassembler(count)
    assert _file(r, 1, [0, 1, 2, 3, 4, 5, 6]) is not None and tally == [7, 7]    # all in: 7 of 7
    assert _file(r, 2, [0, 2, 3, 4]) is not None and tally == [12, 11]           # decoded at 4: 1 lost of 5
    _file(r, 2, [6])                                                             # the last: 5 lost, 6 came
    assert tally == [14, 12]
    _file(r, 2, [1])                                                             # out of order: it came after all
    assert tally == [14, 13]
    r.expire(REASSEMBLY_TIMEOUT)                                                 # nothing after 6 to add
    assert tally == [14, 13]
    assert _file(r, 3, [1, 2, 3, 4]) is not None and tally == [19, 17]
    r.expire(REASSEMBLY_TIMEOUT)                                                 # 5 and 6 never came
    assert tally == [21, 17] and not r.done
    _file(r, 4, [0, 5])                                                          # short of k: counted when it expires
    assert tally == [21, 17]
    r.expire(REASSEMBLY_TIMEOUT)
    assert tally == [28, 19]


def _report(rx, tx, peer, ts, sent, arrived, now):
    tx.count_sent(peer, ts, sent)
    rx.count_arrived(peer, ts, arrived)
    (_, payload), = rx.reports(ts + loss.REPORT_DELAY)
    return tx.on_report(peer, payload, now)


def test_bulk_is_spread_when_every_path_is_lossy_and_the_estimate_follows():
    rx, tx = LossMeter(47), LossMeter(47)
    tx.paths[3] = 2                                         # its latest bulk could use two paths
    # the union of two 30 % paths loses 9 %: spread, and the estimate is one path's
    one_path = expected_loss((90, 1000)) ** 0.5
    assert _report(rx, tx, 3, T, 1000, 910, now=T) == pytest.approx(one_path) and 0.3 <= one_path < 0.31
    assert 3 in tx.spread and tx.parity(3, 47) == parity_for(one_path, 47)
    # reports within SETTLE mix both ways of sending: not counted
    assert _report(rx, tx, 3, T + 1, 1000, 910, now=T + loss.SETTLE / 2) is None
    assert tx.loss[3] == pytest.approx(one_path)
    # spread, the paths turn clean: below SPREAD_LEAVE it goes on every path again
    estimate = 0.3
    for i in range(2, 12):
        estimate = _report(rx, tx, 3, T + i, 1000, 1000, now=T + i)
        if 3 not in tx.spread:
            break
    assert 3 not in tx.spread and estimate == pytest.approx(tx.loss[3]) and estimate < loss.SPREAD_LEAVE ** 2
    # a union loss of 1.5 % says 12 % per path if they are equal; spread bulk
    # is protected for PRIOR_LOSS until its own reports say what it loses
    tx.paths[4] = 2
    assert _report(rx, tx, 4, T + 20, 1000, 985, now=T + 20) == pytest.approx(PRIOR_LOSS)
    assert 4 in tx.spread


def test_one_path_never_switches_and_a_little_union_loss_does_not_spread():
    rx, tx = LossMeter(47), LossMeter(47)
    tx.paths[3] = 1
    assert _report(rx, tx, 3, T, 1000, 700, now=T) == pytest.approx(0.3)
    assert not tx.spread
    tx.paths[4] = 2
    assert _report(rx, tx, 4, T, 1000, 995, now=T) == pytest.approx(expected_loss((5, 1000)))   # one clean path: ~0
    assert not tx.spread
