"""The tunnels under test, each started and stopped between the two namespaces: raw, wireguard-go, OpenVPN, alpaca."""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from common import (ALPACA_A, ALPACA_NET, ALPACA_PORT, IPT, IPT6, OVPN_A, OVPN_B, OVPN_PORT, ROOT, SPEEDER_FEC,
                    SPEEDER_LOCAL, SPEEDER_PORT, SPEEDER_WG_MTU, UNDER6_A, UNDER_A, WG_A, WG_B, WG_PORT)
from alpaca.lab.testbed import wait_for, write_peer_config
from topology import Pair


# ---------------------------------------------------------------- tunnels

class Tunnel:
    name = "?"
    dst = UNDER_A              # address of -a the traffic goes to
    udp_only = True            # loss rule matches tunnel datagrams only
    relay_ports: tuple | None = None   # WAN mode: WanPair.relay(port, a_port, b_port); None: cannot cross it
    multipath = False          # --paths 2 measures it (sends on both links); others are skipped
    relay_ports2: tuple | None = None  # WAN mode, --paths 2: the second relay's ports
    ipt = IPT                  # the loss rules' iptables: that of the underlay's address family

    def available(self) -> str | None:
        return None

    def state(self, pair: Pair) -> dict | None:
        """The daemons' own view (JSON), recorded when the tunnel is up and after the runs."""
        return None

    def check_alive(self) -> None:
        """After each condition: a daemon that died fails the tunnel (with its log) instead of
        letting every later run time out."""
        dead = {side: p.returncode for side, p in self.daemons.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"{self.name} daemon(s) exited {dead}: {self.log_tail()}")

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons: dict[str, object] = {}

    def stop(self, pair: Pair) -> None:
        for proc in self.daemons.values():
            pair.stop(proc, signal.SIGTERM, timeout=10)

    def versions(self) -> dict:
        return {}

    def log_tail(self) -> str:
        return ""


class Raw(Tunnel):
    name = "raw"
    udp_only = False           # TCP itself is on the lossy link

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons = {}


class WireguardGo(Tunnel):
    name = "wireguard-go"
    dst = WG_A
    mtu = 1420
    relay_ports = (WG_PORT, WG_PORT, WG_PORT)

    def available(self) -> str | None:
        missing = [b for b in ("wireguard-go", "wg") if shutil.which(b) is None]
        return f"not installed: {', '.join(missing)} (apt-get install wireguard-go wireguard-tools)" if missing else None

    def versions(self) -> dict:
        r = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True, check=False)
        return {"wireguard-go": (r.stdout.split("\n")[0] or r.stderr.strip()).strip()}

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons, self.work = {}, work
        self.ifname = {"a": f"{pair.prefix}wa", "b": f"{pair.prefix}wb"}   # sockets in /var/run/wireguard are global
        keys, pubs = {}, {}
        for side in ("a", "b"):
            key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
            keys[side] = work / f"wg-{side}.key"
            keys[side].touch(0o600)
            keys[side].write_text(key + "\n")
            pubs[side] = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True,
                                        check=True).stdout.strip()
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
        for side in ("a", "b"):
            self._sock(side).unlink(missing_ok=True)
            with open(work / f"wg-{side}.log", "wb") as logf:     # the child keeps its own copy
                self.daemons[side] = pair.popen(side, ["wireguard-go", "-f", self.ifname[side]], env=env,
                                                stdout=logf, stderr=logf)
        for side in ("a", "b"):
            if not wait_for(lambda side=side: self._sock(side).exists(), 10):
                raise RuntimeError(f"wireguard-go in {side} did not start: {self.log_tail()}")
        addr = {"a": WG_A, "b": WG_B}
        for side, other in (("a", "b"), ("b", "a")):
            dev = self.ifname[side]
            endpoint = self.endpoint(pair, side)
            pair.sh(side, ["wg", "set", dev, "listen-port", str(WG_PORT), "private-key", str(keys[side]),
                           "peer", pubs[other], "allowed-ips", f"{addr[other]}/32",
                           *(["endpoint", endpoint] if endpoint else [])])
            pair.sh(side, ["ip", "addr", "add", f"{addr[side]}/24", "dev", dev])
            pair.sh(side, ["ip", "link", "set", dev, "mtu", str(self.mtu), "up"])

    def endpoint(self, pair: Pair, side: str) -> str | None:
        """Where wireguard-go in `side` sends to (None: it learns the address from the handshake)."""
        return f"{pair.toward(side)}:{WG_PORT}"

    def stop(self, pair: Pair) -> None:
        super().stop(pair)
        for side in ("a", "b"):
            self._sock(side).unlink(missing_ok=True)

    def _sock(self, side: str) -> Path:
        return Path("/var/run/wireguard") / f"{self.ifname[side]}.sock"

    def log_tail(self) -> str:
        return " | ".join((self.work / f"wg-{s}.log").read_text(errors="replace")[-300:]
                          for s in ("a", "b") if (self.work / f"wg-{s}.log").exists())


class OpenVPN(Tunnel):
    """OpenVPN 2.6 point to point: UDP, a tun device,
    TLS with throw-away self-signed P-256 certificates pinned with peer-fingerprint (-a is the
    TLS server), data channel AES-256-GCM, DCO off (the userspace data path; the VM has no DCO
    module anyway), everything else OpenVPN's defaults (tun-mtu 1500, mssfix 1492). Each end's
    remote is toward(side): the other end, or in WAN mode the relay on its own link."""
    name = "openvpn"
    dst = OVPN_A
    relay_ports = (OVPN_PORT, OVPN_PORT, OVPN_PORT)

    def available(self) -> str | None:
        missing = [b for b in ("openvpn", "openssl") if shutil.which(b) is None]
        return f"not installed: {', '.join(missing)} (apt-get install openvpn openssl)" if missing else None

    def versions(self) -> dict:
        out = {}
        for tool, argv in (("openvpn", ["openvpn", "--version"]), ("openssl", ["openssl", "version"])):
            r = subprocess.run(argv, capture_output=True, text=True, check=False)
            out[tool] = (r.stdout.split("\n")[0] or r.stderr.strip()).strip()
        return out

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons, self.work = {}, work
        fingerprint = {}
        for side in ("a", "b"):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", str(work / f"ovpn-{side}.key"), "-out", str(work / f"ovpn-{side}.crt"),
                            "-days", "30", "-subj", f"/CN=bench-{side}"], capture_output=True, check=True)
            r = subprocess.run(["openssl", "x509", "-in", str(work / f"ovpn-{side}.crt"), "-noout", "-fingerprint",
                                "-sha256"], capture_output=True, text=True, check=True)
            fingerprint[side] = r.stdout.strip().split("=", 1)[1]
        addr = {"a": OVPN_A, "b": OVPN_B}
        for side, other in (("a", "b"), ("b", "a")):
            conf = work / f"ovpn-{side}.conf"
            conf.write_text("\n".join([
                f"dev ovpn{side}", "dev-type tun", "proto udp",
                f"local {pair.hosts[side]}", f"lport {OVPN_PORT}", f"remote {pair.toward(side)} {OVPN_PORT}",
                f"ifconfig {addr[side]} {addr[other]}",
                *(["tls-server", "dh none"] if side == "a" else ["tls-client"]),
                f"cert {work / f'ovpn-{side}.crt'}", f"key {work / f'ovpn-{side}.key'}",
                f"peer-fingerprint {fingerprint[other]}", "data-ciphers AES-256-GCM", "disable-dco", "verb 3", ""]))
            with open(work / f"ovpn-{side}.log", "wb") as logf:
                self.daemons[side] = pair.popen(side, ["openvpn", "--config", str(conf)], stdout=logf, stderr=logf)

        def ready(side: str) -> bool:
            log_text = (work / f"ovpn-{side}.log").read_text(errors="replace")
            return "Initialization Sequence Completed" in log_text or self.daemons[side].poll() is not None
        for side in ("a", "b"):
            if not wait_for(lambda side=side: ready(side), 30, 0.2) or self.daemons[side].poll() is not None:
                raise RuntimeError(f"openvpn in {side} did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        return " | ".join((self.work / f"ovpn-{s}.log").read_text(errors="replace")[-400:]
                          for s in ("a", "b") if (self.work / f"ovpn-{s}.log").exists())


class Alpaca(Tunnel):
    """alpaca-tunnel's daemon (python -m alpaca) at both ends: server 1.1 in -a, client 16.1 in -b.
    --paths 2: static addresses crossed between the links (see the module docstring)."""
    name = "alpaca"
    fec = "auto"               # config `fec` of both ends
    dst = ALPACA_A
    relay_ports = (ALPACA_PORT, ALPACA_PORT, None)     # the server learns the client's address
    multipath = True
    relay_ports2 = (ALPACA_PORT, ALPACA_PORT, ALPACA_PORT)   # -a sends first on link 2: both ends fixed

    def versions(self) -> dict:
        def git(*argv):
            r = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False)
            return r.stdout.strip() if r.returncode == 0 else None
        return {"alpaca-tunnel": git("rev-parse", "--short", "HEAD"),
                "alpaca-tunnel dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "python": platform.python_version()}

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons, self.work = {}, work
        keys = {i: secrets.token_urlsafe(32) for i in ("1.1", "16.1")}    # the format of `alpaca-tunnel genkey`
        lines = self.secrets_lines(pair, f"1.1 {keys['1.1']}", f"16.1 {keys['16.1']}")
        cfgs = {"a": {"id": "1.1", "mode": "server"},
                "b": {"id": "16.1", "mode": "client", "gateway": "1.1"}}
        self.config = {}
        for side, cfg in cfgs.items():
            path = self.config[side] = write_peer_config(work / f"alpaca-{side}", {
                **cfg, "group": "bench", "net": ALPACA_NET, "port": ALPACA_PORT, "log_level": "warning",
                "fec": self.fec,
                "control_socket": str(work / f"alpaca-{side}.sock")}, lines[side])
            with open(work / f"alpaca-{side}.log", "wb") as logf:
                self.daemons[side] = pair.popen(side, [sys.executable, "-m", "alpaca", "-C", str(path)],
                                                stdout=logf, stderr=logf, cwd=str(ROOT))
        for side in ("a", "b"):
            if not wait_for(lambda side=side: (self.work / f"alpaca-{side}.sock").exists()
                            or self.daemons[side].poll() is not None, 20) \
                    or self.daemons[side].poll() is not None:
                raise RuntimeError(f"alpaca in {side} did not start: {self.log_tail()}")

    def secrets_lines(self, pair: Pair, server: str, client: str) -> dict[str, list[str]]:
        """secrets.txt of -a and -b; `server`, `client`: "id key" of each."""
        if pair.paths == 1:
            # the client in -b reaches the server at toward("b"); a peer's own line gives only its key
            both = [f"{server} {pair.toward('b')} null {ALPACA_PORT}", f"{client} null null null"]
            return {"a": both, "b": both}
        # crossed: -b knows the server on link 1, -a knows the client on link 2; each end learns
        # the other link from the source of the other's datagrams, so both send on both links
        return {"a": [f"{server} null null null", f"{client} {pair.toward('a', 2)} null {ALPACA_PORT}"],
                "b": [f"{server} {pair.toward('b', 1)} null {ALPACA_PORT}", f"{client} null null null"]}

    def status(self, pair: Pair, side: str) -> dict:
        """`alpaca-tunnel -C <config> status --json` of the daemon in `side`."""
        r = pair.run(side, [sys.executable, "-m", "alpaca", "-C", str(self.config[side]), "status", "--json"],
                     timeout=15, cwd=str(ROOT))
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"error": (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}")[-300:]}

    def state(self, pair: Pair) -> dict:
        """Per end: the peer it talks to, as `status --json` has it (paths, loss, parity, drops...)."""
        out = {}
        for side in ("a", "b"):
            st = self.status(pair, side)
            out[side] = st if "error" in st else {k: st.get(k) for k in ("id", "mode", "peers", "drops", "udp_kernel_drops",
                                                                           "tun_write_errors")}
        return out

    @staticmethod
    def live_paths(state: dict, side: str, max_age: float = 5.0) -> list[str]:
        """Addresses of the paths on which `side` heard its peer within max_age seconds."""
        peers = (state.get(side) or {}).get("peers") or []
        return [p["address"] for peer in peers for p in peer.get("paths", [])
                if p.get("last_rx_age") is not None and p["last_rx_age"] <= max_age]

    def wait_paths(self, pair: Pair, n: int, timeout: float = 15) -> dict:
        """Wait until both ends list n live paths to each other (keepalives and pings flow meanwhile)."""
        last: dict = {}

        def ok() -> bool:
            nonlocal last
            pair.run("b", ["ping", "-c1", "-W1", "-q", self.dst])
            last = self.state(pair)
            return all(len(self.live_paths(last, s)) >= n for s in ("a", "b"))
        if not wait_for(ok, timeout, 0.5):
            raise RuntimeError(f"alpaca: not {n} live paths at both ends within {timeout:g} s: "
                               f"a {self.live_paths(last, 'a')}, b {self.live_paths(last, 'b')}")
        return last

    def log_tail(self) -> str:
        return " | ".join((self.work / f"alpaca-{s}.log").read_text(errors="replace")[-400:]
                          for s in ("a", "b") if (self.work / f"alpaca-{s}.log").exists())


class WgSpeeder(WireguardGo):
    """wireguard-go through UDPspeeder (FEC 20:10), the recipe users stack today:
    -b: wg -> SPEEDER_LOCAL speederv2 -c -> toward(b):SPEEDER_PORT; -a: speederv2 -s on
    UNDER_A:SPEEDER_PORT -> 127.0.0.1:WG_PORT wg (which learns its peer's address).
    WireGuard's MTU is lowered to 1280, as UDPspeeder's docs advise for a tunnel on top."""
    name = "wg-udpspeeder"
    mtu = SPEEDER_WG_MTU
    relay_ports = (SPEEDER_PORT, SPEEDER_PORT, None)   # the speeder client sends from an ephemeral port

    def available(self) -> str | None:
        if shutil.which("speederv2") is None:
            return "speederv2 (UDPspeeder) not on PATH; it is not packaged in Debian"
        return super().available()

    def versions(self) -> dict:
        try:
            r = subprocess.run(["speederv2", "-h"], capture_output=True, text=True, timeout=5, check=False)
            lines = [x.strip() for x in (r.stdout + r.stderr).splitlines() if "version" in x.lower()]
        except (OSError, subprocess.TimeoutExpired):
            lines = []
        return {**super().versions(), "speederv2": shutil.which("speederv2"),
                "speederv2 version": lines[0] if lines else None, "fec": SPEEDER_FEC}

    def endpoint(self, pair: Pair, side: str) -> str | None:
        return SPEEDER_LOCAL if side == "b" else None

    def start(self, pair: Pair, work: Path) -> None:
        self.work, key = work, secrets.token_hex(8)
        argv = {"a": ["-s", "-l", f"{UNDER_A}:{SPEEDER_PORT}", "-r", f"127.0.0.1:{WG_PORT}"],
                "b": ["-c", "-l", SPEEDER_LOCAL, "-r", f"{pair.toward('b')}:{SPEEDER_PORT}"]}
        speeders = {}
        for side in ("a", "b"):
            with open(work / f"speeder-{side}.log", "wb") as logf:
                speeders[f"speeder-{side}"] = pair.popen(side, ["speederv2", *argv[side], f"-f{SPEEDER_FEC}",
                                                                "-k", key], stdout=logf, stderr=logf)
        super().start(pair, work)
        self.daemons.update(speeders)

    def log_tail(self) -> str:
        return " | ".join([super().log_tail()] + [(self.work / f"speeder-{s}.log").read_text(errors="replace")[-300:]
                                                  for s in ("a", "b") if (self.work / f"speeder-{s}.log").exists()])


class AlpacaIpv6(Alpaca):
    """alpaca with the same settings over an IPv6 underlay: the client knows the server only by
    its ip6 column (UNDER6_A on link 1), so every datagram goes over IPv6 (UDP GSO and GRO on
    the IPv6 socket). Compared with "alpaca" (IPv4) of the same run; loss via ip6tables-legacy.
    No WAN mode (the relay is IPv4) and no --paths 2."""
    name, multipath, relay_ports, ipt = "alpaca-ipv6", False, None, IPT6

    def secrets_lines(self, pair: Pair, server: str, client: str) -> dict[str, list[str]]:
        both = [f"{server} null {UNDER6_A} {ALPACA_PORT}", f"{client} null null null"]
        return {"a": both, "b": both}


class AlpacaFecOff(Alpaca):
    """alpaca with `fec: "off"`: what FEC's adaptive mode costs on a clean link, and does on a lossy one."""
    name, fec, multipath = "alpaca-fec-off", "off", False


class AlpacaFec2010(Alpaca):
    """alpaca with a fixed `fec: "20:10"` (UDPspeeder's recipe): protected from the first packet."""
    name, fec, multipath = "alpaca-fec-20:10", "20:10", False


CLASSES = {"raw": Raw, "wireguard-go": WireguardGo, "openvpn": OpenVPN, "alpaca": Alpaca, "alpaca-ipv6": AlpacaIpv6,
           "alpaca-fec-off": AlpacaFecOff, "alpaca-fec-20:10": AlpacaFec2010, "wg-udpspeeder": WgSpeeder}
