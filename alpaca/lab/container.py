"""A booted systemd (PID 1) in a throwaway container, for the tests that
check the systemd unit and the .deb under a real systemd.

systemd-nspawn boots `tree` read-only with a volatile overlay, in the
network namespace `nsname` (made with Testbed), with the given bind mounts.
The container is always taken down again: close() powers it off (or
SIGTERMs nspawn when systemd never came up) and cleans nspawn's propagate
directory, and a boot that fails closes what was started before raising
CannotBoot. Processes are ended by PID only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .testbed import wait_for


class CannotBoot(Exception):
    """systemd-nspawn did not bring up a systemd here."""


def have_nspawn() -> bool:
    return shutil.which("systemd-nspawn") is not None and Path("/usr/lib/systemd/systemd").exists()


class Container:
    def __init__(self, tree: Path, nsname: str, workdir: Path, binds_ro: dict[str, Path] | None = None,
                 binds: dict[str, Path] | None = None, machine: str = "alpaca", env: dict | None = None,
                 boot_timeout: float = 120):
        self.machine = f"{machine}{os.getpid() % 100000}"
        self.leader: int | None = None
        self.env = env
        self.console_path = workdir / "console.log"
        self.console = open(self.console_path, "wb")  # noqa: SIM115 - closed in close()
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.machine}", ignore_errors=True)
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(tree), "--boot", "-M", self.machine,
             "--register=no", "--keep-unit", "--console=read-only", "--volatile=overlay",
             f"--network-namespace-path=/run/netns/{nsname}", "--capability=CAP_NET_ADMIN",
             *[f"--bind-ro={src}:{dst}" for dst, src in (binds_ro or {}).items()],
             *[f"--bind={src}:{dst}" for dst, src in (binds or {}).items()],
             "--", "systemd.unit=multi-user.target"],
            stdout=self.console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.leader = wait_for(self._leader, 30)
            if not self.leader or not wait_for(
                    lambda: Path(f"/proc/{self.leader}/root/run/systemd/private").exists(), 30):
                raise CannotBoot(self.console_text())
            self.ctl("systemctl", "is-system-running", "--wait", timeout=boot_timeout)
        except BaseException:
            self.close()
            raise

    def _leader(self) -> int | None:
        if self.proc.poll() is not None:
            return None
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], check=False, capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, ppid, comm = line.split(None, 2)
            if int(ppid) == self.proc.pid and comm.strip() == "systemd":
                return int(pid)
        return None

    def console_text(self) -> str:
        return self.console_path.read_text(errors="replace")[-3000:]

    def ctl(self, *argv, timeout=60, input=None) -> subprocess.CompletedProcess:
        """Run argv inside the container (its mount, UTS, IPC, network and PID namespaces)."""
        return subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *argv],
                              check=False, capture_output=True, text=True, timeout=timeout, input=input,
                              env=self.env)

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.ctl("/bin/sh", "-c", script, **kw)

    def show(self, prop: str, unit: str = "alpaca-tunnel") -> str:
        return self.ctl("systemctl", "show", "-P", prop, unit).stdout.strip()

    def journal(self, unit: str = "alpaca-tunnel") -> str:
        return self.ctl("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout

    def exists(self, path: str) -> bool:
        return self.ctl("test", "-e", path).returncode == 0 or self.ctl("test", "-L", path).returncode == 0

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.leader:
                try:
                    self.ctl("systemctl", "poweroff", timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            else:
                self.proc.terminate()   # nspawn shuts its container down on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()        # only our nspawn, by PID
                self.proc.wait(10)
        self.console.close()
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.machine}", ignore_errors=True)


class HostRoot:
    """The host's own / bind-mounted read-only at workdir/hostroot: a tree
    for Container with everything installed here. Unmounted by close()."""

    def __init__(self, workdir: Path):
        self.path = workdir / "hostroot"
        self.path.mkdir()
        subprocess.run(["mount", "--bind", "/", str(self.path)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(self.path)], check=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["umount", str(self.path)], check=False)
