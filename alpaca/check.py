"""`alpaca-tunnel check`: every problem with config.json and secrets.txt, one
line each, and what the daemon would do to the host. The daemon runs the same
checks at start (problems there are fatal)."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import Config, ConfigError, config_warnings, load_config
from .protocol.ids import TunnelNet, format_id
from .peerlist import cross_problems, peer_entries, underlay_hosts
from .secrets import PeerSecret, load_secrets


def plan(config: Config, secrets: dict[int, PeerSecret]) -> list[str]:
    """What the daemon would do to the host, for people to read."""
    net = TunnelNet(config.net)
    lines = [f"peer {format_id(config.id)} ({config.mode}) in group {config.group!r}, "
             f"{len(secrets) - (config.id in secrets)} other peers",
             f"UDP socket on {config.listen}:{config.port}"]
    if config.mode != "forwarder":
        lines.append(f"TUN device {config.name}, MTU {config.mtu}, address {net.address(config.id)}/16")
    if config.mode == "server":
        from .nat import ServerNat
        lines.append("sysctl net.ipv4.ip_forward = 1 (restored on stop)")
        lines += [f"iptables-legacy {rule}" for rule in ServerNat(config.name, str(net.network), config.mtu, config.allow_inbound_from).rules()]
    if config.mode == "client" and config.gateway is not None:
        from .routes import ClientRoutes
        entries = peer_entries(secrets, config.port)
        routes = ClientRoutes(config.name, str(net.address(config.gateway)), underlay_hosts(config, entries),
                              list(config.local_routes), config.chnroute)
        lines += routes.describe()
    for stage in ("pre_up", "post_up", "pre_down", "post_down"):
        for command in getattr(config, f"{stage}_cmds"):
            lines.append(f"{stage} hook: {command}")
    return lines


def run_check(config_path: Path) -> int:
    problems: list[str] = []
    try:
        config = load_config(config_path)
    except ConfigError as e:
        problems = e.problems
        config = None
    secrets: dict[int, PeerSecret] = {}
    if config is not None:
        for warning in config_warnings(config):
            print(f"warning: {warning}")
        try:
            secrets, secret_problems, warnings = load_secrets(config.secret_file)
            problems += [str(p) for p in secret_problems]
            for warning in warnings:
                print(f"warning: {warning}")
            problems += cross_problems(config, secrets)
        except ConfigError as e:
            problems += e.problems
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if config is not None and not problems:
        for line in plan(config, secrets):
            print(line)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("ok")
    return 0
