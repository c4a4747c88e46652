"""Tier 1: a peer's `state` and a daemon's `health` (alpaca/protocol/health.py),
as pure functions of snapshot data, and as a client's and a server's
snapshots show them over an idle tunnel whose server then goes away."""

from __future__ import annotations

import pytest
from protocol_helpers import SERVERS, T0, Wire, make_node, udp

from alpaca.protocol.health import LIVE_WITHIN, daemon_health, peer_state
from alpaca.protocol.peers import PROBE_TIMEOUT


def peer(role=None, rx=None, data=None, delivers=(), peer_id="1.1") -> dict:
    return {"id": peer_id, "role": role, "last_rx_age": rx, "last_data_age": data,
            "paths": [{"address": f"192.0.2.{i}:1040", "delivers": d} for i, d in enumerate(delivers, 1)]}


STATES = {
    "data lately": (peer("gateway", rx=1.0, data=1.0), 100, "active"),
    "only probe answers lately (an idle tunnel)": (peer("gateway", rx=3.0, data=300.0), 100, "idle"),
    "never any data, answers": (peer("forwarder", rx=3.0), 100, "idle"),
    "heard at the threshold": (peer("gateway", rx=LIVE_WITHIN), 100, "idle"),
    "just started, first probe out": (peer("gateway", delivers=(None,)), 1, "pending"),
    "just started, no way to probe yet": (peer("gateway"), 0.5, "pending"),
    "first probe waited in vain": (peer("gateway", delivers=(False,)), PROBE_TIMEOUT + 1, "unreachable"),
    "never answered, long after the start": (peer("gateway", delivers=(None,)), LIVE_WITHIN + 1, "unreachable"),
    "answers stopped": (peer("gateway", rx=LIVE_WITHIN + 0.5, data=20.0, delivers=(False,)), 100, "unreachable"),
    "answers stopped, no way left to probe": (peer("forwarder", rx=70.0), 100, "unreachable"),
    "another client, never heard": (peer(None), 100, "silent"),
    "another client, heard long ago": (peer(None, rx=30.0, data=30.0), 100, "silent"),
    "a server's client, keepalives arriving": (peer(None, rx=2.0), 100, "idle"),
    "a server's client, sending": (peer(None, rx=0.1, data=0.1), 100, "active"),
}


@pytest.mark.parametrize("case", STATES)
def test_peer_state(case):
    data, uptime, expected = STATES[case]
    assert peer_state(data, uptime) == expected


def verdict(*peers) -> dict:
    return daemon_health({"peers": [{**p, "state": peer_state(p, 100)} for p in peers]})


def test_health_verdicts():
    ok = verdict(peer("gateway", rx=2.0, delivers=(True,)), peer(None, peer_id="16.2"))
    assert ok == {"status": "ok", "code": 0, "summary": "gateway 1.1 idle"}
    dead = verdict(peer("gateway", rx=20.0, delivers=(False,)))
    assert dead["code"] == 2 and dead["summary"] == "gateway 1.1 unreachable (no answer for 20s)"
    rejected = verdict(peer("gateway", delivers=(False,)))
    assert rejected["code"] == 2 and rejected["summary"] == "gateway 1.1 unreachable (never answered)"
    # one of two forwarders down: the gateway still answers through the other
    degraded = verdict(peer("gateway", rx=1.0, delivers=(True, False)),
                       peer("forwarder", rx=1.0, peer_id="1.2"), peer("forwarder", rx=30.0, peer_id="1.3"))
    assert degraded["status"] == "warning" and degraded["code"] == 1
    assert degraded["summary"] == ("gateway 1.1 idle, but 192.0.2.2:1040 does not deliver; "
                                   "forwarder 1.3 unreachable (no answer for 30s); forwarder 1.2 idle")
    # a server depends on no one: ok whatever its clients do
    server = verdict(peer(None, rx=1.0, data=1.0, peer_id="16.1"), peer(None, rx=2.0, peer_id="16.2"),
                     peer(None, peer_id="16.3"))
    assert server == {"status": "ok", "code": 0,
                      "summary": "no peer required; 1 active, 1 idle, 1 silent of 3 peers"}



def test_an_idle_client_and_its_server_see_each_other_alive_until_the_server_goes():
    c = make_node("16.1", ids=SERVERS + ("16.2",), gateway="1.1", now=T0)
    s1 = make_node("1.1", ids=SERVERS + ("16.1",), now=T0)
    snap = c.snapshot(T0)
    assert {p["id"]: p["state"] for p in snap["peers"]}["1.1"] == "pending"
    assert snap["health"]["code"] == 1
    wire = Wire(c, s1)
    t = T0
    for t in (T0, T0 + 1, T0 + 2, T0 + 3, T0 + 7, T0 + 11, T0 + 15, T0 + 19):      # keepalives only
        wire.tick(c, t)
    snap = c.snapshot(t + 1)
    by_id = {p["id"]: p for p in snap["peers"]}
    assert (by_id["1.1"]["role"], by_id["1.1"]["state"]) == ("gateway", "idle")
    assert by_id["1.1"]["last_data_age"] is None
    assert (by_id["1.2"]["role"], by_id["1.2"]["state"], by_id["16.2"]["state"]) == (None, "silent", "silent")
    assert snap["health"] == {"status": "ok", "code": 0, "summary": "gateway 1.1 idle"}
    server = {p["id"]: p["state"] for p in s1.snapshot(t + 1)["peers"]}
    assert server["16.1"] == "idle"
    # data from the server: active
    wire.originate(s1, [udp("8.8.8.8", "10.17.16.1")], t + 1)
    assert {p["id"]: p["state"] for p in c.snapshot(t + 2)["peers"]}["1.1"] == "active"
    assert {p["id"]: p["state"] for p in c.snapshot(t + 2 + LIVE_WITHIN)["peers"]}["1.1"] != "active"
    # the server goes: keepalives and probes go unanswered
    del wire.nodes[next(a for a, n in wire.nodes.items() if n is s1)]
    gone = t + 2
    for t in (gone + 3, gone + 7, gone + 11, gone + 15):
        wire.tick(c, t)
    snap = c.snapshot(t)
    assert {p["id"]: p["state"] for p in snap["peers"]}["1.1"] == "unreachable"
    assert snap["health"]["code"] == 2 and snap["health"]["summary"].startswith("gateway 1.1 unreachable")
