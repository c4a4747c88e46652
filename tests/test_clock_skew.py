"""Two peers whose clocks disagree (docs/protocol.md §5 "Clock offsets").

Each session's clock offset is measured from its answer to our challenge,
and its datagrams are judged by its own clock: traffic flows both ways
whatever the skew, across a restart of either side, and replays and
duplicates are still refused.
"""

from __future__ import annotations

import pytest

from alpaca.protocol.constants import KIND_CHALLENGE
from alpaca.protocol.drops import DropReason
from alpaca.protocol.peers import CLOCK_NOTICE

from protocol_helpers import T0, Wire, addr, header_of, make_node, name, pid, tcp, tun_ip

DAY = 86_400
SKEWS = [6, -6, 600, -600, DAY, -DAY]


def up(i: int = 0) -> list[bytes]:
    return [tcp(tun_ip("16.1"), tun_ip("1.1"), data=b"up %d" % i)]


def down(i: int = 0) -> list[bytes]:
    return [tcp(tun_ip("1.1"), tun_ip("16.1"), data=b"down %d" % i)]


def start(skew: float, now: float, client=None, server=None):
    """A client whose clock is `skew` ahead of the server's, both started
    (or the one not given restarted) at true time `now`, and the wire
    after the client's first keepalive."""
    client = client or make_node("16.1", gateway="1.1", trust_test_session=False, now=now + skew)
    server = server or make_node("1.1", trust_test_session=False, now=now)
    wire = Wire(client, server, trusted=False, skews={"16.1": skew})
    wire.tick(client, now)
    return client, server, wire


def both_ways(wire: Wire, client, server, now: float, i: int = 0) -> tuple[bytes, bytes]:
    """One packet each way, delivered at once; the datagrams that carried them."""
    sent_up = wire.originate(client, up(i), now)
    assert sent_up.tun["1.1"] == up(i)
    sent_down = wire.originate(server, down(i), now + 0.1)
    assert sent_down.tun["16.1"] == down(i)
    return sent_up.hops[0][2], sent_down.hops[0][2]


@pytest.mark.parametrize("skew", SKEWS)
def test_traffic_flows_both_ways_across_restarts_and_replays_are_refused(skew):
    t = T0
    client, server, wire = start(skew, t)
    captured_up, captured_down = both_ways(wire, client, server, t + 0.2)
    # each side measured the other's clock from its answer
    assert server.table.get(pid("16.1")).clock_offset == pytest.approx(skew, abs=1.5)
    assert client.table.get(pid("1.1")).clock_offset == pytest.approx(-skew, abs=1.5)
    # copies are duplicates, and stay refused when replayed later
    for later in (0.3, 20.0):
        assert server.from_udp([(captured_up, addr("16.1"))], t + later + skew * 0).tun == []
        assert client.from_udp([(captured_down, addr("1.1"))], t + later + skew).tun == []
    s_drops, c_drops = server.table.get(pid("16.1")).drops, client.table.get(pid("1.1")).drops
    assert s_drops[DropReason.DUPLICATE] + s_drops[DropReason.REPLAY] >= 2
    assert c_drops[DropReason.DUPLICATE] + c_drops[DropReason.REPLAY] >= 2
    # traffic a while later, keepalives in between
    for k in range(1, 6):
        wire.tick(client, t + 4 * k)
        wire.tick(server, t + 4 * k)
    both_ways(wire, client, server, t + 25, 1)

    # the client restarts (a new session, same skew): its old datagrams stay refused
    t += 40
    client, server, wire = start(skew, t, server=server)
    both_ways(wire, client, server, t + 0.2, 2)
    assert server.from_udp([(captured_up, addr("16.1"))], t + 0.3).tun == []

    # the server restarts
    t += 40
    client, server, wire = start(skew, t, client=client)
    both_ways(wire, client, server, t + 0.2, 3)
    assert server.from_udp([(captured_up, addr("16.1"))], t + 0.3).tun == []
    assert client.from_udp([(captured_down, addr("1.1"))], t + 0.3 + skew).tun == []

    # a clock this far off is said once per session: the client saw two of
    # the server's, the restarted server one of the client's
    far = abs(skew) > CLOCK_NOTICE
    for node, sessions in ((client, 2), (server, 1)):
        lines = [n for n in node.notices if "clock is" in n]
        assert len(lines) == (sessions if far else 0), (name(node), lines)


def test_a_peer_whose_clock_is_set_through_the_tunnel_is_measured_again():
    """A device without a real-time clock starts a day behind, then sets its
    clock through the tunnel: a step forward keeps its session, and its next
    keepalive's challenge shows the server the clock moved."""
    t = T0
    client, server, wire = start(-DAY, t)
    both_ways(wire, client, server, t + 0.2)
    wire.skews["16.1"] = 0.0                     # the client's clock is set right
    for k in range(1, 4):
        wire.tick(client, t + 4 * k)
        wire.tick(server, t + 4 * k)
    both_ways(wire, client, server, t + 13, 1)
    assert server.table.get(pid("16.1")).clock_offset == pytest.approx(0, abs=1.5)


def test_a_challenge_is_answered_once_whatever_the_challengers_clock():
    client, server, wire = start(DAY, T0)
    challenge = [d for d, _ in client.tick(T0 + DAY + 4).sends if header_of(d).kind == KIND_CHALLENGE]
    assert challenge
    first = server.from_udp([(challenge[0], addr("16.1"))], T0 + 4)
    again = server.from_udp([(challenge[0], addr("16.1"))], T0 + 4.5)
    assert first.sends and not again.sends
    assert server.table.get(pid("16.1")).drops[DropReason.DUPLICATE] >= 1


def _prove_backdated(server, session: bytes, now: float, answer_ts: int) -> None:
    """What tests/tools/forge_udp.py does to prove a session: a challenge in
    `session` dated now, then the answer to the server's challenge back
    dated `answer_ts`, from another member's address."""
    from alpaca.protocol.constants import KIND_CHALLENGE, KIND_RESPONSE, NONCE_SIZE
    from alpaca.protocol.wire import open_sealed, peek
    from protocol_helpers import GROUP, make_datagram, pair_key
    from alpaca.protocol.crypto import derive_group_key
    elsewhere = addr("16.2")
    challenge = make_datagram("16.1", "1.1", b"\x01" * NONCE_SIZE, ts=now, seq=(1 << 20) - 2,
                              session=session, kind=KIND_CHALLENGE)
    out = server.from_udp([(challenge, elsewhere)], now)
    key = pair_key("16.1", "1.1")
    for dg, _ in out.sends:
        h = peek(derive_group_key(GROUP), dg)[0]
        if h.kind == KIND_CHALLENGE:
            nonce = open_sealed(key, h, dg)[:16]
            answer = make_datagram("16.1", "1.1", nonce, ts=answer_ts, seq=(1 << 20) - 1, session=session,
                                   kind=KIND_RESPONSE)
            server.from_udp([(answer, elsewhere)], now + 0.01)
            return
    raise AssertionError("the server did not challenge back")


def test_an_answer_dated_before_its_own_sessions_challenge_cannot_move_its_clock_back():
    """A session may not claim a clock behind one it already showed: its
    challenge said `now`, its answer says a minute ago. The session is
    proven (the answer is to our nonce) but judged by the later clock, so a
    datagram dated a minute ago is `replay`, counted, and not delivered."""
    server = make_node("1.1", trust_test_session=False, now=T0 - 10)
    session = b"\x55" * 8
    _prove_backdated(server, session, T0, T0 - 61)
    peer = server.table.get(pid("16.1"))
    assert session in peer.verified
    assert abs(peer.clock_offset) <= 1
    before = dict(peer.drops)
    from protocol_helpers import make_datagram
    old = make_datagram("16.1", "1.1", up()[0], ts=T0 - 60, seq=0, session=session)
    out = server.from_udp([(old, addr("16.2"))], T0 + 0.1)
    assert out.tun == []
    after = {k: v - before.get(k, 0) for k, v in peer.drops.items() if v != before.get(k, 0)}
    assert after == {DropReason.REPLAY: 1}


@pytest.mark.parametrize("skew", [600, -DAY])
def test_a_challenge_captured_before_a_restart_is_refused_once_the_clock_is_measured(skew):
    """After the server restarts it measures the client's clock from its
    new session's answer; a challenge of the client's old session, replayed
    then, is judged by that clock: `replay`, never answered."""
    from alpaca.protocol.constants import KIND_CHALLENGE, KIND_RESPONSE
    from protocol_helpers import header_of
    t = T0
    client, server, wire = start(skew, t)
    both_ways(wire, client, server, t + 0.2)
    old = [d for d, _ in client.tick(t + 4 + skew).sends if header_of(d).kind == KIND_CHALLENGE]
    assert old
    t += 40
    client, server, wire = start(skew, t)                  # both restart: the client's session is new
    both_ways(wire, client, server, t + 0.2)
    peer = server.table.get(pid("16.1"))
    assert peer.clock_offset == pytest.approx(skew, abs=1.5)
    replays = peer.drops[DropReason.REPLAY]
    out = server.from_udp([(old[0], addr("16.2"))], t + 1)
    assert not [d for d, _ in out.sends if header_of(d).kind == KIND_RESPONSE]
    assert peer.drops[DropReason.REPLAY] == replays + 1
