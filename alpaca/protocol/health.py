"""Health of a peer and of a daemon, from the status snapshot
(docs/operations.md "Monitoring").

Pure functions of snapshot data: the ages in a snapshot are already
relative to the instant it was taken, so nothing here reads a clock, and
the verdict a monitoring check prints is the one `status --json` carries.

A peer's `state`, one word:
  active       it sent us packets (data) within LIVE_WITHIN
  idle         it sent us only keepalives, probe answers or loss reports
               within LIVE_WITHIN: alive, nothing to carry
  pending      one we depend on (gateway, forwarder), not heard from yet,
               and its first probes have not waited PROBE_TIMEOUT
  unreachable  one we depend on, not heard from within LIVE_WITHIN (or
               never) although we probe it every keepalive
  silent       one we do not depend on, not heard from within LIVE_WITHIN
               (another client; on a server, a client that is not running)

Nothing here can tell a dead peer from one that rejects us: a datagram that
fails the check at the far end is dropped there without an answer (an
answer would let anyone probe for keys). Both are `unreachable`; the far
end's status counts the rejected ones (`auth_failure`, `malformed`,
`unknown_peer`).
"""

from __future__ import annotations

from .peers import DELIVERS_WITHIN

# a peer we probe answers every keepalive (4 s): three intervals without any
# answer and it is unreachable. Any peer heard within it is alive.
LIVE_WITHIN = DELIVERS_WITHIN

STATES = ("active", "idle", "pending", "unreachable", "silent")
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3       # the exit codes of a Nagios plugin
LEVELS = {OK: "ok", WARNING: "warning", CRITICAL: "critical", UNKNOWN: "unknown"}


def _within(age: float | None) -> bool:
    return age is not None and age <= LIVE_WITHIN


def peer_state(peer: dict, uptime: float) -> str:
    """The state of one peer of a snapshot: `peer` has `role` (gateway,
    forwarder or None), `last_rx_age`, `last_data_age` and `paths` (each
    with `delivers` when it is a way we probe); `uptime` is the daemon's."""
    if _within(peer["last_data_age"]):
        return "active"
    if _within(peer["last_rx_age"]):
        return "idle"
    if peer["role"] is None:
        return "silent"
    failed = any(path.get("delivers") is False for path in peer["paths"])
    if peer["last_rx_age"] is None and not failed and uptime < LIVE_WITHIN:
        return "pending"
    return "unreachable"


def _heard(peer: dict) -> str:
    age = peer["last_rx_age"]
    return "never answered" if age is None else f"no answer for {age:.0f}s"


def daemon_health(snapshot: dict) -> dict:
    """The verdict on a snapshot whose peers have `role` and `state`:
    critical when the gateway is unreachable (nothing of ours gets out),
    warning when another peer we depend on is unreachable or pending, or
    one of our probed ways to it does not deliver; else ok. A daemon with
    no gateway and no forwarders (a server) depends on no peer: ok.
    {"status": "ok"|"warning"|"critical", "code": 0|1|2, "summary": one line}."""
    code, problems, fine = OK, [], []
    for peer in snapshot["peers"]:
        role, state = peer["role"], peer["state"]
        if role is None:
            continue
        name = f"{role} {peer['id']}"
        if state == "unreachable":
            code = max(code, CRITICAL if role == "gateway" else WARNING)
            problems.append(f"{name} unreachable ({_heard(peer)})")
        elif state == "pending":
            code = max(code, WARNING)
            problems.append(f"{name} pending (first probes out)")
        else:
            failing = [p["address"] for p in peer["paths"] if p.get("delivers") is False]
            if failing:
                code = max(code, WARNING)
                problems.append(f"{name} {state}, but {', '.join(failing)} does not deliver")
            else:
                fine.append(f"{name} {state}")
    if not problems and not fine:
        n = len(snapshot["peers"])
        counts = ", ".join(f"{sum(p['state'] == s for p in snapshot['peers'])} {s}"
                           for s in ("active", "idle", "silent"))
        summary = f"no peer required; {counts} of {n} peer{'' if n == 1 else 's'}"
    else:
        summary = "; ".join(problems + fine)
    return {"status": LEVELS[code], "code": code, "summary": summary}
