"""pre_up / post_up / pre_down / post_down commands (docs/configuration.md).

Each command runs with /bin/sh -c, with the TUN name and the peer's identity
in the environment (ALPACA_TUN, ALPACA_ID, ALPACA_MODE, ALPACA_NET), like
wg-quick's %i. A failing up-hook aborts start; a failing down-hook is logged.
"""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("alpaca")
HOOK_TIMEOUT = 60


class HookError(Exception):
    pass


def run_hooks(stage: str, commands: tuple[str, ...], env: dict[str, str], fatal: bool) -> None:
    for command in commands:
        try:
            result = subprocess.run(["/bin/sh", "-c", command], env={**os.environ, **env},
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=HOOK_TIMEOUT)
            code = result.returncode
            detail = (result.stderr or result.stdout).strip().splitlines()
        except subprocess.TimeoutExpired:
            code, detail = None, [f"timed out after {HOOK_TIMEOUT} s"]
        if code == 0:
            log.info("%s: ran %r", stage, command)
            continue
        message = f"{stage} command {command!r} failed" + (f" with exit status {code}" if code is not None else "") \
            + (f": {detail[-1]}" if detail else "")
        if fatal:
            raise HookError(message)
        log.error("%s", message)
