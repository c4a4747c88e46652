"""Ready-made meshes of running daemons, as context managers that always
take everything down again: the standard mesh, a pair over a lossy
underlay, and a dual-stack pair. The tests' fixtures use them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .daemons import Mesh
from .mesh import STANDARD
from .testbed import Testbed, unique_prefix, wait_for


@contextlib.contextmanager
def mesh4_world(workdir: Path, c1: dict | None = None, c2: dict | None = None,
                families: tuple[str, ...] = ("4",)) -> Iterator[Mesh]:
    """The lab's standard mesh (alpaca/lab/mesh.py): servers 1.1 and 1.2, client
    16.1 (gateway 1.1, forwarders 1.1 and 1.2), client 16.2 (gateway 1.1).
    Clients know only the servers. `c1`, `c2`: extra config keys of the clients.
    `families`: the underlay's address families (Testbed); the servers'
    secrets.txt lines give every address they have."""
    mesh = Mesh(Testbed(unique_prefix(), families=families), workdir)
    try:
        mesh.add_topology(STANDARD, {"c1": c1 or {}, "c2": c2 or {}})
        mesh.start_all()
        # the first keepalives teach the servers where the clients are
        assert wait_for(lambda: all(p["up"] for p in mesh.peers["s1"].status()["peers"]
                                    if p["id"] in ("16.1", "16.2")), 10), mesh.peers["s1"].status()
        # ... and a client takes the server's datagrams only from the second
        # after its own start on (replay_floor, docs/protocol.md §5): wait
        # for a round trip, so no test loses its first pings to that
        for client in ("c1", "c2"):
            assert wait_for(lambda: mesh.peers[client].run(
                ["ping", "-n", "-c", "1", "-W", "1", "10.17.1.1"]).returncode == 0, 10), client
        yield mesh
    finally:
        mesh.close()


@contextlib.contextmanager
def lossy_pair(workdir: Path, loss: float, s1: dict, c1: dict, up_timeout: float = 20) -> Iterator[Mesh]:
    """Server 1.1 (s1) and client 16.1 (c1) whose underlay drops `loss` of the
    UDP datagrams each way (iptables-legacy statistic on INPUT; offloads off
    on the veth, so one verdict drops one datagram). `s1`, `c1`: extra config
    keys. The rules go with the namespaces, also when a test fails."""
    rule = ["INPUT", "-p", "udp", "--dport", "1040", "-m", "statistic", "--mode", "random",
            "--probability", str(loss), "-j", "DROP"]
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, workdir)
    ruled = []
    try:
        ip = {"s1": tb.add_host("s1", 1), "c1": tb.add_host("c1", 16)}
        servers = [mesh.line("1.1", ip["s1"])]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server", **s1}, servers + [mesh.line("16.1", None)])
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1", **c1},
                 servers + [mesh.line("16.1", None)])
        for host in ("s1", "c1"):
            tb.run(host, ["ethtool", "-K", "eth0", "gso", "off", "tso", "off", "gro", "off",
                          "tx-udp-segmentation", "off"])
            r = tb.run(host, ["iptables-legacy", "-I"] + rule)
            assert r.returncode == 0, r.stderr
            ruled.append(host)
        mesh.start_all()
        assert wait_for(lambda: any(p["up"] for p in mesh.peers["s1"].status()["peers"]), up_timeout)
        yield mesh
    finally:
        for host in ruled:
            tb.run(host, ["iptables-legacy", "-D"] + rule)
        mesh.close()


@contextlib.contextmanager
def dual_stack_pair(workdir: Path, loss: float | None = None) -> Iterator[Mesh]:
    """Server 1.1 (s1), listed with both ip and ip6, and client 16.1 (c1),
    which so reaches it on two paths at once, one per family. With `loss`,
    the underlay drops that share of the tunnel's datagrams each way on both
    families (iptables-legacy and ip6tables-legacy statistic on INPUT;
    offloads off on the veth). Yields once the server has learned the
    client on both families."""
    rule = ["INPUT", "-p", "udp", "--dport", "1040", "-m", "statistic", "--mode", "random",
            "--probability", str(loss), "-j", "DROP"]
    tb = Testbed(unique_prefix(), families=("4", "6"))
    mesh = Mesh(tb, workdir)
    ruled = []
    try:
        tb.add_host("s1", 1)
        tb.add_host("c1", 16)
        server = mesh.line("1.1", tb.hosts["s1"], tb.hosts6["s1"])
        client = mesh.line("16.1", None)
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, [server, client])
        mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"}, [server, client])
        if loss is not None:
            for host in ("s1", "c1"):
                tb.run(host, ["ethtool", "-K", "eth0", "gso", "off", "tso", "off", "gro", "off",
                              "tx-udp-segmentation", "off"])
                for tool in ("iptables-legacy", "ip6tables-legacy"):
                    r = tb.run(host, [tool, "-I"] + rule)
                    assert r.returncode == 0, r.stderr
                    ruled.append((host, tool))
        mesh.start_all()
        c1 = mesh.peers["c1"]
        assert wait_for(lambda: c1.run(["ping", "-n", "-c", "1", "-W", "1", "10.17.1.1"]).returncode == 0, 20)
        # the server has learned the client on both families (keepalives go on both static paths)
        assert wait_for(lambda: {p["family"] for p in mesh.peers["s1"].peer_status("16.1")["paths"]}
                        == {"ipv4", "ipv6"}, 20), (mesh.peers["s1"].peer_status("16.1")["paths"],
                                                   c1.peer_status("1.1")["paths"])
        yield mesh
    finally:
        for host, tool in ruled:
            tb.run(host, [tool, "-D"] + rule)
        mesh.close()
