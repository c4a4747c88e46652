"""Real alpaca-tunnel daemons in a Testbed's namespaces: the runner of the
tests, the demo and the soak.

A Daemon is one alpaca-tunnel process in its namespace, with its config,
secrets.txt and log in its own directory. A Mesh writes the configs of
several (with keys it makes), starts them, moves a SHA-256-checked TCP
transfer between two of them, and takes everything down again.

Daemons run `python -m alpaca` with the directory that holds this alpaca
package as their working directory, so they run the same code as the lab.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .mesh import secrets_for, secrets_line
from .testbed import Testbed, wait_for, write_peer_config

PY = sys.executable
SOURCE = Path(__file__).resolve().parent.parent.parent     # the directory holding the alpaca package
TRANSFER_PORT = 5201


def lab_module(module: str, *args) -> list[str]:
    """argv that runs one of the lab's tools (`alpaca.lab.tcp_sink`, ...) as a module."""
    return [PY, "-m", module, *map(str, args)]


class Daemon:
    """One alpaca-tunnel in its namespace. `proc` is the running (or last) process."""

    def __init__(self, mesh: Mesh, name: str, peer_id: str, config_path: Path, secrets_lines: list[str]):
        self.mesh, self.name, self.id, self.config_path = mesh, name, peer_id, config_path
        self.secrets_lines = secrets_lines
        self.secrets_path = config_path.parent / "secrets.txt"
        self.log_path = config_path.parent / "daemon.log"
        self.proc: subprocess.Popen | None = None

    @property
    def control_socket(self) -> Path:
        return Path(json.loads(self.config_path.read_text())["control_socket"])

    def start(self, env: dict | None = None, launcher: list[str] | None = None) -> None:
        """Start the daemon, logging to log_path. `launcher`: what runs it
        instead of `python -m alpaca` (it gets `-C config.json`)."""
        argv = (launcher or [PY, "-m", "alpaca"]) + ["-C", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.proc = self.mesh.tb.popen(self.name, argv, stdout=log, stderr=log, env=env, cwd=SOURCE)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Signal the daemon and wait for it (SIGKILL after `timeout`); its exit status."""
        return self.mesh.tb.stop(self.proc, sig, timeout)

    def status(self) -> dict:
        """`alpaca-tunnel status --json` in the daemon's namespace."""
        r = self.run([PY, "-m", "alpaca", "-C", str(self.config_path), "status", "--json"], cwd=SOURCE)
        if r.returncode != 0:
            raise RuntimeError(f"status of {self.name}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def peer_status(self, peer_id: str) -> dict:
        return next(p for p in self.status()["peers"] if p["id"] == peer_id)

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run argv in the daemon's namespace (Testbed.run)."""
        return self.mesh.tb.run(self.name, argv, **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def write_secrets(self, lines: list[str]) -> None:
        """Replace secrets.txt as an editor does: write a new file, rename it over the old one."""
        tmp = self.secrets_path.with_suffix(".swp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o600)
        os.rename(tmp, self.secrets_path)


class Mesh:
    """Daemons with configs written under `workdir`; added with add() or
    add_topology(), started with start_all() (or each with start()).
    `defaults`: config keys of every daemon unless its own config says otherwise."""

    def __init__(self, tb: Testbed, workdir: Path, defaults: dict | None = None,
                 daemon_class: type[Daemon] = Daemon):
        self.tb, self.workdir = tb, workdir
        self.defaults = {"group": "test", **(defaults or {})}
        self.daemon_class = daemon_class
        self.peers: dict[str, Daemon] = {}
        self.keys: dict[str, str] = {}
        self.ip = tb.hosts                   # host name -> underlay address

    def key(self, peer_id: str) -> str:
        from alpaca.protocol.crypto import genkey
        return self.keys.setdefault(peer_id, genkey())

    def line(self, peer_id: str, ip: str | None, ip6: str | None = None) -> str:
        """The secrets.txt line of `peer_id` (listening at `ip` and `ip6`, if it has them)."""
        return secrets_line(peer_id, self.key(peer_id), ip, ip6)

    def add(self, name: str, host_number: int, config: dict, secrets: list[str]) -> Daemon:
        """A daemon on host `name` (made if new); not started."""
        if name not in self.tb.hosts:
            self.tb.add_host(name, host_number)
        config = {**self.defaults, "control_socket": str(self.workdir / f"{name}.sock"), **config}
        path = write_peer_config(self.workdir / name, config, secrets)
        peer = self.peers[name] = self.daemon_class(self, name, config["id"], path, secrets)
        return peer

    def add_topology(self, topology: dict[str, tuple[int, str, dict]], extra: dict[str, dict] | None = None) -> None:
        """A daemon per host of `topology` (as alpaca.lab.mesh.STANDARD), each
        knowing whom secrets_for says. `extra`: more config keys by host name."""
        for name, (host, _, _) in topology.items():
            if name not in self.tb.hosts:
                self.tb.add_host(name, host)
        lines = secrets_for(topology, {peer_id: self.key(peer_id) for _, peer_id, _ in topology.values()},
                            self.ip, self.tb.hosts6)
        for name, (host, peer_id, config) in topology.items():
            self.add(name, host, {"id": peer_id, **config, **(extra or {}).get(name, {})}, lines[name])

    def start_all(self, timeout: float = 10) -> None:
        """Start every daemon and wait until each has its control socket."""
        for peer in self.peers.values():
            peer.start()
        for peer in self.peers.values():
            if not wait_for(peer.control_socket.exists, timeout):
                raise RuntimeError(f"{peer.name} did not start:\n{peer.log_text()}")

    def transfer(self, sender: str, receiver: str, address: str, size: int = 16 << 20) -> float:
        """`size` random bytes over TCP from `sender` to a sink on `receiver`
        at `address` (alpaca.lab.tcp_send, alpaca.lab.tcp_sink); the sink's
        length and SHA-256 must match. Returns the seconds the sending took."""
        import hashlib
        data = os.urandom(size)
        src = self.workdir / f"payload-{sender}.bin"
        src.write_bytes(data)
        sink = self.tb.popen(receiver, lab_module("alpaca.lab.tcp_sink", address, TRANSFER_PORT),
                             stdout=subprocess.PIPE, text=True, cwd=SOURCE)
        try:
            if sink.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the TCP sink on {receiver} did not start")
            r = self.peers[sender].run(lab_module("alpaca.lab.tcp_send", address, TRANSFER_PORT, src),
                                       timeout=120, cwd=SOURCE)
            if r.returncode != 0:
                raise RuntimeError(f"sending from {sender} failed: {r.stderr.strip()}")
            line = sink.stdout.readline().split()
            sink.wait(30)
        finally:
            src.unlink()
            if sink.poll() is None:
                self.tb.stop(sink)
        expected = [str(len(data)), hashlib.sha256(data).hexdigest()]
        if line != expected:
            raise RuntimeError(f"{sender} -> {receiver}: sent {expected}, the sink got {line}")
        return float(r.stdout.split()[1])

    def transfer_cut(self, sender: str, receiver: str, address: str, size: int, tool: str, far: str,
                     after: float) -> tuple[float, int]:
        """`transfer`, while `sender` loses its way to the underlay address
        `far` `after` seconds in (`tool`: iptables-legacy or
        ip6tables-legacy, DROP in and out, removed again). Returns the
        seconds the sending took and the datagrams the cut dropped going out."""
        import threading
        rules = [["INPUT", "-s", far, "-j", "DROP"], ["OUTPUT", "-d", far, "-j", "DROP"]]
        peer = self.peers[sender]
        result: dict = {}

        def send() -> None:
            try:
                result["seconds"] = self.transfer(sender, receiver, address, size)
            except Exception as e:          # (re-raised in the caller's thread)
                result["error"] = e

        thread = threading.Thread(target=send)
        thread.start()
        try:
            time.sleep(after)
            for rule in rules:
                peer.run([tool, "-I", *rule], check=True)
            thread.join(120)
            counters = peer.run([tool, "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
        finally:
            thread.join(120)
            for rule in rules:
                peer.run([tool, "-D", *rule])
        if "error" in result:
            raise result["error"]
        return result["seconds"], int(next(line.split()[0] for line in counters.splitlines() if "DROP" in line))

    def source_seen(self, sender: str, receiver: str, address: str, port: int = 5002) -> str:
        """Open one TCP connection from `sender` to a listener on `receiver` at `address`; the source
        address the listener saw (behind a NAT: the NAT's)."""
        family = "AF_INET6" if ":" in address else "AF_INET"
        listener = self.tb.popen(receiver, [PY, "-c", (
            "import socket\n"
            f"s = socket.create_server(({address!r}, {port}), family=socket.{family}); print('ready', flush=True)\n"
            "s.settimeout(10); conn, peer = s.accept(); print(peer[0], flush=True)")],
            stdout=subprocess.PIPE, text=True)
        try:
            if listener.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the listener on {receiver} did not start")
            r = self.tb.run(sender, [PY, "-c", f"import socket; socket.create_connection(({address!r}, {port}), 5).close()"])
            if r.returncode != 0:
                raise RuntimeError(f"connecting from {sender} failed: {r.stderr.strip()}")
            return listener.stdout.readline().strip()
        finally:
            self.tb.stop(listener)

    def close(self) -> None:
        """Stop every daemon (SIGTERM), then remove the testbed's namespaces."""
        for peer in self.peers.values():
            if peer.proc is not None:
                peer.stop()
        self.tb.close()
