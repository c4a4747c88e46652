"""/proc readings for the benchmark: CPU seconds of a process tree, machine busy time."""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import HZ


# ---------------------------------------------------------------- /proc

def descendants(pid: int) -> list[int]:
    """pid and all its live descendants."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    keep = {pid}
    changed = True
    while changed:
        changed = False
        for p, pp in parent.items():
            if pp in keep and p not in keep:
                keep.add(p)
                changed = True
    return sorted(keep)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / HZ


def machine_ticks() -> dict[str, int]:
    """Whole machine, all cores: busy (user nice system irq softirq), idle (+iowait), steal."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def busy_pct(seconds: float = 0.3) -> float:
    a = machine_ticks()
    time.sleep(seconds)
    b = machine_ticks()
    tot = sum(b.values()) - sum(a.values())
    return 100.0 * (b["busy"] - a["busy"]) / tot if tot > 0 else 0.0


def wait_quiet(args) -> float:
    """Wait until the machine is mostly idle, at most --quiet-max s per run and
    --quiet-budget s over the whole run (so the run stays short); returns the last busy %."""
    pct = busy_pct()
    t0 = time.monotonic()
    end = t0 + min(args.quiet_max, max(0.0, args.quiet_budget))
    while pct > args.quiet_pct and time.monotonic() < end:
        pct = busy_pct()
    args.quiet_budget -= time.monotonic() - t0
    return pct
