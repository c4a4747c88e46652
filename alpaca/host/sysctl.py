"""Kernel switches under /proc/sys (a plain file write, no `sysctl` shell-out).

set() remembers the value it replaced so restore() is its exact inverse
(values are put back in the reverse order they were changed). The old values
are also written to a state file under /run, so that after a SIGKILL the next
start (or `alpaca-tunnel cleanup`) can put them back: without it, the next
run would take the value the dead run left for the original.

IPv6 forwarding (forward_ipv6)
------------------------------
Linux forwards IPv6 only with net.ipv6.conf.all.forwarding = 1. That switch
also makes every interface a router, and a router ignores router
advertisements on interfaces with accept_ra = 1 (the default): a server that
gets its own IPv6 address and default route by SLAAC would lose them when
their lifetimes run out. So before turning forwarding on, every interface
(and `default`, for interfaces that appear later) with accept_ra = 1 gets
accept_ra = 2, "accept them even when forwarding"; interfaces with 0 or 2
are left as they are. Writing `all/forwarding` also copies the value to
`default` and to every interface; the ones whose value the restore of `all`
would not bring back are remembered too. restore() undoes all of it. A host
that already forwards IPv6 is left exactly as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

IP_FORWARD = "net/ipv4/ip_forward"
IPV6_CONF = "net/ipv6/conf"
IPV6_FORWARDING = "net/ipv6/conf/all/forwarding"
STATE_DIR = Path("/run/alpaca-tunnel")


def _state_file(tag: str, state_dir: Path) -> Path:
    # one per TUN name and network namespace: daemons in two namespaces may
    # share a TUN name and /run
    netns = os.stat("/proc/self/ns/net").st_ino
    return state_dir / f"sysctl-{tag}-{netns}.json"


class Sysctl:
    def __init__(self, tag: str, root: str = "/proc/sys", state_dir: Path = STATE_DIR):
        self.root = Path(root)
        self.state = _state_file(tag, state_dir)
        self.saved: dict[str, str] = {}

    def get(self, key: str) -> str:
        return (self.root / key).read_text().strip()

    def set(self, key: str, value: str) -> None:
        old = self.get(key)
        if old != value:
            self._remember(key, old)
            (self.root / key).write_text(value + "\n")

    def _remember(self, key: str, old: str) -> None:
        """Note `old` as what restore() puts back into `key`, first in the state file."""
        self.saved.setdefault(key, old)
        self.state.parent.mkdir(parents=True, exist_ok=True)
        self.state.write_text(json.dumps(self.saved))

    def forward_ipv6(self) -> bool:
        """Turn IPv6 forwarding on, keeping router advertisements (module
        docstring); False where the kernel has no IPv6."""
        conf = self.root / IPV6_CONF
        if not (conf / "all").is_dir():
            return False
        old = self.get(IPV6_FORWARDING)
        if old == "1":
            return True
        interfaces = sorted(p.name for p in conf.iterdir() if p.name != "all")
        for name in interfaces:
            with contextlib.suppress(OSError):          # (an interface that just went away)
                if self.get(f"{IPV6_CONF}/{name}/accept_ra") == "1":
                    self.set(f"{IPV6_CONF}/{name}/accept_ra", "2")
        for name in interfaces:
            with contextlib.suppress(OSError):
                value = self.get(f"{IPV6_CONF}/{name}/forwarding")
                if value != old:
                    self._remember(f"{IPV6_CONF}/{name}/forwarding", value)
        self.set(IPV6_FORWARDING, "1")
        return True

    def restore(self) -> None:
        _write_back(self.root, self.saved)
        self.saved.clear()
        self.state.unlink(missing_ok=True)


def _write_back(root: Path, values: dict[str, str]) -> None:
    for key, value in reversed(values.items()):     # the last change first
        try:
            (root / key).write_text(value + "\n")
        except OSError:
            pass


def cleanup(tag: str, root: str = "/proc/sys", state_dir: Path = STATE_DIR) -> int:
    """Put back what a killed run changed; returns how many values."""
    state = _state_file(tag, state_dir)
    try:
        values = json.loads(state.read_text())
    except (OSError, ValueError):
        return 0
    _write_back(Path(root), values)
    state.unlink(missing_ok=True)
    return len(values)
