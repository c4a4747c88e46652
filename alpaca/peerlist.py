"""The group's peer list: secrets.txt as the core needs it, and what must
agree between it and config.json. Used by the daemon and by
`alpaca-tunnel check`, neither of which owns it."""

from __future__ import annotations

import ipaddress
from typing import Callable

from .config import Config
from .protocol.ids import format_id
from .protocol.peers import PeerEntry
from .secrets import PeerSecret


def peer_entries(secrets: dict[int, PeerSecret], default_port: int,
                 lookup: Callable[[str], str | None]) -> dict[int, PeerEntry]:
    """secrets.txt lines -> what the core needs. Host names are resolved by
    `lookup`: the daemon's never blocks (alpaca/host/resolver.py); `check`
    asks the system resolver and waits (resolver.resolve_host)."""
    entries = {}
    for secret in secrets.values():
        addr = addr6 = None
        port = secret.port or default_port
        if secret.host:
            ip = lookup(secret.host)
            if ip is not None:
                addr = (ip, port)
        if secret.ip6:
            # written as the socket reports it (compressed, lower case), so
            # what arrives from it is the same path
            addr6 = (str(ipaddress.IPv6Address(secret.ip6)), port)
        entries[secret.id] = PeerEntry(secret.key, addr, addr6)
    return entries


def host_names(secrets: dict[int, PeerSecret]) -> list[str]:
    """The ip column of every line that has one (literal addresses included)."""
    return sorted({s.host for s in secrets.values() if s.host})


def underlay_hosts(config: Config, peers: dict[int, PeerEntry]) -> list[str]:
    """Servers' and forwarders' public addresses, both families: they must stay outside the tunnel."""
    return sorted({a[0] for i, e in peers.items() for a in e.static_addrs
                   if i != config.id and (i < config.id or i in config.forwarders)})


def underlay_endpoints(config: Config, secrets: dict[int, PeerSecret]) -> list[str]:
    """Each other peer's configured underlay endpoints, both families
    (`alpaca-tunnel check`); a host name is shown as written (resolved to
    IPv4 by the daemon)."""
    lines = []
    for secret in sorted(secrets.values(), key=lambda s: s.id):
        if secret.id == config.id or not (secret.host or secret.ip6):
            continue
        port = secret.port or config.port
        ends = []
        if secret.host:
            ends.append(f"{secret.host}:{port} (IPv4{'' if _is_literal(secret.host) else ', host name'})")
        if secret.ip6:
            ends.append(f"[{ipaddress.IPv6Address(secret.ip6)}]:{port} (IPv6)")
        lines.append(f"peer {format_id(secret.id)} underlay: {' and '.join(ends)}"
                     + (" (both used at once)" if len(ends) == 2 else ""))
    return lines


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def cross_problems(config: Config, secrets: dict[int, PeerSecret]) -> list[str]:
    """What is wrong between config.json and secrets.txt."""
    source = str(config.secret_file)
    problems = []
    own = secrets.get(config.id)
    if own is None or own.key is None:
        problems.append(f"{source}: this peer's own ID {format_id(config.id)} needs a line with its key (not null)")
    needed = ([("gateway", config.gateway_in_use)] if config.gateway_in_use is not None else []) + \
        [("forwarder", f) for f in config.forwarders]
    for role, peer_id in needed:
        entry = secrets.get(peer_id)
        if entry is None:
            problems.append(f"{source}: the {role} {format_id(peer_id)} has no line")
        elif entry.host is None and entry.ip6 is None and role == "forwarder":
            problems.append(f"{source}: line {entry.line}: the forwarder {format_id(peer_id)} needs an address "
                            f"(it is sent to directly)")
        elif entry.host is None and entry.ip6 is None and not config.forwarders:
            problems.append(f"{source}: line {entry.line}: the gateway {format_id(peer_id)} needs an address "
                            f"(no forwarders are configured to reach it)")
    return problems
