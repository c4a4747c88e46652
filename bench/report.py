"""The report: the table of a run and the ratios that matter."""

from __future__ import annotations

from common import DUAL, LABELS, TUNNELS, run_key
from tunnels import CLASSES



# ---------------------------------------------------------------- report

def get(res: dict, tunnel: str, cond: str, *path):
    v = res["tunnels"].get(tunnel, {}).get("conditions", {}).get(cond)
    for p in path:
        if not isinstance(v, dict):
            return None
        v = v.get(p)
    return v


def fmt(v, spec: str) -> str:
    """spec "mbit": one decimal below 10 (a collapsed stream still shows), none above."""
    if v is None:
        return "-"
    return format(v, (".1f" if abs(v) < 10 else ".0f") if spec == "mbit" else spec)


def columns(res: dict) -> list[str]:
    """The measured entries of res["tunnels"], in table order (a tunnel's 2-path entry after it)."""
    return [c for t in TUNNELS for c in (t, t + DUAL) if res["tunnels"].get(c, {}).get("available")]


def table(res: dict) -> str:
    tunnels = columns(res)
    dual = "alpaca" + DUAL in tunnels
    rows: list[tuple[str, list]] = []

    def add(label, values, spec, ratio=True, busy=None):
        cells = [fmt(v, spec) + ("*" if busy and busy[i] else " ") for i, v in enumerate(values)]
        a = dict(zip(tunnels, values))
        r = "-"
        if ratio and a.get("alpaca") is not None and a.get("wireguard-go"):
            r = f"{a['alpaca'] / a['wireguard-go']:.2f}"
        extra = []
        if dual:
            extra = ["-" if not ratio or a.get("alpaca" + DUAL) is None or not a.get("alpaca")
                     else f"{a['alpaca' + DUAL] / a['alpaca']:.2f}"]
        rows.append((label, cells + [r] + extra))

    conds = [c for c in ["clean"] + [f"loss-{p:g}" for p in res["args"]["loss"]]]
    for cond in conds:
        first = next((res["tunnels"][t]["conditions"].get(cond) for t in tunnels
                      if res["tunnels"][t].get("conditions", {}).get(cond)), None)
        if first is None:
            continue
        if cond == "clean":
            rows.append(("clean link, offloads on", None))
        elif first.get("wan_delay_ms") is not None:
            label = f"WAN {first['wan_delay_ms']:g} ms each way, {100 * first['loss']:g} % loss each way (relay)"
            rows.append((label, None))
        else:
            rows.append((f"offloads off, {100 * first['loss']:g} % loss each way", None))
        def busy(key, cond=cond):
            return [(get(res, t, cond, "runs", key, "busy_pct_before") or 0) > res["args"]["quiet_pct"]
                    for t in tunnels]
        run_keys = list(first["runs"])
        for key in run_keys:
            add(f"  {key} Mbit/s", [get(res, t, cond, "runs", key, "mbit_s") for t in tunnels], "mbit",
                busy=busy(key))
        key1 = run_key(1, "b2a", "default")
        add("  ping idle avg ms", [get(res, t, cond, "ping_idle", "avg_ms") for t in tunnels], ".3f")
        add(f"  ping load avg ms ({key1})", [get(res, t, cond, "runs", key1, "ping_load", "avg_ms")
                                              for t in tunnels], ".2f")
        add(f"  daemon CPU s/GB ({key1})", [get(res, t, cond, "runs", key1, "daemon_cpu_s_per_gb")
                                             for t in tunnels], ".1f", busy=busy(key1))
        add(f"  machine CPU s/GB ({key1})", [get(res, t, cond, "runs", key1, "machine_cpu_s_per_gb")
                                              for t in tunnels], ".1f", busy=busy(key1))
        if first.get("wan_delay_ms") is not None:
            add(f"  relay CPU % of a core ({key1})", [get(res, t, cond, "runs", key1, "relay_cpu_pct")
                                                      for t in tunnels], ".0f", ratio=False)
        if cond != "clean":
            add("  ping after load lost %", [get(res, t, cond, "ping_after", "loss_pct") for t in tunnels], ".1f",
                ratio=False)
            add("  ping after load avg ms", [get(res, t, cond, "ping_after", "avg_ms") for t in tunnels], ".3f")
            add("  ping idle lost %", [get(res, t, cond, "ping_idle", "loss_pct") for t in tunnels], ".0f",
                ratio=False)
            add("  measured drop %", [None if (x := get(res, t, cond, "loss_counters", "total", "drop_ratio")) is None
                                      else 100 * x for t in tunnels], ".2f", ratio=False)
            for link in ("link1", "link2") if dual else ():
                add(f"  measured drop % {link[:4]} {link[4:]}",
                    [None if (x := get(res, t, cond, "loss_counters", "links", link, "drop_ratio")) is None
                     else 100 * x for t in tunnels], ".2f", ratio=False)
    head = ["", *(LABELS.get(t, t) for t in tunnels), "alpaca/wg"] + (["2p/1p"] if dual else [])
    w0 = max(len(r[0]) for r in rows + [("", None)])
    widths = [max(len(head[i + 1]) + 1, 10) for i in range(len(head) - 1)]
    lines = [f"{'':{w0}}  " + "  ".join(f"{h + ' ':>{w}}" for h, w in zip(head[1:], widths))]
    if res["args"].get("wan") is not None:
        lines.insert(0, f"WAN mode: {res['args']['wan']:g} ms each way through bench/wan_relay.py; no raw column "
                        "(raw TCP cannot cross a UDP relay)")
    if res["args"].get("paths", 1) > 1:
        skipped = [t for t in TUNNELS if not CLASSES[t].multipath and t + DUAL in res["tunnels"]]
        lines.insert(0, "alpaca 2 paths: two links (" + ("two relays" if res["args"].get("wan") is not None
                                                         else "two veth pairs") +
                     "), each with the loss level of its row, every datagram sent on both; 2p/1p = alpaca 2 paths "
                     "/ alpaca" + (f"; no 2-path run for {', '.join(skipped)} (no multi-path)" if skipped else ""))
    for label, cells in rows:
        if cells is None:
            lines.append(label)
        else:
            lines.append(f"{label:{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def basis_condition(res: dict) -> str:
    """The condition of the headline ratio: the clean link, or in WAN mode the WAN without loss."""
    return "clean" if res["args"].get("wan") is None else "loss-0"


def ratio(res: dict, field: str) -> float | None:
    key, cond = run_key(1, "b2a", "default"), basis_condition(res)
    a = get(res, "alpaca", cond, "runs", key, field)
    w = get(res, "wireguard-go", cond, "runs", key, field)
    return a / w if a is not None and w else None


def ipv6_ratio(res: dict) -> float | None:
    """alpaca over IPv6 / alpaca over IPv4, single stream b2a, clean link (the goal: >= 0.90)."""
    key = run_key(1, "b2a", "default")
    v6, v4 = (get(res, t, "clean", "runs", key, "mbit_s") for t in ("alpaca-ipv6", "alpaca"))
    return v6 / v4 if v6 is not None and v4 else None


def dual_ratios(res: dict) -> dict | None:
    """--paths 2: alpaca's single b2a stream (default cc) at each loss level, with 2 paths and with
    1, divided by its 1-path figure without loss (the 0 % loss level: same offloads and RTT; the
    clean link when no 0 % level was measured). The goal: 2 paths at 30 % loss each >= 0.70."""
    if not res["tunnels"].get("alpaca" + DUAL, {}).get("available"):
        return None
    key = run_key(1, "b2a", "default")
    cond0 = "loss-0" if get(res, "alpaca", "loss-0", "runs", key, "mbit_s") is not None else "clean"
    base = get(res, "alpaca", cond0, "runs", key, "mbit_s")
    out: dict = {"basis": f"alpaca 1 path, {key}, {cond0}", "basis_condition": cond0, "basis_mbit_s": base,
                 "goal": "2 paths at 30 % >= 0.70",
                 "2 paths": {}, "1 path": {}}
    for cond in (["clean"] if res["args"].get("wan") is None else []) + [f"loss-{p:g}" for p in res["args"]["loss"]]:
        for col, label in (("alpaca" + DUAL, "2 paths"), ("alpaca", "1 path")):
            v = get(res, col, cond, "runs", key, "mbit_s")
            out[label][cond] = v / base if v is not None and base else None
    return out
