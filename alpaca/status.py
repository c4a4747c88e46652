"""`alpaca-tunnel status`: the daemon's snapshot as a table for an 80-column terminal.

The table is rendered from the very object `status --json` prints (one
answer of the daemon, taken at one instant): no field is fetched or
computed anew here, so the two views of one snapshot cannot disagree.
Two separate runs are two snapshots; `uptime` tells them apart.
"""

from __future__ import annotations

import textwrap

from .protocol.peers import CLOCK_NOTICE

WIDTH = 80


def _wrapped(label: str, counts: dict) -> list[str]:
    text = label + ", ".join(f"{k} {v}" for k, v in counts.items())
    return textwrap.wrap(text, WIDTH, subsequent_indent="    ")


def _clipped(line: str) -> str:
    """A line that may hold a long path, cut at its start to fit WIDTH."""
    return line if len(line) <= WIDTH else line[:WIDTH // 2 - 2] + "..." + line[-(WIDTH - WIDTH // 2 - 1):]


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


def _fec_line(peer: dict) -> str | None:
    """What the peer reports losing of what we send it, and the FEC we add
    (docs/protocol.md §13); nothing for a peer with `fec` "auto" or "off"
    that has not reported loss."""
    loss, fec = peer.get("loss"), peer.get("fec", "off")
    if loss is None and fec in ("auto", "off"):
        return None
    told = "loss not reported yet" if loss is None else f"loss {100 * loss:.1f} % (reported)"
    spread = "\n  bulk spread over its paths: each shard on one" if peer.get("spread") else ""
    if not peer.get("copies"):
        return f"  {told}; fec {fec}: no parity now{spread}"
    return f"  {told}; fec {fec}: {peer['parity']} parity per 64 KiB, {peer['copies']} per datagram{spread}"


def _path_state(path: dict) -> str:
    """When the path last carried something to us, and for a way we probe
    (to a gateway or forwarder) whether our challenges on it come back."""
    if path["learned"] == "probed":
        state = "never answered"
    else:
        heard = path["last_rx_age"]
        state = "last packet " + ("never" if heard is None else f"{_age(heard)} ago")
    if "delivers" not in path:
        return state
    delivers = {True: "delivers", False: "DOES NOT DELIVER", None: "probing"}[path["delivers"]]
    if path["probe_loss"] is not None:
        delivers += f", {100 * path['probe_loss']:.0f} % of {path['probes']} probes lost"
    if path.get("max_datagram"):
        delivers += f"; path MTU: datagrams of at most {path['max_datagram']} bytes pass (sent as smaller shards)"
    elif path.get("path_mtu") == "searching":
        delivers += "; path MTU: full-size datagrams lost, searching"
    return f"{state}; {delivers}"


def _peer_state(peer: dict) -> str:
    """The state word (alpaca/protocol/health.py), upper case when it is a
    fault, after the role of a peer we depend on; a snapshot of a daemon
    from before `state` existed: up or down."""
    if "state" not in peer:
        return "up" if peer["up"] else "down"
    word = peer["state"].upper() if peer["state"] == "unreachable" else peer["state"]
    return f"{peer['role']} {word}" if peer.get("role") else word


def format_check(status: dict) -> str:
    """`status --check`: one line, Nagios style (`ALPACA OK - ...`)."""
    verdict = status["health"]
    who = status.get("name") or status["id"]
    return f"ALPACA {verdict['status'].upper()} - {who} ({status['id']}, {status['mode']}): {verdict['summary']}"


def format_status(status: dict) -> str:
    lines = [f"alpaca-tunnel {status['id']} ({status['mode']}), group {status['group']}, "
             f"up {_age(status['uptime'])}",
             f"  net {status['net']}.0.0/16, TUN {status['tun'] or '-'}, UDP {status['listen']}"]
    if status.get("config"):
        lines.append(_clipped(f"  name {status['name']}, config {status['config']}"))
    if status["drops"]:
        lines += _wrapped("  drops not tied to a peer: ", status["drops"])
    if "health" in status:
        lines += textwrap.wrap(f"  health {status['health']['status'].upper()}: {status['health']['summary']}",
                               WIDTH, subsequent_indent="    ")
    for peer in status["peers"]:
        heard = "never heard" if peer["last_rx_age"] is None else f"last packet {_age(peer['last_rx_age'])} ago"
        lines.append("")
        lines.append(f"peer {peer['id']} ({peer['address']}) {_peer_state(peer)}, {heard}")
        lines.append(f"  rx {peer['rx_packets']} pkts {_size(peer['rx_bytes'])}, "
                     f"tx {peer['tx_packets']} pkts {_size(peer['tx_bytes'])}, relayed {peer['relayed_packets']}")
        fec = _fec_line(peer)
        if fec:
            lines.append(fec)
        if abs(peer.get("clock_offset") or 0) > CLOCK_NOTICE:
            lines.append(f"  clock {peer['clock_offset']:+.0f} s off ours (its traffic is judged by its own clock)")
        for path in peer["paths"]:
            local = f", local {path['local']}" if path.get("local") else ""
            # (the family shows in the address: an IPv6 one is in brackets; --json has `family`)
            lines.append(f"  path {path['address']:<22} {path['learned']:<8} {_path_state(path)}{local}")
        if peer["drops"]:
            lines += _wrapped("  drops: ", peer["drops"])
    return "\n".join(lines)
