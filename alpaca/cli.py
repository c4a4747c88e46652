"""The `alpaca-tunnel` command: run the daemon, and the operator's tools."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, default_config_path, load_config
from .host.control import ControlError, query, socket_path
from .secrets import genkey


def _config_path(arg: str | None) -> Path:
    return Path(arg) if arg else default_config_path(os.path.abspath(sys.argv[0]))


def _setup_logging(level: str) -> None:
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr)


def _fail(message: str) -> int:
    for line in message.splitlines():
        print(f"alpaca-tunnel: {line}", file=sys.stderr)
    return 1


def _load(args):
    """The config, or None after printing its problems."""
    try:
        return load_config(_config_path(args.config))
    except ConfigError as e:
        _fail(str(e))
        return None


def cmd_run(args) -> int:
    from .daemon import run_daemon
    if (config := _load(args)) is None:
        return 1
    _setup_logging(config.log_level)
    return run_daemon(config)


def cmd_genkey(_args) -> int:
    print(genkey())
    return 0


def cmd_status(args) -> int:
    """-C: the daemon of that config. Otherwise every daemon findable in
    RUN_DIR (docs/operations.md "Status"), or the one named NAME. Each
    daemon answers with one snapshot; the table and --json are both
    rendered from it, never from a second question. With --check, every
    problem finding a daemon is a CRITICAL line on stdout instead of an
    error on stderr (docs/operations.md "Monitoring")."""
    from .host.control import RUN_DIR, discover, socket_name
    fail = _critical if args.check else _fail
    if args.config is not None:
        if args.name is not None:
            return _usage(args, "give NAME or -C, not both")
        if (config := _load(args)) is None:
            return UNKNOWN if args.check else 1
        try:
            status = query(socket_path(config), {"command": "status"})
        except ControlError as e:
            return fail(str(e))
        if "error" in status:
            return fail(status["error"])
        return _show_status(status, args)
    try:
        found, stale, failed = discover(RUN_DIR)
    except ControlError as e:
        return fail(str(e))
    code = max((fail(line) for line in failed), default=0)
    if args.name is not None:
        stale = [p for p in stale if socket_name(p) == args.name]
        found = [s for s in found if s.get("name") == args.name]
    if stale:
        code = max(code, fail(f"skipped {len(stale)} stale control socket{'s' if len(stale) > 1 else ''} "
                              f"(daemon gone; `alpaca-tunnel cleanup -C CONFIG` removes it): "
                              f"{', '.join(map(str, stale))}"))
    if not found:
        what = "no daemon is running" if args.name is None else f"no daemon named {args.name} is running"
        return fail(f"{what} (no live control socket in {RUN_DIR}; for a daemon not registered there use -C)")
    if args.name is not None:
        if len(found) > 1:
            return _usage(args, f"{len(found)} daemons are named {args.name} (configs "
                                f"{', '.join(s['config'] for s in found)}): choose one with -C")
        found = found[0]
    else:
        found.sort(key=lambda s: (s.get("name") or "", s.get("config") or ""))
    shown = _show_status(found, args)
    return _worst(code, shown) if args.check else shown


# the exit codes of a Nagios plugin, and which of two a check reports
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
SEVERITY = (OK, UNKNOWN, WARNING, CRITICAL)


def _worst(*codes: int) -> int:
    return max(codes, key=SEVERITY.index)


def _usage(args, message: str) -> int:
    """A question status cannot answer as asked: 1, or for --check UNKNOWN."""
    _fail(message)
    return UNKNOWN if args.check else 1


def _critical(message: str) -> int:
    """--check: a daemon that cannot be asked is a CRITICAL line on stdout."""
    print(f"ALPACA CRITICAL - {message}")
    return CRITICAL


def _show_status(status: dict | list[dict], args) -> int:
    """One snapshot (an object) or several (a list), as --json or tables;
    with --check one line each (unless --json), and the worst verdict as
    the exit status."""
    snapshots = status if isinstance(status, list) else [status]
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    from .status import format_check, format_status
    if not args.check:
        if not args.json:
            print("\n\n".join(format_status(s) for s in snapshots))
        return 0
    codes = []
    for snapshot in snapshots:
        if "health" not in snapshot:        # a daemon of a version before `health`
            codes.append(UNKNOWN)
            if not args.json:
                print(f"ALPACA UNKNOWN - {snapshot.get('name') or snapshot['id']}: "
                      "the daemon reports no health (an older version)")
            continue
        codes.append(snapshot["health"]["code"])
        if not args.json:
            print(format_check(snapshot))
    return _worst(*codes)


def cmd_cleanup(args) -> int:
    """Remove what a daemon with this config left behind (ExecStopPost)."""
    if (config := _load(args)) is None:
        return 1
    from .daemon import cleanup_leftovers, keeps_kill_switch
    from .host.control import remove_stale
    # systemd's ExecStopPost gets SERVICE_RESULT: "success" after a requested stop, else why it ended
    crashed = os.environ.get("SERVICE_RESULT", "success") != "success"
    keep = crashed and keeps_kill_switch(config)
    try:
        removed = cleanup_leftovers(config.name, keep_routes=keep)
        sockets = remove_stale(config)      # a killed daemon's control socket (and its link in RUN_DIR)
    except Exception as e:    # report in one line; cleanup must never leave a traceback in the journal
        return _fail(f"cleanup failed: {e}")
    if removed:
        print(f"alpaca-tunnel: undid {removed} changes (rules, routes, sysctls) left by {config.name}")
    if keep:
        print(f"alpaca-tunnel: kill switch: the routes of {config.name} stay and block its traffic until the "
              f"daemon is back (SERVICE_RESULT={os.environ['SERVICE_RESULT']}); "
              "`alpaca-tunnel cleanup` run by hand removes them")
    if sockets:
        print(f"alpaca-tunnel: removed the stale control socket {', '.join(map(str, sockets))}")
    return 0


def cmd_check(args) -> int:
    from .check import run_check
    return run_check(_config_path(args.config))


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alpaca-tunnel", description="multi-peer mesh VPN daemon")
    parser.add_argument("-C", "--config", help="config.json (default: by install location, see docs)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the daemon in the foreground (the default)")
    sub.add_parser("genkey", help="print a new pre-shared key for secrets.txt")
    status = sub.add_parser("status", help="show peers, paths and counters of the running daemons "
                                           "(all, the one named NAME, or with -C the one of that config)")
    status.add_argument("name", nargs="?", metavar="NAME", help="the daemon whose config has this name (its interface)")
    status.add_argument("--json", action="store_true",
                        help="machine-readable output: an object for one daemon (NAME or -C), else a list")
    status.add_argument("--check", action="store_true",
                        help="monitoring: one line per daemon, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN "
                             "(Nagios plugin conventions)")
    sub.add_parser("check", help="validate config.json and secrets.txt and print what the daemon would do")
    sub.add_parser("cleanup", help="remove routes and rules a crashed daemon left behind")
    demo = sub.add_parser("demo", help="build a demo mesh in network namespaces, show it, tear it down")
    demo.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    for p in sub.choices.values():
        p.add_argument("-C", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, None: cmd_run, "genkey": cmd_genkey, "status": cmd_status, "demo": cmd_demo,
               "cleanup": cmd_cleanup, "check": cmd_check}
    try:
        return handler[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
