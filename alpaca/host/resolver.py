"""Host names of secrets.txt, resolved off the packet path.

getaddrinfo() blocks for as long as the DNS server takes: seconds per name
when it is slow, tens of seconds when it never answers. Called from the
daemon's single loop, that would stall every packet and let the systemd
watchdog kill the daemon. So names are resolved in one worker thread; the
loop only ever reads the answers this module has (`lookup`, which never
blocks) and is woken (`on_change`) when an answer differs from what it had.

A name that fails to resolve keeps its last good address: a DNS outage
must not take a working peer's static address away. A name never resolved
has none, and the peer gets one as soon as it resolves.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from typing import Callable


log = logging.getLogger(__name__)

START_WAIT = 5.0        # seconds the daemon's start waits for its names before going on without them


def ipv4_literal(host: str) -> str | None:
    """`host` as an IPv4 address when it is one written out; None for a name."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def resolve_host(host: str) -> str | None:
    """The IPv4 address of an ip column (literal or host name); None when it does not resolve."""
    literal = ipv4_literal(host)
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
        return infos[0][4][0] if infos else None
    except (OSError, UnicodeError, ValueError):
        return None


class Resolver:
    def __init__(self, on_change: Callable[[], None], resolve: Callable[[str], str | None] = resolve_host):
        self._resolve = resolve
        self._on_change = on_change
        self._answers: dict[str, str] = {}       # host -> last good address
        self._tried: set[str] = set()            # hosts looked up at least once
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="resolver", daemon=True)
        self._thread.start()

    def lookup(self, host: str) -> str | None:
        """The address of `host` as known now (a literal IP as is); never
        blocks. A name not known yet is queued, and None returned."""
        literal = ipv4_literal(host)
        if literal is not None:
            return literal
        with self._lock:
            answer = self._answers.get(host)
            if host not in self._tried:
                self._enqueue(host)
        return answer

    def refresh_all(self) -> None:
        """Look every name asked about so far up again."""
        with self._lock:
            for host in self._tried:
                self._enqueue(host)

    def wait(self, hosts, timeout: float = START_WAIT) -> list[str]:
        """Wait until each name was looked up once, at most `timeout`
        seconds; the names still waiting. Literal addresses need no lookup."""
        hosts = [h for h in hosts if ipv4_literal(h) is None]
        deadline = time.monotonic() + timeout
        with self._lock:
            for host in hosts:
                if host not in self._tried:
                    self._enqueue(host)
            while True:
                left = [h for h in hosts if h not in self._tried]
                remaining = deadline - time.monotonic()
                if not left or remaining <= 0:
                    return left
                self._done.wait(remaining)

    def close(self) -> None:
        self._queue.put(None)        # (a lookup in progress is not interrupted: the thread is a daemon)

    def _enqueue(self, host: str) -> None:
        if host not in self._queued:
            self._queued.add(host)
            self._queue.put(host)

    def _work(self) -> None:
        while True:
            host = self._queue.get()
            if host is None:
                return
            answer = self._resolve(host)
            with self._lock:
                self._queued.discard(host)
                first = host not in self._tried
                self._tried.add(host)
                moved = answer is not None and self._answers.get(host) != answer
                if moved:
                    self._answers[host] = answer
                self._done.notify_all()
            if answer is None and first:
                log.warning("cannot resolve %s; its peer has no static address until it resolves", host)
            if moved:
                self._on_change()
