"""secrets.txt: the group's peer list with each peer's pre-shared key (docs/configuration.md).

One peer per line, `id key ip ip6 port`; the trailing columns may be left
out (`16.3 KEY` is `16.3 KEY null null null`).  Parsing is pure and never resolves
host names, so the daemon can re-read the file on every change and decide
itself what to do with bad lines (fatal at start, skipped on reload).  Each
bad line becomes one SecretsProblem naming the file and the line number.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from alpaca.config import ConfigError
from alpaca.protocol.crypto import genkey  # noqa: F401  (makes a key string of the format read here)
from alpaca.protocol.ids import IdError, parse_id

MIN_KEY_LENGTH = 16
COLUMNS = "id key ip ip6 port"

_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class PeerSecret:
    id: int
    key: str | None     # None: `null`, this host never needs that peer's key
    host: str | None  # the ip column as written: an IPv4 literal or a host name
    ip6: str | None
    port: int | None
    line: int


@dataclass(frozen=True)
class SecretsProblem:
    line: int
    message: str
    source: str = "secrets.txt"

    def __str__(self) -> str:
        return f"{self.source}: line {self.line}: {self.message}"


def is_host_name(text: str) -> bool:
    """A syntactically valid DNS name (RFC 1123 labels); all-numeric names are not."""
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    # A numeric last label means a mistyped IPv4 address (e.g. 1.2.3.256), not a name.
    return all(_LABEL.match(l) for l in labels) and not labels[-1].isdigit()


def _parse_line(cols: list[str]) -> tuple[int, str, str | None, str | None, int | None]:
    """The five columns of one line; raise ValueError with the sentence for the first bad one."""
    id_text, key, ip, ip6, port_text = cols
    try:
        peer_id = parse_id(id_text)
    except IdError as e:
        raise ValueError(str(e)) from None

    if key == "null":
        key = None      # e.g. a server's line on a client: the pair key comes from the client's own key
    elif not all("!" <= c <= "~" for c in key):
        raise ValueError("the key may contain only printable ASCII characters without spaces")
    elif len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the key is too short ({len(key)} characters, at least {MIN_KEY_LENGTH} "
                         "are needed): make one with `alpaca-tunnel genkey`")

    host = None if ip == "null" else ip
    if host is not None:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if ":" in host:
                raise ValueError(f"ip {host!r} is an IPv6 address: put it in the ip6 column "
                                 "(the ip column takes an IPv4 address or a host name)") from None
            if not is_host_name(host):
                raise ValueError(f"ip {host!r} is neither an IPv4 address nor a host name") from None

    addr6 = None if ip6 == "null" else ip6
    if addr6 is not None:
        try:
            ipaddress.IPv6Address(addr6)
        except ValueError:
            raise ValueError(f"ip6 {addr6!r} is not an IPv6 address") from None

    port = None
    if port_text != "null":
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port {port_text!r} is not a port number between 1 and 65535")
        port = int(port_text)
    return peer_id, key, host, addr6, port


def _column_problem(cols: list[str]) -> str | None:
    """Why a line's columns cannot be read as `id key [ip [ip6 [port]]]`, or None."""
    if len(cols) < 2:
        return f"expected at least 2 columns ({COLUMNS}; the last three may be left out), found 1"
    if len(cols) > 5:
        return f"expected at most 5 columns ({COLUMNS}), found {len(cols)}"
    if len(cols) in (3, 4) and cols[-1].isdigit():
        # a port written without the columns before it: meant as the port, read as ip or ip6
        column = COLUMNS.split()[len(cols) - 1]
        fixed = " ".join([cols[0], "<key>", *cols[2:-1]] + ["null"] * (5 - len(cols)) + [cols[-1]])
        return (f"{cols[-1]!r} is in the {column} column but looks like a port; the port is the 5th "
                f"column: write `{fixed}`")
    return None


def parse_secrets(text: str, source: str = "secrets.txt") -> tuple[dict[int, PeerSecret], list[SecretsProblem]]:
    """The good peers by ID, and one problem per bad line (bad lines are skipped)."""
    peers: dict[int, PeerSecret] = {}
    problems: list[SecretsProblem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        cols = raw.split("#", 1)[0].split()
        if not cols:
            continue
        if (problem := _column_problem(cols)) is not None:
            problems.append(SecretsProblem(number, problem, source))
            continue
        cols += ["null"] * (5 - len(cols))          # left-out trailing columns are null
        try:
            peer_id, key, host, ip6, port = _parse_line(cols)
        except ValueError as e:
            problems.append(SecretsProblem(number, str(e), source))
            continue
        if peer_id in peers:
            problems.append(SecretsProblem(number, f"peer ID {cols[0]!r} is already listed on line "
                                                   f"{peers[peer_id].line}; this line is skipped", source))
            continue
        peers[peer_id] = PeerSecret(peer_id, key, host, ip6, port, number)
    return peers, problems


def load_secrets(path: Path) -> tuple[dict[int, PeerSecret], list[SecretsProblem], list[str]]:
    """Read and parse secrets.txt; the third list holds warnings (file permissions)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode & 0o777
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: the file is not UTF-8 text"]) from None
    warnings = []
    if mode & 0o077:
        what = ("is world-readable: every user of this host can read the keys" if mode & 0o004
                else "is open to users other than its owner")
        warnings.append(f"{path}: {what} (mode {mode:04o}); run: chmod 600 {path}")
    peers, problems = parse_secrets(text, str(path))
    return peers, problems, warnings
