"""Run alpaca-tunnel with a resolv.conf of the test's choosing and a short
re-resolve period: tests/test_operations.py's dead-DNS test.

    daemon_with_resolv.py RESOLV_CONF RESOLVE_INTERVAL alpaca-args...

The process unshares its mount namespace (private from /), bind-mounts
RESOLV_CONF over /etc/resolv.conf there, so only it (and its children) see
the test's DNS server, sets alpaca.daemon.RESOLVE_INTERVAL and runs the
daemon's own main(). Nothing outside this process changes.
"""

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


def main() -> int:
    resolv_conf, interval, args = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(resolv_conf.encode(), b"/etc/resolv.conf", None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind mount over /etc/resolv.conf")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import alpaca.daemon
    from alpaca.cli import main as alpaca_main
    alpaca.daemon.RESOLVE_INTERVAL = interval
    return alpaca_main(args)


if __name__ == "__main__":
    sys.exit(main())
