"""Kernel switches under /proc/sys (a plain file write, no `sysctl` shell-out).

set() remembers the value it replaced so restore() is its exact inverse.
"""

from __future__ import annotations

from pathlib import Path

IP_FORWARD = "net/ipv4/ip_forward"


class Sysctl:
    def __init__(self, root: str = "/proc/sys"):
        self.root = Path(root)
        self.saved: dict[str, str] = {}

    def get(self, key: str) -> str:
        return (self.root / key).read_text().strip()

    def set(self, key: str, value: str) -> None:
        old = self.get(key)
        if old != value:
            self.saved.setdefault(key, old)
            (self.root / key).write_text(value + "\n")

    def restore(self) -> None:
        for key, value in self.saved.items():
            try:
                (self.root / key).write_text(value + "\n")
            except OSError:
                pass
        self.saved.clear()
