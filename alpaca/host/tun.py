"""The TUN device: opened with python-pytun, configured with pyroute2 (docs/operations.md).

The device is not persistent: the kernel removes it when our file descriptor
closes, so even a SIGKILLed daemon leaves no TUN behind.

It is always opened with IFF_VNET_HDR: every read and write starts with a
10-byte struct virtio_net_hdr. With `offload` on, TUNSETOFFLOAD lets the
kernel hand us TCP super-packets of up to 64 KiB with the checksum left
partial (TSO4/TSO6 + CSUM), and UDP ones (USO4/USO6, Linux >= 6.2: the
datagrams of one UDP_SEGMENT write), and we write such super-packets back,
which the receiving kernel takes whole (local delivery) or segments itself
(forwarding). Without offloads the headers are all zero: one packet per
read, as a plain TUN. With offloads on, the UDP datagrams of one flow that
one batch of reads returns are joined into a UDP super-packet too, as GRO
would (gso.coalesce_udp). Writing super-packets is accepted either way, so
offloaded and plain peers interoperate (docs/protocol.md "Fragments");
a kernel that predates USO refuses UDP ones, so they are cut here (gso.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import pytun
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .gso import coalesce_udp, is_udp_gso, segment_udp

VNET_HDR_SIZE = 10
READ_SIZE = 65536 + VNET_HDR_SIZE
TUNSETOFFLOAD = 0x400454D0        # _IOW('T', 208, unsigned int)
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40     # Linux >= 6.2; both or neither
TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
USO = TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6
# Packets the kernel queues for us to read (the device's txqueuelen; the
# kernel's default is 500). A full queue drops what comes next, and a busy
# shared machine can keep one Python thread off the CPU for tens of ms:
# 500 datagrams is 25 ms of UDP at 200 Mbit/s (docs/benchmarks.md "UDP").
TX_QUEUE = 2000


class TunError(Exception):
    """The TUN device could not be set up; the message is one line."""


class TunGone(TunError):
    """The device went away under us (deleted by someone): the daemon must exit."""

    def __init__(self, name: str, error: OSError):
        super().__init__(f"TUN device {name!r} is gone ({error.strerror or error}); exiting")


# what a read/write on a TUN fd returns once its device was deleted
_DEVICE_GONE = {errno.EBADFD, errno.EIO, errno.ENXIO, errno.ENODEV}


class Tun:
    def __init__(self, name: str, mtu: int, address: str, prefixlen: int = 16, offload: bool = True,
                 address6: str | None = None):
        try:
            self.dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR)
        except pytun.Error as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            if code == errno.EPERM:
                raise TunError(f"cannot create TUN device {name!r}: permission denied (needs CAP_NET_ADMIN)") from None
            if code == errno.EBUSY:
                raise TunError(f"cannot create TUN device {name!r}: it exists and is in use") from None
            if not os.path.exists("/dev/net/tun"):
                raise TunError("cannot create TUN device: /dev/net/tun is missing (modprobe tun)") from None
            raise TunError(f"cannot create TUN device {name!r}: {e}") from None
        self.name = self.dev.name
        self.fd = self.dev.fileno()
        os.set_blocking(self.fd, False)
        self.offload = offload
        try:
            self.uso = self._set_offloads(offload)
        except OSError as e:
            self.close()
            raise TunError(f"cannot set offloads on TUN device {name!r}: {e.strerror}") from None
        # for the daemon's log (one line): what a kernel without USO costs
        self.uso_problem = None if self.uso else (
            f"this kernel has no UDP segmentation offload on TUN (USO, Linux >= 6.2): UDP super-packets "
            f"from peers are cut into datagrams in software before they are written to {self.name}")
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=self.name)[0]
                ipr.link("set", index=index, mtu=mtu, txqlen=TX_QUEUE)
                ipr.addr("replace", index=index, address=address, prefixlen=prefixlen)
                ipr.link("set", index=index, state="up")
        except (NetlinkError, OSError) as e:
            self.close()
            raise TunError(f"cannot configure TUN device {self.name!r}: {e}") from None
        # IPv6 is an addition: a host with IPv6 turned off keeps the IPv4 tunnel
        self.ipv6_problem = None
        if address6 is not None:
            try:
                with IPRoute() as ipr:
                    ipr.addr("replace", index=index, address=address6, prefixlen=64, family=socket.AF_INET6)
            except (NetlinkError, OSError) as e:
                self.ipv6_problem = f"no IPv6 address {address6}/64 on {self.name}: {e}"

    def _set_offloads(self, offload: bool) -> bool:
        """TSO (and USO where the kernel has it) when `offload`, else none;
        True when the kernel knows USO, so it takes UDP super-packets
        written to it (an older one refuses the flags with EINVAL)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TSO | USO)
            uso = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            uso = False
        if not offload or not uso:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TSO if offload else 0)
        return uso

    def read_batch(self, limit: int, budget: int = 1 << 30) -> list[bytes]:
        """Up to `limit` packets, fewer once `budget` bytes are read (a
        batch of super-packets is milliseconds of work: docs/design.md)."""
        packets = []
        read = os.read
        total = 0
        try:
            for _ in range(limit):
                packet = read(self.fd, READ_SIZE)
                packets.append(packet)
                total += len(packet)
                if total >= budget:
                    break
        except BlockingIOError:
            pass
        except OSError as e:
            raise TunGone(self.name, e) from None
        # the datagrams of one UDP flow in this read travel as one message (gso.py)
        return coalesce_udp(packets) if self.offload and len(packets) > 1 else packets

    def write_batch(self, packets: list[bytes]) -> int:
        """Write packets; returns how many the kernel refused (counted, not logged)."""
        failed = 0
        write = os.write
        for packet in packets:
            if not self.uso and is_udp_gso(packet):
                cut = segment_udp(packet)
                if cut is None:
                    failed += 1      # not a UDP super-packet we can cut: the kernel would refuse it too
                else:
                    failed += self.write_batch(cut)
                continue
            try:
                write(self.fd, packet)
            except (BlockingIOError, InterruptedError):
                failed += 1       # the TUN queue is full: the packet is lost, as on a wire
            except OSError as e:
                if e.errno in _DEVICE_GONE:
                    raise TunGone(self.name, e) from None
                failed += 1       # e.g. EINVAL for a malformed inner packet
        return failed

    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()
            self.dev = None
