"""chnroute files: one IPv4 or IPv6 prefix per line, read for client routing (routes.py).
Pure: a path in, prefixes and a count of bad lines out; never fatal."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class ChnrouteData:
    prefixes: list[tuple[str, int]]
    bad: int
    first_bad: str | None
    error: str | None = None

    def summary(self, path) -> str | None:
        if self.error:
            return f"chnroute: cannot read {path}: {self.error}; no chnroute prefixes installed"
        if self.bad:
            return (f"chnroute: {path}: {plural(self.bad, 'bad line')} ignored "
                    f"(first: {self.first_bad}); {len(self.prefixes)} prefixes used")
        return None


def read_chnroute(path) -> ChnrouteData:
    """One IPv4 or IPv6 prefix per line ("1.0.1.0/24", "2001:db8::/32"; a bare address means /32 or
    /128); '#' starts a comment; blank lines are ignored; host bits are cleared. Bad lines are counted,
    never fatal. The prefixes of both families come in one list, in file order."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return ChnrouteData([], 0, None, e.strerror or str(e))
    prefixes: dict[tuple[str, int], None] = {}      # ordered, without duplicates
    bad, first_bad = 0, None
    for number, line in enumerate(text.splitlines(), 1):
        if not (item := line.split("#", 1)[0].strip()):
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
            if net.prefixlen == 0:
                raise ValueError("a default route is not a chnroute prefix")
        except ValueError:
            bad += 1
            first_bad = first_bad or f"line {number}: {item[:40]!r}"
            continue
        prefixes[(str(net.network_address), net.prefixlen)] = None
    return ChnrouteData(list(prefixes), bad, first_bad)
