"""Run alpaca-tunnel with its wall clock OFFSET seconds off the host's:

    python -m alpaca.lab.skewed_clock OFFSET [alpaca-tunnel arguments]

A launcher for Daemon.start(launcher=...) (alpaca/lab/daemons.py): it moves
time.time of this one process only, so two daemons in their namespaces on
one host can disagree about the time (tests/test_clock_skew_daemons.py)
while the host's clock, and everything else on it, stays right.
"""

from __future__ import annotations

import sys
import time

from .daemons import PY


def launcher(offset: float) -> list[str]:
    """argv prefix that runs the daemon with its clock `offset` seconds ahead."""
    return [PY, "-m", "alpaca.lab.skewed_clock", repr(float(offset))]


def main() -> int:
    offset = float(sys.argv[1])
    host_time = time.time
    time.time = lambda: host_time() + offset
    from alpaca.cli import main as alpaca_main
    return alpaca_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
