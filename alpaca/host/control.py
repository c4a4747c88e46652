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
import selectors
import socket
import stat
import time
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


class _Client:
    """One control connection: a request line in, the answer out, closed.
    Non-blocking: a slow or silent client costs the loop one short read or
    write per readiness, never a wait, and is cut off at its deadline."""
    __slots__ = ("conn", "buf", "out", "deadline")

    def __init__(self, conn: socket.socket, deadline: float):
        self.conn, self.buf, self.out, self.deadline = conn, bytearray(), None, deadline


class ControlServer:
    """The listening socket and its clients, all served from the daemon's
    selector (`attach`): no control client, however slow, may delay a
    datagram. A request must arrive whole within CLIENT_TIMEOUT and fit in
    MAX_REQUEST bytes; the answer gets CLIENT_TIMEOUT plus its size at
    REPLY_BYTES_PER_SECOND."""

    def __init__(self, path: Path, handler: Callable[[dict], dict], clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.handler = handler
        self.clock = clock
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
        self.clients: dict[int, _Client] = {}
        self.selector: selectors.BaseSelector | None = None
        self.cut_off = 0                # clients closed at their deadline

    def attach(self, selector: selectors.BaseSelector, data: object) -> None:
        """Serve from this selector: the listening socket and every client
        are registered with `data`; the owner calls serve_ready(fd)."""
        self.selector, self._data = selector, data
        selector.register(self.fd, selectors.EVENT_READ, data)

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

    def serve_ready(self, fd: int | None = None) -> None:
        """The listening socket (self.fd) or one client is ready. fd None:
        accept and try every client (for a caller without a selector)."""
        if fd is None:
            self._accept()
            for client_fd in list(self.clients):
                self.serve_ready(client_fd)
            return
        if fd == self.fd:
            self._accept()
            return
        client = self.clients.get(fd)
        if client is None:
            return
        try:
            if client.out is None:
                self._read(client)
            if client.out is not None:
                self._write(client)
        except OSError:
            self._close(client)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return          # (EMFILE and the like: the next readiness tries again)
            conn.setblocking(False)
            client = self.clients[conn.fileno()] = _Client(conn, self.clock() + CLIENT_TIMEOUT)
            if self.selector is not None:
                self.selector.register(conn, selectors.EVENT_READ, self._data)

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        client.buf += chunk
        if chunk and b"\n" not in client.buf and len(client.buf) < MAX_REQUEST:
            return              # more to come, within the deadline
        reply = json.dumps(self._answer(bytes(client.buf))).encode() + b"\n"
        client.out = memoryview(reply)
        # a big table (65k peers: ~15 MB) needs longer than a request
        client.deadline = self.clock() + CLIENT_TIMEOUT + len(reply) / REPLY_BYTES_PER_SECOND
        if self.selector is not None:
            self.selector.modify(client.conn, selectors.EVENT_WRITE, self._data)

    def _write(self, client: _Client) -> None:
        try:
            sent = client.conn.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        client.out = client.out[sent:]
        if not client.out:
            self._close(client)

    def _close(self, client: _Client) -> None:
        self.clients.pop(client.conn.fileno(), None)
        if self.selector is not None:
            try:
                self.selector.unregister(client.conn)
            except (KeyError, ValueError):
                pass
        client.conn.close()

    def next_deadline(self) -> float:
        return min((c.deadline for c in self.clients.values()), default=float("inf"))

    def expire(self) -> None:
        """Close the clients past their deadline (slow, silent or trickling)."""
        now = self.clock()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self.cut_off += 1
            self._close(client)

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
        for client in list(self.clients.values()):
            self._close(client)
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
