"""The unix control socket that `alpaca-tunnel status` talks to.

Protocol: the client sends one JSON object on one line ({"command": "status"}),
the daemon answers one JSON object on one line and closes. Unknown commands
and bad JSON get {"error": "..."}; nothing a client sends can crash the daemon.
The socket is mode 0600 (root only), like wg's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import stat
from pathlib import Path
from typing import Callable

RUN_DIR = Path("/run/alpaca-tunnel")
MAX_REQUEST = 4096
CLIENT_TIMEOUT = 0.5
REPLY_BYTES_PER_SECOND = 10e6   # slowest client we wait for when sending a reply


class ControlError(Exception):
    pass


def default_socket_path(config_path: Path, tun_name: str) -> Path:
    """One socket per daemon instance: the TUN name for people, plus a hash of
    the config file path so two daemons with the same TUN name (in two network
    namespaces, say) never share a socket."""
    digest = hashlib.blake2b(str(Path(config_path).resolve()).encode(), digest_size=4).hexdigest()
    return RUN_DIR / f"{tun_name}-{digest}.sock"


def socket_path(config) -> Path:
    """The control socket of the daemon that runs with this config."""
    return Path(config.control_socket) if config.control_socket else default_socket_path(config.path, config.name)


class ControlServer:
    def __init__(self, path: Path, handler: Callable[[dict], dict]):
        self.path = Path(path)
        self.handler = handler
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()

    def _remove_stale(self) -> None:
        """A socket left by a dead daemon is replaced; a live one is refused."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"control socket path {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            os.unlink(self.path)      # nobody listens: stale
            return
        finally:
            probe.close()
        raise ControlError(f"another daemon is already running with control socket {self.path}")

    def serve_ready(self) -> None:
        """Accept and answer the pending clients (called when the fd is readable)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                conn.settimeout(CLIENT_TIMEOUT)
                try:
                    reply = json.dumps(self._answer(self._read_request(conn))).encode() + b"\n"
                    # a big table (65k peers: ~15 MB) needs longer than a request
                    conn.settimeout(CLIENT_TIMEOUT + len(reply) / REPLY_BYTES_PER_SECOND)
                    conn.sendall(reply)
                except OSError:
                    pass

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
        return data

    def _answer(self, raw: bytes) -> dict:
        try:
            request = json.loads(raw.decode() or "null")
        except (UnicodeDecodeError, ValueError):
            return {"error": "request is not valid JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"error": "request must be a JSON object with a 'command' string"}
        try:
            return self.handler(request)
        except ControlError as e:
            return {"error": str(e)}

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def query(path: Path, request: dict, timeout: float = 30.0) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise ControlError(f"no daemon is running (no control socket at {path})") from None
        raise ControlError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError(f"the daemon at {path} gave an unreadable answer") from None
