"""Tier 3: TUN offloads for real (docs/protocol.md "Fragments").

Servers 1.1 and 1.2 run with offloads (the default); client 16.1 too, and
uses both servers as forwarders; client 16.2 runs with `offload: false`
(alpaca.lab.worlds.mesh4_world). TCP transfers in both directions arrive intact
whether the sender hands over super-packets or single packets, and shards
relayed by a forwarder are reassembled exactly once.
"""

from __future__ import annotations

import pytest

from alpaca.lab.worlds import mesh4_world

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    # 16.2 also sends without parity: with the default `fec: "auto"` its
    # first second goes out as FEC batches (the prior, docs/protocol.md §13),
    # and these tests are about what happens to single packets
    with mesh4_world(tmp_path_factory.mktemp("offload"), c2={"offload": False, "fec": "off"}) as mesh:
        yield mesh


def test_offloaded_client_sends_super_packets_as_shards(mixed):
    before = mixed.peers["c1"].peer_status("1.1")
    mixed.transfer("c1", "s1", "10.17.1.1")
    after = mixed.peers["c1"].peer_status("1.1")
    sent_bytes = after["tx_bytes"] - before["tx_bytes"]
    sent_messages = after["tx_packets"] - before["tx_packets"]
    # one message per super-packet: far bigger than one datagram on average
    # (tx_bytes counts each shard once, not once per path)
    assert sent_bytes / sent_messages > 8000, (sent_bytes, sent_messages)


def test_plain_client_and_offloaded_server_interoperate_both_ways(mixed):
    before = mixed.peers["c2"].peer_status("1.1")
    mixed.transfer("c2", "s1", "10.17.1.1")       # single packets up
    after = mixed.peers["c2"].peer_status("1.1")
    assert (after["tx_bytes"] - before["tx_bytes"]) / (after["tx_packets"] - before["tx_packets"]) < 1500
    mixed.transfer("s1", "c2", "10.17.16.2")      # super-packets down, into a TUN without offloads


def test_a_forwarder_relays_shards_and_the_server_takes_each_message_once(mixed):
    s2_before = mixed.peers["s2"].peer_status("16.1")["relayed_packets"]
    mixed.transfer("c1", "s1", "10.17.1.1", size=8 << 20)
    # shards are relayed as datagrams of their own (each authenticated by its MAC)
    assert mixed.peers["s2"].peer_status("16.1")["relayed_packets"] > s2_before + 100
    s1 = mixed.peers["s1"].status()
    # every shard came twice (direct and through 1.2): the second copy is
    # dropped by the replay window as a duplicate
    row = next(p for p in s1["peers"] if p["id"] == "16.1")
    assert row["drops"].get("duplicate", 0) > 100, s1
    assert "Traceback" not in mixed.peers["s1"].log_text()
