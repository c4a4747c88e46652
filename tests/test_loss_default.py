"""Loss-robust by default (docs/protocol.md §13, docs/configuration.md `fec`).

With the configuration the docs show (no `fec` key: "auto"), a tunnel that
has never carried data protects what it sends with parity for the worst
loss the table is built for (the prior) until the peer's first report; a
clean path's reports take it to no parity within a second or so, and a path that
turns lossy later is protected within a stated time. Tier 1 drives the pure
core; the tier-3 test runs real daemons over a 30 %-loss underlay.
"""

from __future__ import annotations

import random
import re
import time

import pytest
from protocol_helpers import SYN, T0, Wire, addr, header_of, make_node, pid, tcp, tun_ip
from test_fragments import super_packet

from alpaca.protocol import fec
from alpaca.protocol.constants import KIND_REPORT, ZERO_VNET
from alpaca.protocol.loss import PRIOR_LOSS, STALE_AFTER
from alpaca.lab.worlds import lossy_pair


def auto_pair():
    client = make_node("16.1", gateway="1.1", vnet=True, fec=fec.AUTO)
    server = make_node("1.1", vnet=True, fec=fec.AUTO)
    return client, server


def run(client, server, seconds: float, start: float, drop: float = 0.0, rng=None, step: float = 0.02):
    """Client sends a super-packet and a small packet every `step`; each
    datagram either way is lost with probability `drop`; both tick. Returns
    the client's parity for a 64 KiB message at each step, by time."""
    rng = rng or random.Random(1)
    Wire(client, server)        # (trusts each node's session at the other)
    seen = []
    t = start
    while t < start + seconds:
        sends = client.from_tun([super_packet(size=20_000), tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"x")], t).sends
        sends += client.tick(t).sends
        kept = [(d, a) for d, a in sends if rng.random() >= drop]
        back = []
        for d, a in kept:
            if a == addr("1.1"):
                back += server.from_udp([(d, addr("16.1"))], t).sends
        back += server.tick(t).sends
        for d, a in back:
            if a == addr("16.1") and rng.random() >= drop:
                client.from_udp([(d, addr("1.1"))], t)
        seen.append((t, client._parity(pid("1.1"), client.loss.k), client._parity(pid("1.1"), 1)))
        t += step
    return seen


def test_before_any_report_a_peer_gets_parity_for_the_prior():
    client, _ = auto_pair()
    k = client.loss.k
    assert client._parity(pid("1.1"), k) == fec.parity_for(PRIOR_LOSS, k) > 0
    assert client._parity(pid("1.1"), 1) == fec.parity_for(PRIOR_LOSS, 1) > 0
    shards = [d for d, _ in client.from_tun([super_packet()], T0).sends]
    k60 = fec.shard_count(len(super_packet()) + 16, client.max_chunk)
    assert len(shards) == k60 + fec.parity_for(PRIOR_LOSS, k60)


def test_a_clean_path_sheds_parity_from_its_first_report_on():
    client, server = auto_pair()
    seen = run(client, server, 4.0, T0)
    # at once: a message is tallied when it decodes and, being the first
    # tally for its source, reported right away (not 0.5-1 s later). A
    # first sample of a few dozen clean shards moves the prior; it cannot
    # say the path is clean (loss.PRIOR_WEIGHT)
    first = next(t for t, p, c in seen if p < fec.parity_for(PRIOR_LOSS, client.loss.k))
    assert first - T0 <= 0.1, first - T0
    # the next reports, every REPORT_INTERVAL, do (this stream: ~8 Mbit/s)
    after = [(p, c) for t, p, c in seen if t >= T0 + 1.5]
    assert after and all(p == 0 and c == 0 for p, c in after), after[:3]


def test_the_first_report_leaves_with_the_shard_that_decodes_the_first_message():
    client, server = auto_pair()
    Wire(client, server)
    shards = client.from_tun([super_packet()], T0).sends
    out = [server.from_udp([(d, addr("16.1"))], T0) for d, _ in shards]
    reports = [d for o in out for d, _ in o.sends if header_of(d).kind == KIND_REPORT]
    # sent once, with the shard that decodes the message (the k-th in):
    # its shards are counted then, not when the message is forgotten
    k = fec.shard_count(len(super_packet()) + 16, client.max_chunk)
    # one report, twice: nothing is known of the loss towards 16.1 yet (a
    # lost report's sample is never sent again)
    assert len(set(reports)) == 1 and len(reports) == 2 == server.report_copies(pid("16.1"))
    assert [i for i, o in enumerate(out) if any(header_of(d).kind == KIND_REPORT for d, _ in o.sends)] == [k - 1]
    client.from_udp([(d, addr("1.1")) for d in reports], T0 + 0.001)
    # the shards up to the decoding one, clean: the prior weighs less, it is
    # not gone (loss.PRIOR_WEIGHT)
    assert 0 < client.loss.loss[pid("1.1")] < 0.05
    assert 0 < client._parity(pid("1.1"), client.loss.k) < fec.parity_for(PRIOR_LOSS, client.loss.k) / 2
    # a second clean message is not reported before the next report tick
    more = [server.from_udp([(d, addr("16.1"))], T0 + 0.01) for d, _ in client.from_tun([super_packet()],
                                                                                         T0 + 0.01).sends]
    assert not [d for o in more for d, _ in o.sends if header_of(d).kind == KIND_REPORT]


def test_a_path_that_turns_lossy_is_protected_within_two_seconds():
    """Stated in docs/protocol.md §13: the sender reacts within about 0.5 s
    of the loss starting (a lossy message is counted when it decodes,
    reports go every REPORT_INTERVAL); asserted here with margin: 2 s."""
    client, server = auto_pair()
    run(client, server, 4.0, T0)                          # clean: no parity
    assert client._parity(pid("1.1"), client.loss.k) == 0
    seen = run(client, server, 4.0, T0 + 4.0, drop=0.1, rng=random.Random(7))
    protected = next(t for t, p, c in seen if p > 0)
    assert protected - (T0 + 4.0) <= 2.0, protected - (T0 + 4.0)
    assert seen[-1][1] > 0 and seen[-1][2] > 0


def test_after_an_idle_spell_small_packets_are_protected_until_a_report_confirms_the_path():
    """A clean estimate survives idle, but a path may have turned lossy
    meanwhile: once no report has confirmed it for STALE_AFTER, small
    packets (which start and steer connections) go with the prior's copies
    until the next report; bulk keeps the estimate's parity (none here)."""
    client, server = auto_pair()
    run(client, server, 2.0, T0)                          # clean: no parity
    later = T0 + 2.0 + STALE_AFTER + 1
    ping = ZERO_VNET + tcp(tun_ip("16.1"), tun_ip("1.1"), flags=SYN)
    assert len(client.from_tun([ping], T0 + 2.0).sends) == 1                      # fresh: one datagram
    sends = client.from_tun([ping], later).sends
    assert len(sends) == 1 + fec.parity_for(PRIOR_LOSS, 1)                        # stale: the prior's copies
    k60 = fec.shard_count(len(super_packet()) + 16, client.max_chunk)
    assert len(client.from_tun([super_packet()], later).sends) == k60             # bulk: the estimate's (none)
    # the shards it sent are reported at the next report tick: fresh again, one datagram
    seen = run(client, server, 1.0, later + 0.01)
    assert seen[-1][1:] == (0, 0)
    assert len(client.from_tun([ping], later + 1.02).sends) == 1


def idle_then_ping(drop_indexes=()):
    """A clean pair idle past STALE_AFTER; the client's first small packet
    then goes with the prior's copies and the server answers with a report
    at once. `drop_indexes`: the copies lost on the way. Returns the client
    (with the report taken), when, and the datagrams its next small packet makes."""
    client, server = auto_pair()
    run(client, server, 2.0, T0)                          # clean: no parity
    later = T0 + 2.0 + STALE_AFTER + 1
    for t in (T0 + 2.1, later - 0.5):                      # its report ticks go on while idle
        server.tick(t)
    ping = ZERO_VNET + tcp(tun_ip("16.1"), tun_ip("1.1"), flags=SYN)
    sends = client.from_tun([ping], later).sends
    assert len(sends) == 1 + fec.parity_for(PRIOR_LOSS, 1)
    arrived = [(d, addr("16.1")) for i, (d, a) in enumerate(sends) if i not in drop_indexes]
    out = server.from_udp(arrived, later + 0.001)
    reports = [(d, a) for d, a in out.sends if header_of(d).kind == KIND_REPORT]
    assert reports and len(out.tun) == 1
    client.from_udp([(d, addr("1.1")) for d, a in reports[:1]], later + 0.002)
    return client, len(client.from_tun([ping], later + 0.003).sends)


def test_after_idle_a_clean_report_of_the_first_protected_packet_ends_the_protection():
    """The receiver reports the shards of the first small packet after
    idle at once (not at its next report tick, up to REPORT_INTERVAL
    later), and a report that saw them all arrive confirms the path: the
    next small packet is one datagram again, a round trip after idle."""
    _, datagrams = idle_then_ping()
    assert datagrams == 1


def test_after_idle_a_report_that_saw_protected_shards_lost_keeps_the_protection():
    """A path that turned lossy while idle: the report of the first small
    packet after idle shows shards lost, which confirms nothing, so small
    packets keep the prior's copies until the estimate itself moves."""
    _, datagrams = idle_then_ping(drop_indexes=(2, 4))
    assert datagrams == 1 + fec.parity_for(PRIOR_LOSS, 1)


# ---------------------------------------------------------------- tier 3

LOSS = 0.3


@pytest.fixture
def cold(tmp_path_factory):
    with lossy_pair(tmp_path_factory.mktemp("cold"), LOSS, s1={}, c1={}, up_timeout=30) as mesh:   # no fec key: the default
        yield mesh


@pytest.mark.root
def test_an_idle_tunnels_first_connection_over_30_percent_loss_moves_data_within_seconds(cold):
    time.sleep(6)                                         # up, then idle: no data has ever crossed it
    t0 = time.monotonic()
    cold.transfer("c1", "s1", "10.17.1.1", size=1 << 20)  # handshake and 1 MiB, sha256 checked
    elapsed = time.monotonic() - t0
    print(f"\nfirst TCP connection of an idle tunnel at {LOSS:.0%} loss each way: 1 MiB in {elapsed:.1f} s")
    assert elapsed < 10, elapsed
    r = cold.peers["c1"].run(["ping", "-n", "-c", "100", "-i", "0.05", "-W", "1", "10.17.1.1"], timeout=60)
    received = int(re.search(r"(\d+) received", r.stdout).group(1))
    print(f"{received} of 100 pings answered")
    assert received >= 97, r.stdout
