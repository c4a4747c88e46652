"""Kernel switches under /proc/sys (a plain file write, no `sysctl` shell-out).

set() remembers the value it replaced so restore() is its exact inverse. The
old value is also written to a state file under /run, so that after a
SIGKILL the next start (or `alpaca-tunnel cleanup`) can put it back: without
it, the next run would take the value the dead run left for the original.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

IP_FORWARD = "net/ipv4/ip_forward"
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
            self.saved.setdefault(key, old)
            self.state.parent.mkdir(parents=True, exist_ok=True)
            self.state.write_text(json.dumps(self.saved))
            (self.root / key).write_text(value + "\n")

    def restore(self) -> None:
        _write_back(self.root, self.saved)
        self.saved.clear()
        self.state.unlink(missing_ok=True)


def _write_back(root: Path, values: dict[str, str]) -> None:
    for key, value in values.items():
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
