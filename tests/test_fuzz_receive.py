"""Tier 1: fuzzing the whole receive path (Node.from_udp) of a small mesh with real keys.

The harness is tests/fuzz_harness.py (docs/fuzzing.md; scripts/fuzz.py runs it long); here it runs short, with a
fixed seed. The invariant, checked for every input: it is either a valid
packet (delivered once, byte-identical to what a real sender sealed; a shard
held for its message; relayed once; a keepalive, loss report or answer
consumed; a challenge answered) or exactly one counted drop; no exception
escapes, and unauthenticated input (shards included) changes no per-peer
state. The mesh proves its sessions and paths by real challenges.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import fuzz_harness as fuzz
from protocol_helpers import T0, addr, make_node, pid, trust, tun_ip, udp

from alpaca.protocol import challenges as challenges_module
from alpaca.protocol import inbound as inbound_module
from alpaca.protocol import node as node_module
from alpaca.protocol import relay as relay_module
from alpaca.protocol import peers as peers_module
from alpaca.protocol.drops import DropReason




def harness(seed: int, **kw):
    h = fuzz.Harness(seed, **kw)
    h.warm_up()
    return h


# ---------------------------------------------------------------- the short run

def test_short_run_keeps_the_invariant():
    """~20,000 inputs, fixed seed; the per-peer state fingerprint is the
    helpers' own peer_state (slower, exactly what tests/test_node.py compares)."""
    h = harness(20240607, fingerprint=fuzz.helpers_fingerprint)
    t0 = time.perf_counter()
    try:
        h.run(20_000)
        h.check_totals()
    except fuzz.Violation as e:
        pytest.fail(f"{e}\n{h.reproducer()}")
    assert time.perf_counter() - t0 < 60
    total = sum(h.family_counts.values())
    assert total == 20_000
    # every family got its fixed share, and every outcome was reached
    for family, share in fuzz.FAMILIES:
        assert h.family_counts[family] == 20_000 * share // 100, family
    outcomes = h.totals()
    assert all(outcomes[o] > 0 for o in fuzz.OUTCOMES), outcomes
    # each input accounted once: drops counted on these inputs = dropped inputs,
    # plus the extra loop counts (a relay counts LOOP per skipped target)
    assert sum(h.drop_hist.values()) == outcomes["dropped"] + h.extra_loop
    assert h.extra_loop <= h.drop_hist["peer:loop"]
    # the new session layer was exercised: sessions proven, unproven ones
    # refused, challenges answered, shards of 16.1's messages held and decoded
    assert h.classes["unverified"] and h.classes["challenge"] and h.classes["response"]
    assert all(h.verified[n] for n in fuzz.NAMES)
    assert any(h.delivered[n] for n in fuzz.NAMES) and outcomes["held"]


def test_a_second_seed_with_the_fast_fingerprint():
    h = harness(2)
    try:
        h.run(10_000)
        h.check_totals()
    except fuzz.Violation as e:
        pytest.fail(f"{e}\n{h.reproducer()}")


# ---------------------------------------------------------------- hypothesis: raw bytes at the relay

RELAY = harness(99)          # one warmed-up mesh shared by the examples below
SOURCES = [fuzz.ADDR[n] for n in fuzz.NAMES] + fuzz.OTHER_SOURCES


def _feed_relay(data: bytes, source: tuple) -> str:
    try:
        return RELAY.feed("1.2", data, source, "hypothesis")
    except fuzz.Violation as e:
        pytest.fail(f"{e}\ninput to 1.2 from {source}: {data.hex()}")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2100), st.sampled_from(SOURCES))
def test_raw_bytes_into_the_relay_are_one_global_drop(data, source):
    before = sum(RELAY.nodes["1.2"].global_drops.values())
    assert _feed_relay(data, source) == "dropped"
    assert sum(RELAY.nodes["1.2"].global_drops.values()) == before + 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, fuzz.HISTORY - 1), st.lists(st.integers(0, 8 * 2000), max_size=6),
       st.integers(-1, 40), st.binary(max_size=40), st.sampled_from(SOURCES))
def test_mutated_real_datagrams_into_the_relay(pick, flips, cut, tail, source):
    datagram = bytearray(RELAY.history[pick % len(RELAY.history)][0])
    for bit in flips:
        bit %= len(datagram) * 8
        datagram[bit >> 3] ^= 1 << (bit & 7)
    if cut >= 0:
        del datagram[len(datagram) - cut:]
    _feed_relay(bytes(datagram) + tail, source)


# ---------------------------------------------------------------- the harness catches planted bugs

def _must_catch(h, inputs: int = 5000) -> str:
    with pytest.raises(fuzz.Violation) as caught:
        h.run(inputs)
    return str(caught.value)


def test_catches_a_skipped_replay_check(monkeypatch):
    h = harness(5)
    monkeypatch.setattr(peers_module.Peer, "check_replay", lambda self, *a, **kw: None)
    assert "dup input" in _must_catch(h)


def test_catches_a_session_taken_without_a_challenge(monkeypatch):
    """Datagrams for us of a session that never answered a challenge (the
    `session` family: a restarted or forging member) accepted as if proven."""
    h = harness(5)
    real_check_own = peers_module.Peer.check_own

    def trusting(self, session, ts, seq, now):
        if session not in self.verified:
            return self.check_replay(-1, session, ts, seq, now)
        return real_check_own(self, session, ts, seq, now)
    monkeypatch.setattr(peers_module.Peer, "check_own", trusting)
    assert "unverified input" in _must_catch(h)


def test_catches_an_answer_taken_for_a_nonce_never_sent(monkeypatch):
    """A replayed or stale answer (no challenge outstanding for its nonce)
    taken as proof: it would re-verify a session from a floor in the past."""
    h = harness(5)
    real_on_response = node_module.Node._on_response

    def credulous(self, src, header, plaintext, size, addr, now, out):
        nonce = plaintext[:len(plaintext) - header.pad]
        if nonce not in src.challenges:
            src.challenges[nonce] = (now, addr, False, False, 0)
        return real_on_response(self, src, header, plaintext, size, addr, now, out)
    monkeypatch.setattr(node_module.Node, "_on_response", credulous)
    assert "response input" in _must_catch(h)


def test_catches_a_shard_kept_without_its_mac(monkeypatch):
    """Shards whose MAC does not verify (forged shard headers, flipped bits
    of a real shard) filed, counted or relayed."""
    h = harness(5)
    monkeypatch.setattr(inbound_module, "shard_authentic", lambda key, clear, datagram: True)
    assert "unauth input" in _must_catch(h)


def test_catches_challenges_sent_beyond_their_rate(monkeypatch):
    """A node that challenges a peer on every datagram it cannot take: each
    replayed or forged one would cost a round of datagrams to its paths."""
    h = harness(5)
    monkeypatch.setattr(challenges_module, "CHALLENGE_INTERVAL", 0.0)
    assert "challenged" in _must_catch(h, 20_000)


def test_catches_unauthenticated_input_accepted(monkeypatch):
    h = harness(5)
    real_open = inbound_module.open_sealed

    def open_anything(key, header, datagram):
        try:
            return real_open(key, header, datagram)
        except inbound_module.CryptoError:
            return datagram[26:-16]          # "decrypts" without checking the tag
    monkeypatch.setattr(inbound_module, "open_sealed", open_anything)
    assert "unauth input" in _must_catch(h)


def test_catches_state_changed_before_authentication(monkeypatch):
    h = harness(5)
    real_pair_key = peers_module.PeerTable.pair_key

    def leaky(self, a, b):
        key = real_pair_key(self, a, b)
        if key is not None and a in self.peers:
            self.peers[a].rx_bytes += 1      # a counter moved by an unchecked header
        return key
    monkeypatch.setattr(peers_module.PeerTable, "pair_key", leaky)
    assert "changed per-peer state" in _must_catch(h)


def test_catches_a_relay_that_keeps_the_ttl(monkeypatch):
    h = harness(5)
    real_rewrite = relay_module.rewrite_mutable
    monkeypatch.setattr(relay_module, "rewrite_mutable",
                        lambda d, mask, ttl, path: real_rewrite(d, mask, ttl + 1, path))
    assert "relay header ttl" in _must_catch(h)


def test_catches_a_silent_drop(monkeypatch):
    h = harness(5)
    monkeypatch.setattr(node_module.Node, "_relay", lambda self, *a: None)
    # (a first copy, or a copy of one, whichever the fuzz meets first)
    caught = _must_catch(h)
    assert "fresh input" in caught or ("dup input" in caught and "drop" in caught)


def test_catches_an_escaping_exception(monkeypatch):
    h = harness(5)
    real_fields = inbound_module.fields

    def fragile(clear):
        if clear[23] == 0x07:           # the low byte of seq: real datagrams get here
            raise IndexError("planted")
        return real_fields(clear)
    monkeypatch.setattr(inbound_module, "fields", fragile)
    assert "exception escaped" in _must_catch(h, 20_000)


# ---------------------------------------------------------------- findings

def test_a_peer_heard_at_its_static_ipv6_address_is_one_path():
    """Found by the fuzz work: an AF_INET6 socket reports (host, port, flowinfo,
    scope_id). The core's contract is plain (host, port) pairs; alpaca/host/udp.py
    converts at the boundary (tests/test_udp.py), so a peer heard at its static
    IPv6 address is one path, not two."""
    v6 = ("2001:db8::161", 1040)
    gw = make_node("1.1", ids=("1.1", "16.1"), static={"1.1": addr("1.1"), "16.1": v6})
    client = make_node("16.1", ids=("1.1", "16.1"), static={"1.1": addr("1.1")}, gateway="1.1")
    trust(gw, client.session)                   # (as if it had answered a challenge)
    keepalive = client.tick(T0).sends[0][0]
    gw.from_udp([(keepalive, v6)], T0)
    assert list(gw.table.get(pid("16.1")).paths) == [v6]
    sends = gw.from_tun([udp(tun_ip("1.1"), tun_ip("16.1"))], T0).sends
    assert len(sends) == 1, f"one packet sent {len(sends)} times to the same peer: {[a for _, a in sends]}"


def test_loop_guard_counts_per_target_not_per_input():
    """Not a bug (docs/protocol.md §6 "once per skipped target"), but the one
    place where an input is not 'exactly one drop': a relay that skips one
    target for the loop guard and sends on another both relays the input and
    counts LOOP."""
    relay = make_node("1.2", ids=("1.1", "1.2", "16.1"))
    gateway = make_node("1.1", ids=("1.1", "1.2", "16.1"), inactive_downward_static=True)
    client = make_node("16.1", ids=("1.1", "1.2", "16.1"), gateway="1.1", forwarders=("1.2",))
    # 1.2 learns a second direct path of 1.1 (any authenticated datagram for 1.2 from there,
    # of a session 1.2 has verified; its credit pays for one relay of the same size)
    trust(relay, gateway.session)
    to_relay = gateway.from_tun([udp(tun_ip("1.1"), tun_ip("1.2"))], T0).sends[0][0]
    relay.from_udp([(to_relay, ("198.51.100.7", 1040))], T0)
    # 16.1 sends a packet whose inner destination is 1.1's public address
    datagram = client.from_tun([udp(tun_ip("16.1"), addr("1.1")[0])], T0).sends[0][0]
    out = relay.from_udp([(datagram, addr("16.1"))], T0)
    peer = relay.table.get(pid("16.1"))
    assert [a for _, a in out.sends] == [("198.51.100.7", 1040)]
    assert peer.relayed_packets == 1 and peer.drops[DropReason.LOOP] == 1
