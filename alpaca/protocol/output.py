"""What the core hands back to the daemon: datagrams to send and packets to write."""

from __future__ import annotations

from dataclasses import dataclass, field

from .peers import Addr


@dataclass
class Output:
    sends: list[tuple[bytes, Addr]] = field(default_factory=list)
    tun: list[bytes] = field(default_factory=list)
    # addresses a fresh authenticated datagram for us came from: only these
    # may teach the host anything (the local address to answer them from)
    heard: set[Addr] = field(default_factory=set)

    def extend(self, other: "Output") -> None:
        self.sends.extend(other.sends)
        self.tun.extend(other.tun)
        self.heard |= other.heard
