"""Tier 3: the shipped unit under a real systemd (PID 1 of a systemd-nspawn container).

The container boots the host's own root file system (read-only, with a
throwaway overlay), lives in a network namespace of our testbed, and runs
systemd/alpaca-tunnel.service with ExecStart pointing at this checkout's venv.
A client daemon runs in another namespace on the same bridge. We drive
systemctl from outside with nsenter, as an operator would from inside.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca.lab.container import Container, HostRoot, have_nspawn
from alpaca.lab.testbed import wait_for
from alpaca.lab.daemons import Mesh
from alpaca.lab.testbed import Testbed, unique_prefix

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SRC = "/run/alpaca-src"         # where the container sees this checkout


def _venv_in_container() -> str:
    """The venv's bin directory as the container sees it: under SRC when it is
    inside this checkout, else at its own path through the host root."""
    try:
        return f"{SRC}/{VENV_BIN.relative_to(ROOT)}"
    except ValueError:
        return str(VENV_BIN)


@pytest.fixture
def unit_world(tmp_path):
    if not have_nspawn():
        pytest.skip("systemd-nspawn not installed")
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path)
    container = hostroot = None
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
        unit = unit.replace("/usr/bin/alpaca-tunnel", f"{_venv_in_container()}/python -m alpaca")
        unit = unit.replace("[Service]\n", f"[Service]\nEnvironment=PYTHONPATH={SRC}\n")
        # a wedged process is SIGABRTed on watchdog timeout; a stopped one
        # needs the SIGKILL that follows TimeoutAbortSec
        unit = unit.replace("[Service]\n", "[Service]\nTimeoutAbortSec=2\n")
        # /run read-only for the daemon, as ProtectSystem=strict makes it on a Debian 12 host; on a
        # cgroup-v1 machine systemd 252 leaves it writable when ProtectControlGroups= is set
        unit = unit.replace("[Service]\n", "[Service]\nReadOnlyPaths=/run\n")
        (units / "alpaca-tunnel.service").write_text(unit)
        hostroot = HostRoot(tmp_path)
        # the checkout and its venv at SRC, not at their own path: nspawn's
        # /tmp tmpfs would hide a clone under /tmp
        container = Container(hostroot.path, tb.ns("ct"), tmp_path, machine="alpaca", boot_timeout=90,
                              binds_ro={"/run/systemd/system": units, SRC: ROOT,
                                        # as the .deb installs it, so /run/xtables.lock is made at boot
                                        "/etc/tmpfiles.d/alpaca-tunnel.conf": ROOT / "systemd" / "alpaca-tunnel.tmpfiles"},
                              binds={"/etc/alpaca-tunnel.d": confdir})
        world = {"tb": tb, "mesh": mesh, "ct": container, "confdir": confdir, "server_ip": server_ip}
        yield world
    finally:
        if container is not None:
            container.close()
        if hostroot is not None:
            hostroot.close()
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
    # `status` with no -C finds it through /run/alpaca-tunnel (RuntimeDirectory=)
    status = [f"{SRC}/{VENV_BIN.relative_to(ROOT)}/python", "-m", "alpaca", "status"]
    r = ct.sh(f"cd {SRC} && exec " + " ".join(status + ["--json"]))
    assert r.returncode == 0, r.stderr
    assert [(s["id"], s["name"], s["config"]) for s in json.loads(r.stdout)] == [
        ("1.1", "alpaca0", "/etc/alpaca-tunnel.d/config.json")]

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
    # the killed run's control socket is gone (ExecStopPost's cleanup; the new run binds the same path)
    r = ct.sh(f"cd {SRC} && exec " + " ".join(status + ["alpaca0"]))
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("alpaca-tunnel 1.1 (server)"), r.stderr

    # stop restores the host
    r = ct.ctl("systemctl", "stop", "alpaca-tunnel", timeout=60)
    assert r.returncode == 0
    assert ct.show("ActiveState") == "inactive"
    assert tb.run("ct", ["ip", "link", "show", "alpaca0"]).returncode != 0
    assert "alpaca-tunnel" not in tb.run("ct", ["iptables-legacy-save"]).stdout
    assert "Traceback" not in journal
    r = ct.sh(f"cd {SRC} && exec " + " ".join(status))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "no daemon is running" in r.stderr, r.stderr


def test_unit_takes_the_xtables_lock(unit_world):
    """Under ProtectSystem=strict the daemon still flocks /run/xtables.lock (the
    units' ReadWritePaths, the file made by the shipped tmpfiles.d entry): while
    another process holds the lock, as `iptables-legacy -w` or Docker would, the
    daemon's rule changes wait for it instead of racing."""
    ct, tb = unit_world["ct"], unit_world["tb"]
    assert ct.exists("/run/xtables.lock"), ct.ctl("systemctl", "status", "systemd-tmpfiles-setup").stdout

    # another program holds the lock, as a transient unit of the container's systemd
    r = ct.ctl("systemd-run", "--unit=xtables-holder", "--service-type=exec", "flock", "/run/xtables.lock",
               "sleep", "60")
    assert r.returncode == 0, r.stderr
    try:
        assert wait_for(lambda: ct.show("ActiveState", "xtables-holder") == "active", 10)
        assert ct.ctl("flock", "-n", "/run/xtables.lock", "true").returncode != 0    # it really holds it
        assert ct.ctl("systemctl", "start", "--no-block", "alpaca-tunnel").returncode == 0

        def waiting_on_lock() -> bool:
            pid = ct.show("MainPID")
            fds = ct.sh(f"ls -l /proc/{pid}/fd 2>/dev/null").stdout if pid not in ("", "0") else ""
            return "/run/xtables.lock" in fds
        # the daemon has the lock file open and is still starting: it waits, its rules are not there
        assert wait_for(waiting_on_lock, 20), ct.journal()[-3000:]
        pid = ct.show("MainPID")
        probe = ct.ctl("nsenter", "-t", pid, "-m", "touch", "/run/alpaca-probe")     # what the daemon sees
        assert probe.returncode != 0 and "Read-only" in probe.stderr, probe.stderr
        assert ct.show("ActiveState") == "activating"
        assert "alpaca-tunnel" not in tb.run("ct", ["iptables-legacy-save"]).stdout
    finally:
        ct.ctl("systemctl", "stop", "xtables-holder")
    # released: the daemon takes the lock, changes the rules and reports ready
    assert wait_for(lambda: ct.show("ActiveState") == "active", 20), ct.journal()[-3000:]
    assert "alpaca-tunnel:alpaca0" in tb.run("ct", ["iptables-legacy-save"]).stdout
    journal = ct.journal()
    assert "xtables lock" not in journal, journal[-3000:]     # neither "without it" nor a timeout
    assert ct.ctl("systemctl", "stop", "alpaca-tunnel", timeout=60).returncode == 0
    assert "alpaca-tunnel" not in tb.run("ct", ["iptables-legacy-save"]).stdout


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
