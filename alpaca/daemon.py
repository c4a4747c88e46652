"""The daemon: wires the pure protocol core to the host.

One thread, one selector loop over the UDP socket, the TUN device, the
control socket, the secrets.txt watch, the route monitor and a signal wake-up
pipe. Each wake-up drains the ready descriptors in batches, hands the batch to
the core with the current time, and performs what the core returns
(datagrams to send, packets to write). Timers (keepalives, delayed
duplicates, expiry) are the core's; the loop only sleeps until the core's next
deadline (at most MAX_SLEEP, so the watchdog keeps being fed).

Start-up is a stack of host changes, each registered with its exact inverse
(contextlib.ExitStack): a failure at any step, SIGTERM, or a normal exit
unwinds exactly what was done, in reverse order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path

from .config import Config, ConfigError, config_warnings, load_config, parse_fec
from .host.control import ControlError, ControlServer, registry_path, socket_path
from .host.hooks import HookError, run_hooks
from .host.nat import NatError, ServerNat
from .host.notify import Notifier
from .host.resolver import Resolver, resolve_host
from .host.route_lookup import RouteLookup
from .host.route_monitor import RouteMonitor
from .host.routes import RouteError
from .host.sysctl import IP_FORWARD, IPV6_FORWARDING, Sysctl
from .host.tun import Tun, TunError
from .host.udp import MAX_FILTER_ADDRESSES, UNKNOWN_ONE_IN, UdpError
from .host.underlay import Underlay, planned_sockets
from .host.watch import FileWatch
from .peerlist import cross_problems, host_names, peer_entries, underlay_endpoints, underlay_hosts
from .protocol import fec
from .protocol.crypto import aes_available
from .protocol.drops import GLOBAL_DROPS, DropReason
from .protocol.ids import TunnelNet, format_id
from .protocol.node import Node, NodeSettings
from .protocol.peers import PeerEntry
from .secrets import PeerSecret, load_secrets
from .supervision import (DROP_SUMMARY_INTERVAL, FLOOD_CHECK_INTERVAL, FLOOD_HOLD, FLOOD_MIN, DropSummary,
                          FloodGuard, Schedule)

log = logging.getLogger("alpaca")

BATCH = 64                  # reads from one fd per wake-up at most (a GRO train or a super-packet is one) ...
BATCH_BYTES = 128 << 10     # ... and fewer once this many bytes are read: what waits on the other fd
                            # (a ping, an ACK) waits at most for this much sealing or opening (design.md)
STATUS_INTERVAL = 5.0
RESOLVE_INTERVAL = 300.0    # re-resolve host names in secrets.txt (docs/configuration.md)
RELOAD_DEBOUNCE = 0.3       # editors write in several steps
ROUTES_DEBOUNCE = 0.5       # route changes come in bursts
MAX_SLEEP = 1.0
CAP_NET_ADMIN = 12          # linux/capability.h
UNAUTHENTICATED = tuple(r for r in GLOBAL_DROPS if r is not DropReason.NOT_ROUTABLE)

# config keys that a SIGHUP can apply to the running daemon; the rest need a restart
LIVE_KEYS = {"forwarders", "duplicate", "fec", "peers", "duplicate_delay_ms", "inactive_downward_static",
             "padding", "log_level", "secret_file", "pre_up_cmds", "post_up_cmds",
             "pre_down_cmds", "post_down_cmds", "virtual_net", "local_routes", "chnroute"}


class StartError(Exception):
    """The daemon cannot start; one line for the operator."""


def settings_from(config: Config) -> NodeSettings:
    return NodeSettings(my_id=config.id, net=config.net, net6=config.net6, group=config.group, mode=config.mode,
                        gateway=config.gateway_in_use, forwarders=config.forwarders,
                        duplicate=config.duplicate, duplicate_delay=config.duplicate_delay_ms / 1000,
                        inactive_downward_static=config.inactive_downward_static,
                        padding=config.padding, vnet=True, mtu=config.mtu, fec=parse_fec(config.fec),
                        peer_fec={peer: parse_fec(fec) for peer, fec in config.peers},
                        peer_networks={peer: tuple(ipaddress.ip_network(n) for n in nets)
                                       for peer, nets in config.peer_networks},
                        aes=config.aead == "auto" and aes_available())


def read_secrets(config: Config, at_start: bool, resolver: Resolver) -> dict[int, PeerEntry]:
    """At start any bad line is fatal; on reload bad lines are reported and
    skipped. Host names are what `resolver` knows now: it never blocks, but
    at start it is given a few seconds to learn them (resolver.START_WAIT)."""
    secrets, problems, warnings = load_secrets(config.secret_file)
    for warning in warnings:
        log.warning("%s", warning)
    if problems and at_start:
        raise StartError("\n".join(str(p) for p in problems))
    for problem in problems:
        log.error("%s (line skipped)", problem)
    fatal = cross_problems(config, secrets)
    if fatal and (at_start or config.id not in secrets or secrets[config.id].key is None):
        raise StartError("\n".join(fatal))
    for problem in fatal:
        log.error("%s", problem)
    if at_start:
        resolver.wait(host_names(secrets))
    return peer_entries(secrets, config.port, resolver.lookup)


def server_nat(config: Config, net: TunnelNet, ipv6: bool = True) -> ServerNat:
    """A server's NAT and FORWARD rules, as config.json asks for them; the
    IPv6 ones when the tunnel has IPv6 (`ipv6`: its TUN got its address)."""
    return ServerNat(config.name, str(net.network), config.mtu, config.allow_inbound_from,
                     str(net.network6) if net.network6 is not None and ipv6 else None)


def client_routes(config: Config, peers: dict[int, PeerEntry], net: TunnelNet, ipv6: bool = True):
    """A client's routing (host/routes.py ClientRoutes), as config.json and secrets.txt ask for it;
    IPv6 into the tunnel when it carries IPv6 (`ipv6`: its TUN got its address)."""
    from .host import routes
    gateway6 = net.address6(config.gateway) if ipv6 else None
    return routes.ClientRoutes(config.name, str(net.address(config.gateway)), underlay_hosts(config, peers),
                               list(config.local_routes), config.chnroute, kill_switch=config.kill_switch,
                               gateway6=gateway6 and str(gateway6), block_ipv6=config.block_ipv6)


def keeps_kill_switch(config: Config) -> bool:
    """Whether this config's routes block traffic while the daemon is dead (docs/operations.md "Kill switch")."""
    return config.mode == "client" and config.gateway is not None and config.kill_switch


def plan(config: Config, secrets: dict[int, PeerSecret]) -> list[str]:
    """What the daemon would do to the host, for people to read (`alpaca-tunnel check`)."""
    net = TunnelNet(config.net, config.net6)
    lines = [f"peer {format_id(config.id)} ({config.mode}) in group {config.group!r}, "
             f"{len(secrets) - (config.id in secrets)} other peers",
             planned_sockets(config.listen, config.port)]
    lines += underlay_endpoints(config, secrets)
    if config.mode != "forwarder":
        address6 = net.address6(config.id)
        lines.append(f"TUN device {config.name}, MTU {config.mtu}, address {net.address(config.id)}/16"
                     + (f" and {address6}/64" if address6 else ""))
    if config.mode == "server":
        lines.append("sysctl net.ipv4.ip_forward = 1 (restored on stop)")
        if net.network6 is not None:
            lines.append("sysctl net.ipv6.conf.all.forwarding = 1, after accept_ra 1 -> 2 on every interface "
                         "that has 1 (restored on stop)")
        lines += [f"{rule.command} {rule}" for rule in server_nat(config, net).rules()]
    if config.mode == "client" and config.gateway is not None:
        lines += client_routes(config, peer_entries(secrets, config.port, resolve_host), net).describe()
    for stage in ("pre_up", "post_up", "pre_down", "post_down"):
        for command in getattr(config, f"{stage}_cmds"):
            lines.append(f"{stage} hook: {command}")
    return lines


def known_hosts(node: Node, limit: int = MAX_FILTER_ADDRESSES) -> set[str] | None:
    """Every peer address the node knows (static and learned paths); None
    when there are more than `limit`."""
    hosts: set[str] = set()
    for peer in node.table.peers.values():
        if peer.paths:
            hosts.update(addr[0] for addr in peer.paths)
            if len(hosts) > limit:
                return None
    return hosts


def cleanup_leftovers(tun_name: str, keep_routes: bool = False) -> int:
    """Remove what a previous run with this TUN name left behind (SIGKILL). keep_routes: leave the
    client routes and rules, whose kill switch blocks traffic until the daemon is back."""
    from .host import nat, routes, sysctl
    return nat.cleanup(tun_name) + (0 if keep_routes else routes.cleanup(tun_name)) + sysctl.cleanup(tun_name)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.node: Node | None = None
        self.tun: Tun | None = None
        self.udp: Underlay | None = None
        self.control: ControlServer | None = None
        self.watch: FileWatch | None = None
        self.client_routes = None
        self.route_monitor = None
        self.route_lookup = None
        self.notifier = Notifier()
        self.stop_requested = False
        self.reload_requested = False
        self.started = time.time()
        self.tun_write_errors = 0
        self.timers = Schedule()            # the daemon's own timers (the core has its own: Node.tick)
        self.resolver: Resolver | None = None
        self._names_moved = False           # set by the resolver's thread: a host name's address changed
        self._wake_w: socket.socket | None = None
        self._drop_summary = DropSummary()
        self._hook_env: dict[str, str] = {}
        # the socket filter against garbage floods (_check_flood)
        self._flood_guard = FloodGuard()
        self._filter_hosts: set[str] | None = None

    # ------------------------------------------------------------ setup / teardown
    def start(self, stack: contextlib.ExitStack) -> None:
        cfg = self.config
        now = time.time()
        # with the kill switch an earlier run's routes keep blocking until ours replace them (apply)
        removed = cleanup_leftovers(cfg.name, keep_routes=keeps_kill_switch(cfg))
        if removed:
            log.warning("undid %d changes (rules, routes, sysctls) left by an earlier run that did not stop cleanly",
                    removed)
        self.resolver = Resolver(self._on_names_moved)
        stack.callback(self.resolver.close)
        peers = read_secrets(cfg, at_start=True, resolver=self.resolver)
        codec = fec.codec_problem()
        if codec:
            raise StartError(codec)
        for warning in config_warnings(cfg):
            log.warning("%s", warning)
        net = TunnelNet(cfg.net, cfg.net6)
        self._hook_env = {"ALPACA_TUN": cfg.name, "ALPACA_ID": format_id(cfg.id), "ALPACA_MODE": cfg.mode,
                          "ALPACA_NET": str(net.network)}
        run_hooks("pre_up", cfg.pre_up_cmds, self._hook_env, fatal=True)
        # the commands of the config as it is at stop time: a reload may have changed them
        stack.callback(lambda: run_hooks("post_down", self.config.post_down_cmds, self._hook_env, False))

        # a client with a gateway follows the kernel's routing for what
        # leaves the tunnel net (policy routes may name another peer)
        self.node = Node(settings_from(cfg), peers, now,
                         asks_next_hops=cfg.mode == "client" and cfg.gateway is not None)
        self.udp = stack.enter_context(contextlib.closing(Underlay(cfg.listen, cfg.port)))
        if self.udp.problem:
            log.warning("%s", self.udp.problem)
        self._flood_guard = FloodGuard(self.udp.kernel_drops() or 0)
        if cfg.mode != "forwarder":
            address6 = net.address6(cfg.id)
            self.tun = stack.enter_context(contextlib.closing(Tun(cfg.name, cfg.mtu, str(net.address(cfg.id)),
                                                                  offload=cfg.offload,
                                                                  address6=address6 and str(address6))))
            if self.tun.ipv6_problem:
                log.warning("%s; the tunnel carries IPv4 only", self.tun.ipv6_problem)
            if self.tun.uso_problem:
                log.info("%s", self.tun.uso_problem)
        if cfg.mode == "server":
            ipv6 = self.tun.ipv6_problem is None and net.network6 is not None
            sysctl = Sysctl(cfg.name)
            stack.callback(sysctl.restore)
            sysctl.set(IP_FORWARD, "1")     # servers route between clients and out
            try:
                forwarding = not ipv6 or sysctl.forward_ipv6()
            except OSError as exc:          # e.g. a unit that leaves /proc/sys/net/ipv6 read-only
                forwarding = False
                log.warning("%s", exc)
            if not forwarding:
                log.warning("cannot turn on IPv6 forwarding (%s): IPv6 goes only between this server and "
                            "its clients", IPV6_FORWARDING)
            rules = server_nat(cfg, net, ipv6)
            stack.callback(rules.remove)
            rules.apply()
        if cfg.mode == "client" and cfg.gateway is not None:
            self._setup_client_routes(stack, peers, net)
        self.control = stack.enter_context(contextlib.closing(
            ControlServer(socket_path(cfg), self.handle_control, register=registry_path(cfg))))
        if self.control.register_error:
            log.warning("%s: `alpaca-tunnel status` finds this daemon only with -C", self.control.register_error)
        self.watch = FileWatch(cfg.secret_file)
        stack.callback(lambda: self.watch.close())      # the current one: a reload may replace it
        run_hooks("post_up", cfg.post_up_cmds, self._hook_env, fatal=True)
        stack.callback(lambda: run_hooks("pre_down", self.config.pre_down_cmds, self._hook_env, False))
        log.info("started: id %s, mode %s, %s, UDP %s, %d peers, control %s",
                 format_id(cfg.id), cfg.mode,
                 f"TUN {self.tun.name} {net.address(cfg.id)}/16" if self.tun else "no TUN",
                 " and ".join(self.udp.endpoints()), len(peers) - 1, socket_path(cfg))

    def _setup_client_routes(self, stack: contextlib.ExitStack, peers: dict[int, PeerEntry], net: TunnelNet) -> None:
        from .host import routes
        cfg = self.config
        for udp in self.udp.socks.values():
            routes.mark_socket(udp.sock, routes.FWMARK)
        self.client_routes = client_routes(cfg, peers, net, ipv6=self.tun.ipv6_problem is None)
        # only a requested stop (SIGTERM, SIGINT) lifts the kill switch; a failure leaves it blocking
        stack.callback(lambda: self.client_routes.remove(keep_kill_switch=not self.stop_requested))
        self.client_routes.apply(adopt_leftovers=keeps_kill_switch(cfg))
        self.route_lookup = stack.enter_context(contextlib.closing(RouteLookup(cfg.name)))
        self.route_monitor = stack.enter_context(contextlib.closing(RouteMonitor(
            ipv6=self.client_routes.ipv6 is not None)))

    def _on_names_moved(self) -> None:
        """(In the resolver's thread.) Wake the loop; it re-reads secrets.txt."""
        self._names_moved = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"r")
            except OSError:
                pass        # (a full pipe wakes the loop anyway)

    def _answer_next_hops(self, now: float) -> None:
        """docs/protocol.md §6: the core holds packets to destinations
        outside the tunnel net until it knows the peer the kernel's routing
        chose for them; ask the kernel (after the batch, never mid-packet)
        and send what was held."""
        answers = {}
        for dst in list(self.node.unresolved):
            gateway_ip = self.route_lookup.next_hop(dst) if self.route_lookup is not None else None
            answers[dst] = self.node.net.id_of(ipaddress.ip_address(gateway_ip).packed) if gateway_ip else None
        self._perform(self.node.learn_next_hops(answers, now))

    # ------------------------------------------------------------ signals, reload
    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    def reload_config(self) -> None:
        """SIGHUP: re-read config.json; apply what can change live."""
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            log.error("config reload refused: %s", str(e).replace("\n", "; "))
            return
        old = self.config
        changed = [f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)]
        live = [k for k in changed if k in LIVE_KEYS]
        restart = [k for k in changed if k not in LIVE_KEYS]
        if restart:
            log.warning("config changes that need a restart (not applied): %s", ", ".join(restart))
            new = dataclasses.replace(new, **{key: getattr(old, key) for key in restart})
        self.config = new
        if not live:
            return
        before = config_warnings(old)
        for warning in (w for w in config_warnings(new) if w not in before):
            log.warning("%s", warning)      # e.g. padding raised above mtu
        self.node.settings = settings_from(new)
        logging.getLogger().setLevel(new.log_level.upper())
        if "secret_file" in live:
            try:
                watch = FileWatch(new.secret_file)
            except OSError as e:
                log.error("cannot watch %s (%s); edits need a reload", new.secret_file, e.strerror or e)
            else:
                self._selector.unregister(self._watch_fd)
                self.watch.close()
                self.watch, self._watch_fd = watch, watch.fileno()
                self._selector.register(self._watch_fd, selectors.EVENT_READ, "watch")
        if self.client_routes is not None and {"local_routes", "chnroute"} & set(live):
            try:
                change = self.client_routes.update(local_routes=list(new.local_routes), chnroute=new.chnroute)
            except RouteError as e:
                change = f"routes not updated: {e}"
            if change:
                log.info("%s", change)
        log.info("config reloaded: %s", ", ".join(live))

    def reload_secrets(self) -> None:
        try:
            peers = read_secrets(self.config, at_start=False, resolver=self.resolver)
        except (StartError, ConfigError) as e:
            log.error("secrets reload refused, keeping the current peers: %s", str(e).replace("\n", "; "))
            return
        added, changed, removed = self.node.apply_peers(peers, time.time())
        if added or changed or removed:
            log.info("reloaded %s: %d added, %d changed, %d removed",
                     self.config.secret_file, len(added), len(changed), len(removed))
        if self.client_routes is not None:
            # a server's address may have changed: it must stay outside the tunnel
            change = self.client_routes.update(underlay_hosts=underlay_hosts(self.config, peers))
            if change:
                log.info("%s", change)

    # ------------------------------------------------------------ control socket, status
    def handle_control(self, request: dict) -> dict:
        if request["command"] != "status":
            raise ControlError(f"unknown command {request['command']!r}")
        now = time.time()
        status = self.node.snapshot(now)
        status.update({
            "name": self.config.name,
            "config": os.path.abspath(self.config.path),
            "control_socket": str(self.control.path) if self.control else None,
            "uptime": round(now - self.started, 1),
            "tun": self.tun.name if self.tun else None,
            "listen": ", ".join(self.udp.endpoints()),
            "net": "%d.%d" % self.config.net,
            "tun_write_errors": self.tun_write_errors,
            "udp_send_errors": self.udp.send_errors,
            "udp_kernel_drops": self.udp.kernel_drops(),
            "udp_socket_filter": self.udp.filtered,
        })
        for peer in status["peers"]:
            for path in peer["paths"]:
                # the local address this path's datagrams arrive on and our replies leave from
                host, port = path["address"].rsplit(":", 1)
                path["local"] = self.udp.reply_source((host.strip("[]"), int(port)))
        return status

    def status_line(self) -> str:
        peers = [p for p in self.node.table.peers.values() if p.id != self.config.id]
        up = sum(p.up for p in peers)
        rx = sum(p.rx_packets for p in peers)
        tx = sum(p.tx_packets for p in peers)
        return f"{up}/{len(peers)} peers up, rx {rx} tx {tx} packets"

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
        counts: dict[tuple[int | None, DropReason], int] = {(None, r): n for r, n in self.node.global_drops.items()}
        for peer in self.node.table.peers.values():
            counts.update({(peer.id, r): n for r, n in peer.drops.items()})
        for level, line in self._drop_summary.lines(counts):
            log.log(level, "%s", line)

    def _check_flood(self, now: float, elapsed: float) -> None:
        """A garbage flood turns the socket filter on (supervision.FloodGuard
        decides; host/udp.py filters): known peer addresses only, and 1 in
        UNKNOWN_ONE_IN of the rest. It follows the known addresses while on."""
        drops = self.udp.kernel_drops()
        if drops is None:
            return
        garbage = sum(self.node.global_drops[r] for r in UNAUTHENTICATED)
        verdict = self._flood_guard.check(now, elapsed, drops, garbage)
        if verdict.action == "start":
            self._filter_hosts = None
            self._refilter()
            if self.udp.filtered is None:
                what = f"more than {MAX_FILTER_ADDRESSES} known peer addresses: no socket filter"
            else:
                what = (f"the socket accepts only the {self.udp.filtered} known peer addresses "
                        f"and 1 in {UNKNOWN_ONE_IN} datagrams from elsewhere")
            log.warning("garbage flood: %d unauthenticated datagrams read and %d dropped by the kernel "
                        "in %.1f s; %s", verdict.garbage, verdict.kernel_drops, elapsed, what)
        elif verdict.action == "end":
            self.udp.filter_known(None)
            log.info("garbage flood over (fewer than %d kernel drops per %.1f s for %.0f s); socket filter removed",
                     FLOOD_MIN, FLOOD_CHECK_INTERVAL, FLOOD_HOLD)
        elif verdict.action == "hold":
            self._refilter()

    def _refilter(self) -> None:
        """Re-attach the filter when the known addresses changed (a new or
        roaming peer whose datagram got through, a reload)."""
        hosts = known_hosts(self.node)
        if hosts is None or hosts != self._filter_hosts:
            self._filter_hosts = hosts
            try:
                self.udp.filter_known(hosts)
            except OSError as e:         # the kernel refused the program: go on without it
                log.warning("cannot attach the socket filter: %s", e.strerror or e)
                self.udp.filter_known(None)

    def run(self) -> int:
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        self._wake_w = wake_w
        old_handlers = {s: signal.signal(s, self._on_signal) for s in sigs}
        try:
            with contextlib.ExitStack() as stack:
                try:
                    self.start(stack)
                except BaseException:
                    log.info("start aborted; undoing what was done")
                    raise
                self.notifier.ready(self.status_line())
                code = self._loop(wake_r)
                self.notifier.stopping()
                log.info("stopping")
            log.info("stopped")
            return code
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self._wake_w = None
            wake_r.close()
            wake_w.close()

    def _loop(self, wake_r: socket.socket) -> int:
        """Sleep until a descriptor is ready or the next deadline (the core's
        or one of the daemon's own, self.timers), then do what is due."""
        sel = self._selector = selectors.DefaultSelector()
        for fd in self.udp.fds:
            sel.register(fd, selectors.EVENT_READ, "udp")
        if self.tun is not None:
            sel.register(self.tun.fd, selectors.EVENT_READ, "tun")
        self.control.attach(sel, "control")
        self._watch_fd = self.watch.fileno()
        sel.register(self._watch_fd, selectors.EVENT_READ, "watch")
        if self.route_monitor is not None:
            sel.register(self.route_monitor.fileno(), selectors.EVENT_READ, "routes")
        sel.register(wake_r.fileno(), selectors.EVENT_READ, "wake")
        now = time.time()
        for name, interval in (("summary", DROP_SUMMARY_INTERVAL), ("status", STATUS_INTERVAL),
                               ("flood", FLOOD_CHECK_INTERVAL), ("resolve", RESOLVE_INTERVAL)):
            self.timers.every(name, interval, now)
        while not self.stop_requested:
            now = time.time()
            timeout = min(max(min(self.node.next_deadline(), self.timers.next_deadline()) - now, 0.0), MAX_SLEEP)
            if self.control.clients:
                timeout = min(timeout, max(self.control.next_deadline() - time.monotonic(), 0.0))
            for key, _ in sel.select(timeout):
                self._ready(key, wake_r)
            self._after_wakeup(time.time())
        sel.close()
        return 0

    def _ready(self, key: selectors.SelectorKey, wake_r: socket.socket) -> None:
        now = time.time()
        what = key.data
        if what == "udp":
            out = self.node.from_udp(self.udp.recv_batch(BATCH, key.fd, BATCH_BYTES), now)
            self.udp.confirm(out.heard)     # before the answers leave: they go from where it was sent to
            self._perform(out)
        elif what == "tun":
            self._perform(self.node.from_tun(self.tun.read_batch(BATCH, BATCH_BYTES), now))
            if self.node.unresolved:
                self._answer_next_hops(now)
        elif what == "control":
            self.control.serve_ready(key.fd)
        elif what == "watch":
            if self.watch.drain():
                self.timers.once("secrets", now + RELOAD_DEBOUNCE)     # editors write in several steps
        elif what == "routes":
            if self.route_monitor.drain():
                # lookups must see the change at once; the repair (which
                # compares every route of ours) waits until a burst of
                # changes (DHCP, NetworkManager) is over
                self.route_lookup.invalidate()
                self.node.forget_next_hops()
                self.timers.once("routes", now + ROUTES_DEBOUNCE)
        else:
            try:
                wake_r.recv(512)
            except BlockingIOError:
                pass

    def _after_wakeup(self, now: float) -> None:
        """Everything that is not a descriptor: expiries, the core's timers,
        signals, the resolver's news and the daemon's own timers."""
        if self.control.clients:
            self.control.expire()
        self.notifier.watchdog(now)
        if now >= self.node.next_deadline():
            self._perform(self.node.tick(now))
        if self.reload_requested:
            self.reload_requested = False
            self.notifier.reloading()
            self.reload_config()
            self.resolver.refresh_all()    # a reload also re-resolves host names (in the background)
            self.reload_secrets()
            self.notifier.ready(self.status_line())
        elif self._names_moved:
            self._names_moved = False
            self.reload_secrets()          # with the resolver's new answer
        if self.node.notices:
            self._log_notices()
        for name, elapsed in self.timers.take_due(now):
            if name == "secrets":
                self.reload_secrets()
            elif name == "routes":
                change = self.client_routes.reapply_if_needed()
                if change:
                    log.info("%s", change)
            elif name == "summary":
                self._log_drop_summary()
            elif name == "status":
                self.notifier.status(self.status_line())
            elif name == "flood":
                self._check_flood(now, elapsed)
            elif name == "resolve":
                self.resolver.refresh_all()    # in its thread: an answer that moved wakes us (_names_moved)


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (True when it cannot tell)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def run_daemon(config: Config) -> int:
    if not has_net_admin():
        # before anything else fails on it less clearly (iptables, TUN, routes)
        log.error("cannot start without CAP_NET_ADMIN: run alpaca-tunnel as root, "
                  "or grant it the capability as the systemd unit does")
        return 1
    try:
        return Daemon(config).run()
    except (StartError, TunError, UdpError, ControlError, ConfigError, HookError, NatError, RouteError,
            OSError) as e:
        for line in str(e).splitlines():
            log.error("%s", line)
        return 1
