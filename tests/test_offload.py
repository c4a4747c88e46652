"""Tier 3: TUN offloads for real (docs/protocol.md "Fragments").

Servers 1.1 and 1.2 run with offloads (the default); client 16.1 too, and
uses both servers as forwarders; client 16.2 runs with `offload: false`. TCP transfers in both directions arrive intact
whether the sender hands over super-packets or single packets, and shards
relayed by a forwarder are reassembled exactly once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, Mesh, Testbed, can_run_tier3, unique_prefix, wait_for

pytestmark = pytest.mark.root
TOOLS = Path(__file__).parent / "tools"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    if can_run_tier3():
        pytest.skip(can_run_tier3())
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path_factory.mktemp("offload"))
    try:
        ip = {"s1": tb.add_host("s1", 1), "s2": tb.add_host("s2", 2),
              "c1": tb.add_host("c1", 16), "c2": tb.add_host("c2", 17)}
        servers = [mesh.line("1.1", ip["s1"]), mesh.line("1.2", ip["s2"])]
        everyone = servers + [mesh.line("16.1", None), mesh.line("16.2", None)]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, everyone)
        mesh.add("s2", 2, {"id": "1.2", "mode": "server"}, everyone)
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1", "forwarders": ["1.1", "1.2"]},
                 servers + [mesh.line("16.1", None)])
        mesh.add("c2", 17, {"id": "16.2", "mode": "client", "gateway": "1.1", "offload": False},
                 servers + [mesh.line("16.2", None)])
        mesh.start_all()
        assert wait_for(lambda: all(p["up"] for p in mesh.peers["s1"].status()["peers"]
                                    if p["id"] in ("16.1", "16.2")), 10), mesh.peers["s1"].status()
        yield mesh
    finally:
        mesh.close()


def transfer(mesh, sender: str, receiver: str, address: str, size: int = 16 << 20) -> None:
    """`size` random bytes over TCP; the sink's length and SHA-256 must match."""
    data = os.urandom(size)
    src = mesh.workdir / f"payload-{sender}.bin"
    src.write_bytes(data)
    sink = mesh.tb.popen(receiver, [PY, str(TOOLS / "tcp_sink.py"), address, "5201"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        r = mesh.peers[sender].run([PY, str(TOOLS / "tcp_send.py"), address, "5201", str(src)], timeout=120)
        assert r.returncode == 0, r.stderr
        line = sink.stdout.readline().split()
        sink.wait(30)
    finally:
        if sink.poll() is None:
            mesh.tb.stop(sink)
    assert line == [str(len(data)), hashlib.sha256(data).hexdigest()]


def test_offloaded_client_sends_super_packets_as_shards(mixed):
    before = mixed.peers["c1"].peer_status("1.1")
    transfer(mixed, "c1", "s1", "10.17.1.1")
    after = mixed.peers["c1"].peer_status("1.1")
    sent_bytes = after["tx_bytes"] - before["tx_bytes"]
    sent_messages = after["tx_packets"] - before["tx_packets"]
    # one message per super-packet: far bigger than one datagram on average
    # (tx_bytes counts each shard once, not once per path)
    assert sent_bytes / sent_messages > 8000, (sent_bytes, sent_messages)


def test_plain_client_and_offloaded_server_interoperate_both_ways(mixed):
    before = mixed.peers["c2"].peer_status("1.1")
    transfer(mixed, "c2", "s1", "10.17.1.1")       # single packets up
    after = mixed.peers["c2"].peer_status("1.1")
    assert (after["tx_bytes"] - before["tx_bytes"]) / (after["tx_packets"] - before["tx_packets"]) < 1500
    transfer(mixed, "s1", "c2", "10.17.16.2")      # super-packets down, into a TUN without offloads


def test_a_forwarder_relays_shards_and_the_server_takes_each_message_once(mixed):
    s2_before = mixed.peers["s2"].status()["relayed_shards"]
    transfer(mixed, "c1", "s1", "10.17.1.1", size=8 << 20)
    assert mixed.peers["s2"].status()["relayed_shards"] > s2_before
    s1 = mixed.peers["s1"].status()
    # every message came twice (direct and through 1.2): the second copy is
    # dropped as a duplicate shard or, once decoded, as a duplicate message
    row = next(p for p in s1["peers"] if p["id"] == "16.1")
    assert s1["drops"].get("duplicate_shard", 0) + row["drops"].get("duplicate", 0) > 0, s1
    assert "Traceback" not in mixed.peers["s1"].log_text()
