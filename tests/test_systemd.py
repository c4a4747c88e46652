"""Tier 3: the shipped unit under a real systemd (PID 1 of a systemd-nspawn container).

The container boots the host's own root file system (read-only, with a
throwaway overlay), lives in a network namespace of our testbed, and runs
systemd/alpaca-tunnel.service with ExecStart pointing at this checkout's venv.
A client daemon runs in another namespace on the same bridge. We drive
systemctl from outside with nsenter, as an operator would from inside.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca.testbed import wait_for
from conftest import Mesh, unique_prefix

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SRC = "/run/alpaca-src"         # where the container sees this checkout


def _have_nspawn() -> bool:
    return shutil.which("systemd-nspawn") is not None and Path("/usr/lib/systemd/systemd").exists()


class Container:
    def __init__(self, tb, nsname: str, workdir: Path, confdir: Path, units: Path):
        self.workdir = workdir
        self.machine = f"alpaca{os.getpid() % 100000}"
        self.root = workdir / "hostroot"
        self.root.mkdir()
        subprocess.run(["mount", "--bind", "/", str(self.root)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(self.root)], check=True)
        self.console = open(workdir / "console.log", "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "--boot", "-M", self.machine,
             "--register=no", "--keep-unit", "--console=read-only", "--volatile=overlay",
             f"--network-namespace-path=/run/netns/{nsname}", "--capability=CAP_NET_ADMIN",
             f"--bind-ro={units}:/run/systemd/system", f"--bind={confdir}:/etc/alpaca-tunnel.d",
             # the checkout and its venv; not at their own path: nspawn's /tmp
             # tmpfs would hide a clone under /tmp
             f"--bind-ro={ROOT}:{SRC}",
             "--", "systemd.unit=multi-user.target"],
            stdout=self.console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.leader = wait_for(self._leader, 30)
        assert self.leader, (workdir / "console.log").read_text(errors="replace")[-3000:]
        assert wait_for(lambda: Path(f"/proc/{self.leader}/root/run/systemd/private").exists(), 30)
        self.ctl("systemctl", "is-system-running", "--wait", timeout=90)

    def _leader(self):
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, ppid, comm = line.split(None, 2)
            if int(ppid) == self.proc.pid and comm.strip() == "systemd":
                return int(pid)
        return None

    def ctl(self, *argv, timeout=60, check=False) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *argv],
                              capture_output=True, text=True, timeout=timeout, check=check)

    def show(self, prop: str) -> str:
        return self.ctl("systemctl", "show", "-P", prop, "alpaca-tunnel").stdout.strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.leader:
                self.ctl("systemctl", "poweroff", timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()        # only our nspawn, by PID
                self.proc.wait(10)
        subprocess.run(["umount", str(self.root)], check=False)
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.machine}", ignore_errors=True)


@pytest.fixture
def unit_world(tmp_path):
    if not _have_nspawn():
        pytest.skip("systemd-nspawn not installed")
    from alpaca.testbed import Testbed
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path)
    container = None
    try:
        server_ip = tb.add_host("ct", 1)
        tb.add_host("c1", 16)
        tb.add_host("c2", 17)
        confdir = tmp_path / "etc"
        confdir.mkdir()
        (confdir / "config.json").write_text(
            '{"id": "1.1", "mode": "server", "group": "test", "name": "alpaca0"}\n')
        server_lines = [mesh.line("1.1", server_ip), mesh.line("16.1", None)]
        (confdir / "secrets.txt").write_text("\n".join(server_lines) + "\n")
        (confdir / "secrets.txt").chmod(0o600)
        units = tmp_path / "units"
        units.mkdir()
        unit = (ROOT / "systemd" / "alpaca-tunnel.service").read_text()
        # this checkout's venv, seen at SRC inside the container
        unit = unit.replace("/usr/bin/alpaca-tunnel", f"{SRC}/{VENV_BIN.relative_to(ROOT)}/python -m alpaca")
        unit = unit.replace("[Service]\n", f"[Service]\nEnvironment=PYTHONPATH={SRC}\n")
        # a wedged process is SIGABRTed on watchdog timeout; a stopped one
        # needs the SIGKILL that follows TimeoutAbortSec
        unit = unit.replace("[Service]\n", "[Service]\nTimeoutAbortSec=2\n")
        (units / "alpaca-tunnel.service").write_text(unit)
        container = Container(tb, tb.ns("ct"), tmp_path, confdir, units)
        world = {"tb": tb, "mesh": mesh, "ct": container, "confdir": confdir, "server_ip": server_ip}
        yield world
    finally:
        if container is not None:
            container.close()
        mesh.close()


def test_unit_lifecycle(unit_world):
    ct, tb, mesh, confdir = unit_world["ct"], unit_world["tb"], unit_world["mesh"], unit_world["confdir"]
    ip = unit_world["server_ip"]

    r = ct.ctl("systemctl", "start", "alpaca-tunnel", timeout=60)
    assert r.returncode == 0, r.stderr + ct.ctl("journalctl", "-u", "alpaca-tunnel", "--no-pager").stdout
    assert ct.show("ActiveState") == "active"
    # READY=1 only after the TUN and NAT are in place
    assert tb.run("ct", ["ip", "-br", "addr", "show", "alpaca0"]).stdout.split()[1] in ("UP", "UNKNOWN")
    assert "alpaca-tunnel:alpaca0" in tb.run("ct", ["iptables-legacy-save"]).stdout
    assert re.search(r"peers up", ct.show("StatusText")), ct.show("StatusText")
    pid = ct.show("MainPID")

    # a client that the server knows
    c1 = mesh.add("c1", 16, {"id": "16.1", "mode": "client", "gateway": "1.1"},
                  [mesh.line("1.1", ip), mesh.line("16.1", None)])
    c1.start()
    assert wait_for(lambda: c1.run(["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 15)

    # a new client is let in by a secrets edit + reload, without a restart
    c2 = mesh.add("c2", 17, {"id": "16.2", "mode": "client", "gateway": "1.1"},
                  [mesh.line("1.1", ip), mesh.line("16.2", None)])
    c2.start()
    assert c2.run(["ping", "-c2", "-W1", "10.17.1.1"]).returncode != 0
    with open(confdir / "secrets.txt", "a") as f:
        f.write(mesh.line("16.2", None) + "\n")
    r = ct.ctl("systemctl", "reload", "alpaca-tunnel")
    assert r.returncode == 0, r.stderr
    assert ct.show("MainPID") == pid
    assert wait_for(lambda: c2.run(["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 15)

    # a wedged loop (the process stopped) is killed by the watchdog and restarted
    ct.ctl("systemctl", "kill", "-s", "SIGSTOP", "alpaca-tunnel")
    assert wait_for(lambda: ct.show("NRestarts") == "1", 40), ct.ctl("journalctl", "-u", "alpaca-tunnel", "--no-pager").stdout[-3000:]
    assert wait_for(lambda: ct.show("ActiveState") == "active" and ct.show("MainPID") not in ("0", pid), 30)
    journal = ct.ctl("journalctl", "-u", "alpaca-tunnel", "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in journal or "watchdog" in journal.lower()
    # the new instance has exactly one copy of each rule (ExecStopPost cleanup + start cleanup)
    save = tb.run("ct", ["iptables-legacy-save"]).stdout
    assert save.count("MASQUERADE") == 1, save
    assert wait_for(lambda: c1.run(["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 15)

    # stop restores the host
    r = ct.ctl("systemctl", "stop", "alpaca-tunnel", timeout=60)
    assert r.returncode == 0
    assert ct.show("ActiveState") == "inactive"
    assert tb.run("ct", ["ip", "link", "show", "alpaca0"]).returncode != 0
    assert "alpaca-tunnel" not in tb.run("ct", ["iptables-legacy-save"]).stdout
    assert "Traceback" not in journal


def test_units_verify(tmp_path):
    """systemd-analyze verify is clean for both units (paths pointed at this checkout)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    for name in ("alpaca-tunnel.service", "alpaca-tunnel@.service"):
        text = (ROOT / "systemd" / name).read_text().replace("/usr/bin/alpaca-tunnel", str(VENV_BIN / "alpaca-tunnel"))
        target = tmp_path / (name.replace("@", "@test") if "@" in name else name)
        target.write_text(text)
        r = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
