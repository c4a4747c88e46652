"""`alpaca-tunnel check`: every problem with config.json and secrets.txt, one
line each, and what the daemon would do to the host. The daemon runs the same
checks at start (problems there are fatal)."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import ConfigError, config_warnings, load_config
from .daemon import plan
from .peerlist import cross_problems
from .secrets import PeerSecret, load_secrets


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
