"""`alpaca-tunnel status`: the daemon's snapshot as a table for an 80-column terminal."""

from __future__ import annotations


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(status: dict) -> str:
    lines = [f"alpaca-tunnel {status['id']} ({status['mode']}), group {status['group']}, "
             f"net {status['net']}.0.0/16, TUN {status['tun'] or '-'}, UDP {status['listen']}, "
             f"up {_age(status['uptime'])}"]
    if status["drops"]:
        lines.append("  drops not tied to a peer: " + ", ".join(f"{k} {v}" for k, v in status["drops"].items()))
    for peer in status["peers"]:
        state = "up" if peer["up"] else "down"
        heard = "never heard" if peer["last_rx_age"] is None else f"last packet {_age(peer['last_rx_age'])} ago"
        lines.append("")
        lines.append(f"peer {peer['id']} ({peer['address']}) {state}, {heard}")
        lines.append(f"  rx {peer['rx_packets']} pkts {_size(peer['rx_bytes'])}, "
                     f"tx {peer['tx_packets']} pkts {_size(peer['tx_bytes'])}, relayed {peer['relayed_packets']}")
        for path in peer["paths"]:
            heard = "never" if path["last_rx_age"] is None else f"{_age(path['last_rx_age'])} ago"
            lines.append(f"  path {path['address']:<22} {path['learned']:<8} last packet {heard}")
        if peer["drops"]:
            lines.append("  drops: " + ", ".join(f"{k} {v}" for k, v in peer["drops"].items()))
    return "\n".join(lines)
