"""Hosts in network namespaces joined by a bridge: the demo's and the tests' world.

Everything is built with pyroute2 (no `ip` shell-outs) and everything is
named with a per-run prefix, so two runs never collide and close() removes
exactly what this run made. Processes are started inside a namespace with
setns() in the child, and ended by PID.

    hub namespace  <prefix>-hub : bridge "br0"
    host namespace <prefix>-<name> : "eth0" (veth to the bridge), lo

The underlay is IPv4 (172.31.<subnet>.<n>/24), IPv6 (fd00:0:<subnet>::<n>/64,
without duplicate address detection, so it is usable at once) or both:
`families`.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

SUBNET = "172.31.{}.{}"
SUBNET6 = "fd00:0:{}::{}"
IFA_F_NODAD = 0x02              # linux/if_addr.h: no duplicate address detection
_prefixes = itertools.count()


def missing_for_lab() -> str | None:
    """Why this machine cannot run a Testbed with daemons, or None if it can."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def unique_prefix() -> str:
    """A Testbed prefix no other Testbed of this process or another one uses."""
    return f"at{os.getpid() % 100000}{next(_prefixes)}"


class Testbed:
    __test__ = False    # not a pytest test class
    def __init__(self, prefix: str | None = None, subnet: int = 77, families: tuple[str, ...] = ("4",)):
        self.prefix = prefix or f"at{os.getpid() % 100000}"
        self.subnet = subnet
        self.families = families
        self.hub = f"{self.prefix}-hub"
        self.hosts: dict[str, str] = {}          # name -> underlay IP (the IPv4 one, if it has one)
        self.hosts6: dict[str, str] = {}         # name -> underlay IPv6 address (families with "6")
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._ifcount = 0
        self._make_ns(self.hub)
        with NetNS(self.hub) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            ns.link("set", index=ns.link_lookup(ifname="br0")[0], state="up")

    # ------------------------------------------------------------ building
    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _make_ns(self, name: str) -> None:
        netns.create(name)
        self.namespaces.append(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    def add_host(self, name: str, host_number: int, segment: str | None = None) -> str:
        """A namespace with eth0 on the hub bridge; returns its underlay IP
        (IPv4, or IPv6 on an IPv6-only testbed)."""
        nsname = self.ns(name)
        if nsname not in self.namespaces:
            self._make_ns(nsname)
        self._ifcount += 1
        outer, inner = f"{self.prefix}v{self._ifcount}", f"{self.prefix}w{self._ifcount}"
        ip = SUBNET.format(self.subnet, host_number)
        ip6 = SUBNET6.format(self.subnet, host_number)
        with IPRoute() as ipr:
            ipr.link("add", ifname=outer, kind="veth", peer={"ifname": inner, "net_ns_fd": nsname})
            ipr.link("set", index=ipr.link_lookup(ifname=outer)[0], net_ns_fd=self.hub)
        with NetNS(self.hub) as hub:
            idx = hub.link_lookup(ifname=outer)[0]
            hub.link("set", index=idx, master=hub.link_lookup(ifname="br0")[0], state="up")
        with NetNS(nsname) as ns:
            idx = ns.link_lookup(ifname=inner)[0]
            ns.link("set", index=idx, ifname="eth0")
            if "4" in self.families:
                ns.addr("add", index=idx, address=ip, prefixlen=24)
            if "6" in self.families:
                add_address(ns, idx, ip6, 64)
                self.hosts6[name] = ip6
            ns.link("set", index=idx, state="up")
        self.hosts[name] = ip if "4" in self.families else ip6
        return self.hosts[name]

    def add_link(self, a: str, b: str, ip_a: str, ip_b: str, prefixlen: int = 24) -> None:
        """A point-to-point veth between two hosts (eth1, eth2, ... on each side)."""
        self._ifcount += 1
        names = {}
        for host in (a, b):
            if self.ns(host) not in self.namespaces:
                self._make_ns(self.ns(host))
            with NetNS(self.ns(host)) as ns:
                names[host] = f"eth{len([l for l in ns.get_links() if l.get_attr('IFLA_IFNAME').startswith('eth')])}"
        tmp_a, tmp_b = f"{self.prefix}x{self._ifcount}", f"{self.prefix}y{self._ifcount}"
        with IPRoute() as ipr:
            ipr.link("add", ifname=tmp_a, kind="veth", peer={"ifname": tmp_b, "net_ns_fd": self.ns(b)})
            ipr.link("set", index=ipr.link_lookup(ifname=tmp_a)[0], net_ns_fd=self.ns(a))
        for host, tmp, ip in ((a, tmp_a, ip_a), (b, tmp_b, ip_b)):
            with NetNS(self.ns(host)) as ns:
                idx = ns.link_lookup(ifname=tmp)[0]
                ns.link("set", index=idx, ifname=names[host])
                add_address(ns, idx, ip, prefixlen)
                ns.link("set", index=idx, state="up")

    # ------------------------------------------------------------ running
    def _enter(self, name: str):
        target = self.ns(name)

        def enter() -> None:
            netns.setns(target)
            os.setsid()
        return enter

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, preexec_fn=self._enter(name), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], timeout: float = 60, check: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(argv, preexec_fn=self._enter(name), timeout=timeout, check=check, **kwargs)

    def link_stats(self, name: str, ifname: str) -> dict:
        with NetNS(self.ns(name)) as ns:
            links = ns.get_links(ifname=ifname)
            if not links:
                return {}
            return dict(links[0].get_attr("IFLA_STATS64"))

    # ------------------------------------------------------------ teardown
    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc, signal.SIGKILL, timeout=5)
        for name in reversed(self.namespaces):
            try:
                netns.remove(name)
            except OSError:
                pass
        self.namespaces.clear()

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_address(ns, index: int, address: str, prefixlen: int) -> None:
    """An address on a link; an IPv6 one without duplicate address detection."""
    if ":" in address:
        ns.addr("add", index=index, address=address, prefixlen=prefixlen if prefixlen != 24 else 64,
                flags=IFA_F_NODAD)
    else:
        ns.addr("add", index=index, address=address, prefixlen=prefixlen)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    """Poll predicate until it returns something truthy; return it (or the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def write_peer_config(directory: Path, config: dict, secrets_lines: list[str]) -> Path:
    import json
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2))
    secrets = directory / "secrets.txt"
    secrets.write_text("\n".join(secrets_lines) + "\n")
    secrets.chmod(0o600)
    return path
