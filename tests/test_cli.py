"""The command line as an operator meets it: one-line problems, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca.protocol.crypto import genkey

KEY_C, KEY_S = genkey(), genkey()


def run(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alpaca", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def write(tmp_path: Path, config: dict | str, secrets: str | None = None) -> Path:
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    secrets_path = tmp_path / "secrets.txt"
    secrets_path.write_text(secrets if secrets is not None else
                            f"1.1 {KEY_S} 192.0.2.1 null 1040\n16.1 {KEY_C} null null null\n")
    secrets_path.chmod(0o600)
    return path


GOOD = {"id": "16.1", "mode": "client", "gateway": "1.1", "group": "g"}


def check(tmp_path, config, secrets=None):
    r = run("check", "-C", str(write(tmp_path, config, secrets)))
    assert "Traceback" not in r.stdout + r.stderr
    return r


def problems(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("problem: ")]


def test_check_good_config_prints_plan(tmp_path):
    r = check(tmp_path, GOOD)
    assert r.returncode == 0, r.stderr
    assert "TUN device alpaca, MTU 1400, address 10.17.16.1/16" in r.stdout
    assert "route default via 10.17.1.1" in r.stdout
    assert r.stdout.strip().endswith("ok")


def test_check_server_plan_lists_nat_rules(tmp_path):
    r = check(tmp_path, {"id": "1.1", "mode": "server", "group": "g"})
    assert r.returncode == 0, r.stderr
    assert "MASQUERADE" in r.stdout and "--set-mss 1360" in r.stdout
    # net6 "auto": IPv6 forwarding and the same rules for ip6tables, MSS 40 bytes less
    from alpaca.protocol.ids import TunnelNet, group_prefix6
    net6 = TunnelNet((10, 17), group_prefix6("g")).network6
    assert "sysctl net.ipv6.conf.all.forwarding = 1, after accept_ra 1 -> 2" in r.stdout
    assert (f'ip6tables-legacy -t nat -A POSTROUTING -s {net6} ! -d {net6} -m comment --comment '
            '"alpaca-tunnel:alpaca" -j MASQUERADE') in r.stdout
    assert "ip6tables-legacy -t mangle" in r.stdout and "--set-mss 1340" in r.stdout
    r = check(tmp_path, {"id": "1.1", "mode": "server", "group": "g", "net6": "off"})
    assert "ip6tables" not in r.stdout and "net.ipv6" not in r.stdout


@pytest.mark.parametrize("config, expected", [
    ({**GOOD, "forwarder": ["1.1"]}, "unknown key 'forwarder' (did you mean 'forwarders'?)"),
    ({**GOOD, "id": "0.1"}, "id: peer ID '0.1' is reserved (0.0, 0.1 and 255.255 cannot be used)"),
    ({**GOOD, "net": "10.300"}, "net: net '10.300' has an octet above 255"),
    ({**GOOD, "gateway": "16.2"}, "gateway: gateway '16.2' is not a server"),
    ({**GOOD, "port": "1040"}, "port: expected a whole number"),
])
def test_check_bad_config_one_line_each(tmp_path, config, expected):
    r = check(tmp_path, config)
    assert r.returncode == 1
    lines = problems(r)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"problem: {tmp_path / 'config.json'}: {expected}"), lines[0]


def test_check_malformed_json_names_line(tmp_path):
    r = check(tmp_path, '{"id": "16.1",\n "mode": "client"\n "gateway": "1.1"}')
    assert r.returncode == 1
    lines = problems(r)
    assert len(lines) == 1 and "line 3 column 2: not valid JSON" in lines[0], r.stderr


def test_check_bad_secrets_line_names_its_number(tmp_path):
    r = check(tmp_path, GOOD, f"1.1 {KEY_S} 192.0.2.1 null 1040\n# fine\n16.1 short null null null\n")
    assert r.returncode == 1
    lines = problems(r)
    assert any("secrets.txt: line 3: the key is too short" in line for line in lines), r.stderr


def test_check_gateway_without_line(tmp_path):
    r = check(tmp_path, GOOD, f"16.1 {KEY_C} null null null\n")
    assert r.returncode == 1
    assert "the gateway 1.1 has no line" in r.stderr


def test_check_world_readable_secrets_warns(tmp_path):
    path = write(tmp_path, GOOD)
    (tmp_path / "secrets.txt").chmod(0o644)
    r = run("check", "-C", str(path))
    assert r.returncode == 0
    assert "world-readable" in r.stdout and "chmod 600" in r.stdout


def test_check_warns_about_the_default_group(tmp_path):
    r = check(tmp_path, {k: v for k, v in GOOD.items() if k != "group"})
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings == [f'warning: {tmp_path / "config.json"}: group is "default": anyone who guesses it can '
                        "read the peer IDs and timing in packet headers (not their contents); "
                        "set a group name of your own"], r.stdout
    assert "warning" not in check(tmp_path, GOOD).stdout


def test_status_without_daemon(tmp_path):
    r = run("status", "-C", str(write(tmp_path, {**GOOD, "control_socket": str(tmp_path / "none.sock")})))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"alpaca-tunnel: no daemon is running (no control socket at {tmp_path / 'none.sock'})"]


def test_run_with_bad_config_is_one_line(tmp_path):
    r = run("-C", str(write(tmp_path, {**GOOD, "mtu": 10})))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "mtu" in r.stderr and "Traceback" not in r.stderr


def test_genkey():
    r = run("genkey")
    keys = {run("genkey").stdout.strip() for _ in range(2)} | {r.stdout.strip()}
    assert r.returncode == 0 and len(keys) == 3 and all(len(k) == 43 for k in keys)


def test_status_check_without_daemon_is_critical_and_a_bad_question_unknown(tmp_path):
    """Nagios conventions (docs/operations.md "Monitoring"): a daemon that
    does not answer is CRITICAL (2) in one line on stdout; a question that
    cannot be asked is UNKNOWN (3)."""
    config = str(write(tmp_path, {**GOOD, "control_socket": str(tmp_path / "none.sock")}))
    r = run("status", "--check", "-C", config)
    assert r.returncode == 2 and r.stderr == "", r.stderr
    assert r.stdout.startswith("ALPACA CRITICAL - no daemon is running") and len(r.stdout.splitlines()) == 1
    r = run("status", "--check", "alpaca", "-C", config)
    assert r.returncode == 3 and r.stdout == "" and "give NAME or -C, not both" in r.stderr
    r = run("status", "--check", "-C", str(tmp_path / "missing.json"))
    assert r.returncode == 3 and "Traceback" not in r.stderr


def test_status_check_line_and_table_show_the_states():
    from alpaca.status import format_check, format_status
    gateway = {"id": "1.1", "address": "10.17.1.1", "up": True, "role": "gateway", "state": "unreachable",
               "last_rx_age": 14.0, "last_data_age": None, "paths": [], "rx_packets": 0, "rx_bytes": 0,
               "tx_packets": 0, "tx_bytes": 0, "relayed_packets": 0, "drops": {}, "fec": "auto"}
    other = {**gateway, "id": "16.2", "address": "10.17.16.2", "role": None, "state": "silent", "last_rx_age": None}
    health = {"status": "critical", "code": 2, "summary": "gateway 1.1 unreachable (no answer for 14s)"}
    status = {"id": "16.1", "mode": "client", "group": "g", "uptime": 50, "net": "10.17", "tun": "alpaca",
              "listen": "0.0.0.0:1040", "drops": {}, "peers": [gateway, other], "health": health, "name": "alpaca"}
    assert format_check(status) == ("ALPACA CRITICAL - alpaca (16.1, client): "
                                    "gateway 1.1 unreachable (no answer for 14s)")
    table = format_status(status).splitlines()
    assert "  health CRITICAL: gateway 1.1 unreachable (no answer for 14s)" in table
    assert "peer 1.1 (10.17.1.1) gateway UNREACHABLE, last packet 14.0s ago" in table
    assert "peer 16.2 (10.17.16.2) silent, never heard" in table
    # a snapshot of a daemon from before `state`: up or down, as then
    old = {**status, "peers": [{k: v for k, v in gateway.items() if k not in ("state", "role")}]}
    del old["health"]
    assert "peer 1.1 (10.17.1.1) up, last packet 14.0s ago" in format_status(old).splitlines()


def test_status_table_shows_loss_and_fec_within_80_columns():
    from alpaca.status import format_status
    peer = {"id": "1.1", "address": "10.17.1.1", "up": True, "last_rx_age": 0.2, "paths": [],
            "rx_packets": 1, "rx_bytes": 2, "tx_packets": 3, "tx_bytes": 4, "relayed_packets": 0, "drops": {},
            "loss": 0.3, "fec": "auto", "parity": 38, "copies": 5}
    status = {"id": "16.1", "mode": "client", "group": "g", "uptime": 5, "net": "10.17", "tun": "alpaca",
              "listen": "0.0.0.0:1040", "drops": {}, "peers": [peer]}
    table = format_status(status)
    assert "  loss 30.0 % (reported); fec auto: 38 parity per 64 KiB, 5 per datagram" in table.splitlines()
    assert max(len(line) for line in table.splitlines()) <= 80
    clean = format_status({**status, "peers": [{**peer, "loss": None, "parity": 0, "copies": 0}]})
    assert "fec" not in clean                 # auto mode, nothing reported: no line
    default = format_status({**status, "peers": [{**peer, "loss": None, "fec": "off", "parity": 0, "copies": 0}]})
    assert "fec" not in default               # the default (off), nothing reported: no line
    spread = format_status({**status, "peers": [{**peer, "spread": True}]}).splitlines()
    assert spread[spread.index("  loss 30.0 % (reported); fec auto: 38 parity per 64 KiB, 5 per datagram") + 1] \
        == "  bulk spread over its paths: each shard on one"
    fixed = format_status({**status, "peers": [{**peer, "loss": 0.0, "fec": "off", "parity": 0, "copies": 0}]})
    assert "  loss 0.0 % (reported); fec off: no parity now" in fixed.splitlines()
