"""What every part of the benchmark shares: addresses, ports, the runs to make, logging."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


UNDER_A, UNDER_B = "172.30.1.1", "172.30.1.2"
UNDER2_A, UNDER2_B = "172.30.4.1", "172.30.4.2"     # --paths 2: the second link
UNDER6_A, UNDER6_B = "fd30:1::1", "fd30:1::2"       # IPv6 on link 1 (the alpaca-ipv6 tunnel's underlay)
RELAY_A, RELAY_B = "172.30.1.254", "172.30.3.254"   # WAN mode: the relay on a's link and on b's
WAN_B = "172.30.3.2"                                # WAN mode: b's underlay address
RELAY2_A, RELAY2_B = "172.30.4.254", "172.30.5.254"  # WAN mode, --paths 2: the second relay's addresses
WAN2_B = "172.30.5.2"                               # WAN mode, --paths 2: b's address on the second link
WG_A, WG_B = "172.30.2.1", "172.30.2.2"
OVPN_A, OVPN_B = "172.30.6.1", "172.30.6.2"
OVPN_PORT = 1194
ALPACA_NET = "10.17"
ALPACA_A, ALPACA_B = "10.17.1.1", "10.17.16.1"
ALPACA_PORT = 1040
WG_PORT = 51820
SPEEDER_PORT, SPEEDER_LOCAL = 4096, "127.0.0.1:3333"
SPEEDER_FEC, SPEEDER_WG_MTU = "20:10", 1280
IPERF_PORT = 5201
IPT = "iptables-legacy"
IPT6 = "ip6tables-legacy"
HZ = os.sysconf("SC_CLK_TCK")

OFFLOAD_TX = ["gso", "tso", "tx-udp-segmentation", "tx-gso-list"]
OFFLOAD_RX = ["gro", "rx-gro-list", "rx-udp-gro-forwarding"]
OFFLOAD_SHOW = ["generic-segmentation-offload", "tcp-segmentation-offload", "generic-receive-offload",
                "large-receive-offload", "tx-udp-segmentation", "tx-gso-list", "rx-gro-list",
                "rx-udp-gro-forwarding"]
CNT, BIG, DROP = "bench-loss-cnt", "bench-loss-big", "bench-loss-drop"

# (streams, direction, congestion control, ping under load)
CLEAN_RUNS = [(1, "b2a", "default", True), (1, "a2b", "default", False), (4, "b2a", "default", False),
              (4, "a2b", "default", False), (1, "b2a", "cubic", False)]
LOSS_RUNS = [(1, "b2a", "default", True), (1, "b2a", "cubic", False), (1, "a2b", "default", False)]
QUICK_RUNS = [(1, "b2a", "default", True)]
WAN_RUNS = [(1, "b2a", "default", True), (1, "b2a", "cubic", False)]
TUNNELS = ["raw", "wireguard-go", "openvpn", "alpaca", "alpaca-ipv6", "alpaca-fec-off", "alpaca-fec-20:10",
           "wg-udpspeeder"]
DUAL = "-2paths"              # suffix of a tunnel's --paths 2 entry in the results (e.g. "alpaca-2paths")
LABELS = {"wg-udpspeeder": f"wireguard-go over UDPspeeder {SPEEDER_FEC}", "alpaca" + DUAL: "alpaca 2 paths",
          "alpaca-ipv6": "alpaca over IPv6"}
LOSS = "0,0.01,0.05,0.3"      # default loss levels, low RTT and --wan alike
CAPACITY_RATES = [100, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 2000]   # Mbit/s
CAPACITY_LEN, CAPACITY_MAX_LOSS = 1400, 1.0   # datagram payload bytes; % lost that still counts as forwarded


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_key(streams: int, direction: str, cc: str) -> str:
    return f"{streams}x-{direction}-{cc}"
