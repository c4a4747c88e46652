"""Tier 3 (root): the host lacks what the daemon needs — one clear line.

The real daemon (`.venv/bin/alpaca-tunnel -C config`) runs in a network
namespace of its own (`unshare -n`), so it cannot touch the host's; the
namespaces here are anonymous and go with the process, which each test ends
(by its PID) if it is still running.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from alpaca.protocol.crypto import genkey
from alpaca.lab.testbed import write_peer_config

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / ".venv" / "bin" / "alpaca-tunnel"

pytestmark = pytest.mark.root


@pytest.fixture
def config(tmp_path) -> Path:
    return write_peer_config(tmp_path, {"id": "1.1", "mode": "server", "group": "test", "name": "atlocal",
                                        "control_socket": str(tmp_path / "control.sock")},
                             [f"1.1 {genkey()} 127.0.0.1 null 1040"])


def run_daemon(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:             # it should have given up at once
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def check_one_clear_line(result: subprocess.CompletedProcess, needle: str) -> str:
    lines = result.stderr.splitlines()
    errors = [line for line in lines if " ERROR " in line]
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1, result.stderr
    assert [line for line in lines if needle in line] == errors, result.stderr
    return errors[0]


def test_without_cap_net_admin_one_line(config):
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("capsh missing (Debian package libcap2-bin; bin/setup installs it)")
    r = run_daemon(["unshare", "--net", "--", capsh, "--drop=cap_net_admin", "--",
                    "-c", f'exec "{DAEMON}" -C "{config}"'])
    line = check_one_clear_line(r, "CAP_NET_ADMIN")
    print(f"\n{line}")
    assert "run alpaca-tunnel as root" in line


def test_without_dev_net_tun_one_line(config):
    # a private mount namespace with an empty tmpfs over /dev/net
    r = run_daemon(["unshare", "--net", "--mount", "--", "sh", "-c",
                    f'mount -t tmpfs tmpfs /dev/net && exec "{DAEMON}" -C "{config}"'])
    line = check_one_clear_line(r, "/dev/net/tun")
    print(f"\n{line}")
    assert "/dev/net/tun is missing" in line
    assert Path("/dev/net/tun").exists(), "the host's /dev/net was not touched"
