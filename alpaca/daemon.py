"""The daemon: wires the pure protocol core to the host.

One thread, one selector loop over the UDP socket, the TUN device, the
control socket and a signal wake-up pipe. Each wake-up drains the ready
descriptors in batches, hands the batch to the core with the current time,
and performs what the core returns (datagrams to send, packets to write).
Timers (keepalives, delayed duplicates, expiry) are the core's; the loop only
sleeps until the core's next deadline.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import time
from pathlib import Path

from .config import Config, ConfigError
from .control import ControlError, ControlServer, default_socket_path
from .protocol.drops import DropReason
from .protocol.ids import format_id
from .protocol.node import Node, NodeSettings
from .protocol.peers import PeerEntry
from .secrets import PeerSecret, load_secrets, resolve_host
from .sysctl import IP_FORWARD, Sysctl
from .tun import Tun, TunError
from .udp import Udp, UdpError

log = logging.getLogger("alpaca")

BATCH = 64                  # packets drained from one fd per wake-up
DROP_SUMMARY_INTERVAL = 10.0
MAX_SLEEP = 1.0


class StartError(Exception):
    """The daemon cannot start; one line for the operator."""


def settings_from(config: Config) -> NodeSettings:
    return NodeSettings(my_id=config.id, net=config.net, group=config.group, mode=config.mode,
                        gateway=config.gateway, forwarders=config.forwarders,
                        duplicate=config.duplicate, duplicate_delay=config.duplicate_delay_ms / 1000,
                        inactive_downward_static=config.inactive_downward_static,
                        padding=config.padding)


def peer_entries(secrets: dict[int, PeerSecret], default_port: int) -> dict[int, PeerEntry]:
    """secrets.txt lines -> what the core needs (host names resolved here, not in the core)."""
    entries = {}
    for secret in secrets.values():
        addr = None
        if secret.host:
            ip = resolve_host(secret.host)
            if ip is None:
                log.warning("peer %s: cannot resolve %s; no static address until it resolves",
                            format_id(secret.id), secret.host)
            else:
                addr = (ip, secret.port or default_port)
        entries[secret.id] = PeerEntry(secret.key, addr)
    return entries


def read_secrets(config: Config, at_start: bool) -> dict[int, PeerEntry]:
    secrets, problems, warnings = load_secrets(config.secret_file)
    for warning in warnings:
        log.warning("%s", warning)
    if problems:
        if at_start:
            raise StartError("\n".join(str(p) for p in problems))
        for problem in problems:
            log.error("%s (line skipped)", problem)
    if config.id not in secrets:
        raise StartError(f"{config.secret_file}: no line for this peer's own ID {format_id(config.id)} "
                         f"(its key is needed)")
    return peer_entries(secrets, config.port)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.node: Node | None = None
        self.tun: Tun | None = None
        self.udp: Udp | None = None
        self.control: ControlServer | None = None
        self.sysctl = Sysctl()
        self.stop_requested = False
        self.reload_requested = False
        self.started = time.time()
        self.tun_write_errors = 0
        self._last_drops: dict[tuple[int | None, DropReason], int] = {}

    # ------------------------------------------------------------ setup / teardown
    def start(self) -> None:
        cfg = self.config
        now = time.time()
        peers = read_secrets(cfg, at_start=True)
        if cfg.virtual_net is not None:
            log.warning("virtual_net is accepted for compatibility but has no effect yet")
        self.node = Node(settings_from(cfg), peers, now)
        self.udp = Udp(cfg.listen, cfg.port)
        if cfg.mode != "forwarder":
            address = str(self.node.net.address(cfg.id))
            self.tun = Tun(cfg.name, cfg.mtu, address)
        if cfg.mode == "server":
            self.sysctl.set(IP_FORWARD, "1")    # servers route between clients and out
        path = Path(cfg.control_socket) if cfg.control_socket else default_socket_path(cfg.path, cfg.name)
        self.control = ControlServer(path, self.handle_control)
        log.info("started: id %s, mode %s, %s, UDP %s:%d, %d peers, control %s",
                 format_id(cfg.id), cfg.mode,
                 f"TUN {self.tun.name} {self.node.net.address(cfg.id)}/16" if self.tun else "no TUN",
                 cfg.listen, cfg.port, len(peers) - 1, path)

    def stop(self) -> None:
        for closer in (self.control, self.tun, self.udp):
            if closer is not None:
                try:
                    closer.close()
                except OSError:
                    pass
        self.sysctl.restore()
        log.info("stopped")

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    def reload(self) -> None:
        try:
            peers = read_secrets(self.config, at_start=False)
        except (StartError, ConfigError) as e:
            log.error("reload refused: %s", str(e).replace("\n", "; "))
            return
        added, changed, removed = self.node.apply_peers(peers)
        log.info("reloaded %s: %d added, %d changed, %d removed",
                 self.config.secret_file, len(added), len(changed), len(removed))

    # ------------------------------------------------------------ control socket
    def handle_control(self, request: dict) -> dict:
        if request["command"] != "status":
            raise ControlError(f"unknown command {request['command']!r}")
        now = time.time()
        status = self.node.snapshot(now)
        status.update({
            "uptime": round(now - self.started, 1),
            "tun": self.tun.name if self.tun else None,
            "listen": f"{self.config.listen}:{self.config.port}",
            "net": "%d.%d" % self.config.net,
            "tun_write_errors": self.tun_write_errors,
            "udp_send_errors": self.udp.send_errors,
        })
        return status

    # ------------------------------------------------------------ the loop
    def _perform(self, out) -> None:
        if out.sends:
            self.udp.send_batch(out.sends)
        if out.tun and self.tun is not None:
            self.tun_write_errors += self.tun.write_batch(out.tun)

    def _log_notices(self) -> None:
        for notice in self.node.notices:
            log.info("%s", notice)
        self.node.notices.clear()

    def _log_drop_summary(self) -> None:
        """Per-packet problems are summed up here, never logged one by one."""
        current: dict[tuple[int | None, DropReason], int] = {
            (None, r): n for r, n in self.node.global_drops.items()}
        for peer in self.node.table.peers.values():
            current.update({(peer.id, r): n for r, n in peer.drops.items()})
        for (peer_id, reason), count in sorted(current.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1].value)):
            delta = count - self._last_drops.get((peer_id, reason), 0)
            if delta > 0:
                level = logging.DEBUG if reason is DropReason.DUPLICATE else logging.INFO
                who = f"from peer {format_id(peer_id)}" if peer_id is not None else "before authentication"
                log.log(level, "dropped %d datagrams (%s) %s in the last %.0f s",
                        delta, reason.value, who, DROP_SUMMARY_INTERVAL)
        self._last_drops = current

    def run(self) -> int:
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        old_handlers = {s: signal.signal(s, self._on_signal) for s in sigs}
        try:
            self.start()
            return self._loop(wake_r)
        finally:
            self.stop()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            wake_r.close()
            wake_w.close()

    def _loop(self, wake_r: socket.socket) -> int:
        node, udp, tun = self.node, self.udp, self.tun
        sel = selectors.DefaultSelector()
        sel.register(udp.fd, selectors.EVENT_READ, "udp")
        if tun is not None:
            sel.register(tun.fd, selectors.EVENT_READ, "tun")
        sel.register(self.control.fd, selectors.EVENT_READ, "control")
        sel.register(wake_r.fileno(), selectors.EVENT_READ, "wake")
        next_summary = time.time() + DROP_SUMMARY_INTERVAL
        while not self.stop_requested:
            now = time.time()
            timeout = min(max(node.next_deadline() - now, 0.0), MAX_SLEEP)
            for key, _ in sel.select(timeout):
                now = time.time()
                what = key.data
                if what == "udp":
                    self._perform(node.from_udp(udp.recv_batch(BATCH), now))
                elif what == "tun":
                    self._perform(node.from_tun(tun.read_batch(BATCH), now))
                elif what == "control":
                    self.control.serve_ready()
                else:
                    try:
                        wake_r.recv(512)
                    except BlockingIOError:
                        pass
            now = time.time()
            if now >= node.next_deadline():
                self._perform(node.tick(now))
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            if node.notices:
                self._log_notices()
            if now >= next_summary:
                next_summary = now + DROP_SUMMARY_INTERVAL
                self._log_drop_summary()
        sel.close()
        return 0


def run_daemon(config: Config) -> int:
    try:
        return Daemon(config).run()
    except (StartError, TunError, UdpError, ControlError, ConfigError) as e:
        for line in str(e).splitlines():
            log.error("%s", line)
        return 1
