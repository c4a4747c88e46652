"""Shared fixtures. Tier-3 fixtures build real peers in network namespaces
(alpaca.lab.testbed) and always tear them down, also when a test fails."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca.lab.mesh import STANDARD, secrets_for, secrets_line
from alpaca.lab.testbed import Testbed, wait_for, write_peer_config

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TOOLS = Path(__file__).parent / "tools"
_counter = itertools.count()


def can_run_tier3() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def pytest_collection_modifyitems(config, items):
    why = can_run_tier3()
    if why:
        skip = pytest.mark.skip(reason=f"tier 3: {why}")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


def unique_prefix() -> str:
    return f"at{os.getpid() % 100000}{next(_counter)}"


@pytest.fixture
def testbed():
    tb = Testbed(unique_prefix())
    yield tb
    tb.close()


class Peer:
    """One running alpaca-tunnel in its namespace."""

    def __init__(self, mesh: "Mesh", name: str, peer_id: str, config_path: Path):
        self.mesh, self.name, self.id, self.config_path = mesh, name, peer_id, config_path
        self.proc = None
        self.log_path = config_path.parent / "daemon.log"

    def start(self) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = self.mesh.tb.popen(self.name, [PY, "-m", "alpaca", "-C", str(self.config_path)],
                                       stdout=self.log, stderr=self.log)

    def stop(self, sig=15) -> int | None:
        return self.mesh.tb.stop(self.proc, sig)

    def status(self) -> dict:
        r = self.mesh.tb.run(self.name, [PY, "-m", "alpaca", "-C", str(self.config_path), "status", "--json"])
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def peer_status(self, peer_id: str) -> dict:
        return next(p for p in self.status()["peers"] if p["id"] == peer_id)

    def run(self, argv, **kw):
        return self.mesh.tb.run(self.name, argv, **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Mesh:
    """Peers with configs written to a temp dir; `peers[name]` are started by start()."""

    def __init__(self, tb: Testbed, workdir: Path):
        self.tb, self.workdir = tb, workdir
        self.peers: dict[str, Peer] = {}
        self.keys: dict[str, str] = {}

    def key(self, peer_id: str) -> str:
        from alpaca.protocol.crypto import genkey
        return self.keys.setdefault(peer_id, genkey())

    def line(self, peer_id: str, ip: str | None) -> str:
        return secrets_line(peer_id, self.key(peer_id), ip)

    def add(self, name: str, host_number: int, config: dict, secrets: list[str]) -> Peer:
        self.tb.add_host(name, host_number) if name not in self.tb.hosts else None
        config = {"group": "test", "control_socket": str(self.workdir / f"{name}.sock"), **config}
        path = write_peer_config(self.workdir / name, config, secrets)
        peer = self.peers[name] = Peer(self, name, config["id"], path)
        return peer

    def start_all(self) -> None:
        for peer in self.peers.values():
            peer.start()
        for peer in self.peers.values():
            ok = wait_for(lambda: Path(json.loads(peer.config_path.read_text())["control_socket"]).exists(), 10)
            assert ok, f"{peer.name} did not start:\n{peer.log_text()}"

    def transfer(self, sender: str, receiver: str, address: str, size: int = 16 << 20) -> None:
        """`size` random bytes over TCP from `sender` to a sink on `receiver`
        at `address`; the sink's length and SHA-256 must match."""
        data = os.urandom(size)
        src = self.workdir / f"payload-{sender}.bin"
        src.write_bytes(data)
        sink = self.tb.popen(receiver, [PY, str(TOOLS / "tcp_sink.py"), address, "5201"],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout.readline().strip() == "ready"
            r = self.peers[sender].run([PY, str(TOOLS / "tcp_send.py"), address, "5201", str(src)], timeout=120)
            assert r.returncode == 0, r.stderr
            line = sink.stdout.readline().split()
            sink.wait(30)
        finally:
            if sink.poll() is None:
                self.tb.stop(sink)
        assert line == [str(len(data)), hashlib.sha256(data).hexdigest()]

    def close(self) -> None:
        for peer in self.peers.values():
            if peer.proc is not None:
                peer.stop()
        self.tb.close()


@contextlib.contextmanager
def mesh4_world(tmp_path_factory, name: str = "mesh4", c1: dict | None = None, c2: dict | None = None):
    """The lab's standard mesh (alpaca/lab/mesh.py): servers 1.1 and 1.2, client
    16.1 (gateway 1.1, forwarders 1.1 and 1.2), client 16.2 (gateway 1.1).
    Clients know only the servers. `c1`, `c2`: extra config keys of the clients."""
    if can_run_tier3():
        pytest.skip(can_run_tier3())
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path_factory.mktemp(name))
    try:
        ip = {name: tb.add_host(name, host) for name, (host, _, _) in STANDARD.items()}
        lines = secrets_for(STANDARD, {peer_id: mesh.key(peer_id) for _, peer_id, _ in STANDARD.values()}, ip)
        extra = {"c1": c1 or {}, "c2": c2 or {}}
        for name, (host, peer_id, config) in STANDARD.items():
            mesh.add(name, host, {"id": peer_id, **config, **extra.get(name, {})}, lines[name])
        mesh.ip = ip
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
def lossy_pair(tmp_path_factory, name: str, loss: float, s1: dict, c1: dict, up_timeout: float = 20):
    """Server 1.1 (s1) and client 16.1 (c1) whose underlay drops `loss` of the
    UDP datagrams each way (iptables-legacy statistic on INPUT; offloads off
    on the veth, so one verdict drops one datagram). `s1`, `c1`: extra config
    keys. The rules go with the namespaces, also when a test fails."""
    if can_run_tier3():
        pytest.skip(can_run_tier3())
    rule = ["INPUT", "-p", "udp", "--dport", "1040", "-m", "statistic", "--mode", "random",
            "--probability", str(loss), "-j", "DROP"]
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path_factory.mktemp(name))
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


@pytest.fixture(scope="module")
def mesh4(tmp_path_factory):
    with mesh4_world(tmp_path_factory) as mesh:
        yield mesh
