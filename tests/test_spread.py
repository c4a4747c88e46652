"""Tier 3: bulk spread over two lossy paths (docs/protocol.md §13 "Spreading").

A dual-stack pair (alpaca.lab.worlds.dual_stack_pair: server 1.1 listed
with ip and ip6, so the client has two paths, one per family) whose
underlay loses 30 % of the tunnel's datagrams each way on both families.
The client's first transfer finds both paths lossy and switches its bulk
to spreading: each shard on one path, parity for one path's loss. Then one
family is cut in the middle of a transfer: the quiet path gets no more
blocks within SPREAD_HEARD, every shard goes on every path again, and the
connection carries on intact.
"""

from __future__ import annotations

import pytest

from alpaca.lab.testbed import wait_for
from alpaca.lab.worlds import dual_stack_pair

pytestmark = pytest.mark.root


@pytest.fixture
def lossy_dual_pair(tmp_path):
    with dual_stack_pair(tmp_path, loss=0.3) as mesh:
        yield mesh


def test_two_lossy_paths_spread_bulk_and_a_path_lost_mid_transfer_loses_nothing(lossy_dual_pair):
    mesh = lossy_dual_pair
    c1 = mesh.peers["c1"]
    mesh.transfer("c1", "s1", "10.17.1.1", size=16 << 20)
    assert wait_for(lambda: c1.peer_status("1.1")["spread"], 5), c1.peer_status("1.1")
    peer = c1.peer_status("1.1")
    assert 0.15 < peer["loss"] < 0.5, peer              # one path's loss, not the union's ~9 %
    assert peer["parity"] >= 30, peer
    assert "bulk spread over 2 paths" in c1.log_text()
    # IPv6 cut both ways half a second into a transfer: it arrives intact (sha256)
    seconds, dropped = mesh.transfer_cut("c1", "s1", "10.17.1.1", 64 << 20, "ip6tables-legacy",
                                         mesh.tb.hosts6["s1"], 0.5)
    assert seconds > 0.5 and dropped > 100, (seconds, dropped)
