"""Tier 1: loss reports (alpaca/protocol/loss.py, docs/protocol.md §12)."""

from __future__ import annotations

import pytest

from alpaca.protocol import loss
from alpaca.protocol.fec import parity_for
from alpaca.protocol.loss import PRIOR_LOSS, BadReport, LossMeter

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


def test_estimates_need_a_sample_and_are_smoothed():
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
    assert tx.on_report(1, payload) == pytest.approx(0.125)  # half way to 0
    assert (tx.parity(1, 47), tx.parity(1, 1)) == (parity_for(0.125, 47), parity_for(0.125, 1))
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
