"""The unix control socket that `alpaca-tunnel status` talks to.

Protocol: the client sends one JSON object on one line ({"command": "status"}),
the daemon answers one JSON object on one line and closes. Unknown commands
and bad JSON get {"error": "..."}; nothing a client sends can crash the daemon.
The socket is mode 0600 (root only), like wg's.

Finding the daemons: every daemon is reachable through RUN_DIR, like wg's
/var/run/wireguard. Its socket is RUN_DIR/<name>-<hash>.sock by default; a
daemon whose config names another `control_socket` puts a symlink of that
name to it there (`registry_path`). `alpaca-tunnel status` with no -C asks
every *.sock in RUN_DIR (`discover`); a socket or link nobody answers on
is stale (its daemon was killed) and is only reported.
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


class _Stale(ControlError):
    """Nobody listens on the socket (or the link points nowhere): its daemon is gone."""


def default_socket_path(config_path: Path, tun_name: str) -> Path:
    """One socket per daemon instance: the TUN name for people, plus a hash of
    the config file path so two daemons with the same TUN name (in two network
    namespaces, say) never share a socket."""
    digest = hashlib.blake2b(str(Path(config_path).resolve()).encode(), digest_size=4).hexdigest()
    return RUN_DIR / f"{tun_name}-{digest}.sock"


def socket_path(config) -> Path:
    """The control socket of the daemon that runs with this config."""
    return Path(config.control_socket) if config.control_socket else default_socket_path(config.path, config.name)


def registry_path(config) -> Path | None:
    """Where the daemon with this config is found in RUN_DIR when its socket
    is elsewhere (a symlink to the socket); None when the socket is there."""
    path = default_socket_path(config.path, config.name)
    if not config.control_socket or Path(os.path.abspath(config.control_socket)) == path:
        return None
    return path


def _live(path: Path) -> bool:
    """Someone listens on the socket at path (or at the end of the symlink)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def remove_stale(config) -> list[Path]:
    """The socket and registry link of this config that nobody answers on
    (its daemon was killed), removed; a live daemon's are left alone."""
    removed = []
    for path in (socket_path(config), registry_path(config)):
        if path is None or _live(path):
            continue
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if stat.S_ISSOCK(mode) or stat.S_ISLNK(mode):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


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

    def __init__(self, path: Path, handler: Callable[[dict], dict], clock: Callable[[], float] = time.monotonic,
                 register: Path | None = None):
        self.path = Path(path)
        self.handler = handler
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale(self.path)
        # `register`: the symlink in RUN_DIR that makes this daemon findable
        # (registry_path). Not fatal when it cannot be made: the daemon
        # logs register_error and runs, found only with -C.
        self.link: Path | None = None
        self.register_error: str | None = None
        if register is not None:
            try:
                self._remove_stale(register)
            except OSError as e:
                self.register_error, register = f"cannot register in {register.parent}: {e.strerror or e}", None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        if register is not None:
            try:
                register.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.abspath(self.path), register)
                self.link = register
            except OSError as e:
                self.register_error = f"cannot register in {register.parent}: {e.strerror or e}"
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

    @staticmethod
    def _remove_stale(path: Path) -> None:
        """A socket (or registry link) left by a dead daemon is replaced; a
        live one is refused."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not (stat.S_ISSOCK(mode) or stat.S_ISLNK(mode)):
            raise ControlError(f"control socket path {path} exists and is not a socket")
        if not _live(path):
            os.unlink(path)           # nobody listens: stale
            return
        raise ControlError(f"another daemon is already running with control socket {path}")

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
            self.clients[conn.fileno()] = _Client(conn, self.clock() + CLIENT_TIMEOUT)
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
        if self.link is not None:
            try:
                if os.readlink(self.link) == os.path.abspath(self.path):
                    os.unlink(self.link)
            except OSError:
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
        if e.errno == errno.ENOENT:
            raise _Stale(f"no daemon is running (no control socket at {path})") from None
        if e.errno == errno.ECONNREFUSED:
            raise _Stale(f"no daemon is running (stale control socket at {path})") from None
        raise ControlError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError(f"the daemon at {path} gave an unreadable answer") from None


DISCOVER_TIMEOUT = 5.0          # per daemon: a wedged one must not hang `status` for long


def discover(run_dir: Path = RUN_DIR, timeout: float = DISCOVER_TIMEOUT) -> tuple[list[dict], list[Path], list[str]]:
    """Every daemon findable in run_dir: (their status snapshots, the stale
    sockets or links nobody answers on, one line per other failure).
    A daemon reached by two names (its socket in run_dir and a link to it)
    is asked once. Raises ControlError when run_dir cannot be read."""
    try:
        entries = sorted(p for p in run_dir.iterdir() if p.name.endswith(".sock"))
    except FileNotFoundError:
        entries = []
    except OSError as e:
        raise ControlError(f"cannot read {run_dir}: {e.strerror or e}") from None
    found, stale, failed, asked = [], [], [], set()
    for entry in entries:
        target = os.path.realpath(entry)
        if target in asked:
            continue
        asked.add(target)
        try:
            snapshot = query(entry, {"command": "status"}, timeout=timeout)
        except _Stale:
            stale.append(entry)
            continue
        except ControlError as e:
            failed.append(str(e))
            continue
        if "error" in snapshot:
            failed.append(f"{entry}: {snapshot['error']}")
            continue
        found.append(snapshot)
    return found, stale, failed


def socket_name(entry: Path) -> str:
    """The interface name in a RUN_DIR entry's file name (<name>-<hash>.sock)."""
    stem = entry.name[:-len(".sock")] if entry.name.endswith(".sock") else entry.name
    name, sep, digest = stem.rpartition("-")
    return name if sep and len(digest) == 8 else stem
