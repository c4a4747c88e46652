"""Server NAT: the iptables rules a server (gateway) needs, tagged, idempotent, removable.

Why
---
A server forwards its clients' traffic to the internet. For that the kernel
must route between the TUN device and the uplink (ip_forward, set by
alpaca/host/sysctl.py, not here) and three kinds of packet-filter rules are needed:

* the clients' tunnel addresses are private, so packets leaving for the
  outside get the server's address (MASQUERADE);
* the FORWARD chain must let the clients' traffic out (and its replies back
  in) even when its policy is DROP, as on every Docker host, and must not
  let anyone else open connections into the tunnel: a VPN server does not
  open its clients to its LAN or to the internet;
* TCP connections through the tunnel must not negotiate segments bigger than
  the TUN device carries, or they stall whenever the path MTU discovery ICMP
  is lost (MSS clamping).

The exact rules, for TUN ``<tun>``, tunnel network ``<cidr>``, MTU ``<mtu>``
and the networks of config ``allow_inbound_from`` (none by default)
(iptables-save syntax; every rule carries the comment ``alpaca-tunnel:<tun>``)::

    *nat
    -A POSTROUTING -s <cidr> ! -d <cidr> -m comment --comment "alpaca-tunnel:<tun>" -j MASQUERADE
    *filter
    -A FORWARD -i <tun> -m comment --comment "alpaca-tunnel:<tun>" -j ACCEPT
    -A FORWARD -o <tun> -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "alpaca-tunnel:<tun>" -j ACCEPT
    -A FORWARD -s <allowed> -o <tun> -m comment --comment "alpaca-tunnel:<tun>" -j ACCEPT     (one per network)
    -A FORWARD -o <tun> -m comment --comment "alpaca-tunnel:<tun>" -j DROP
    *mangle
    -A FORWARD -i <tun> -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment "alpaca-tunnel:<tun>" -j TCPMSS --set-mss <mtu-40>
    -A FORWARD -o <tun> -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment "alpaca-tunnel:<tun>" -j TCPMSS --set-mss <mtu-40>

Where they go: the nat and mangle rules at the head of their chains (they
neither accept nor drop: MASQUERADE only rewrites, TCPMSS only clamps). The
filter rules go as one block at the END of FORWARD, or just before its first
unconditional DROP or REJECT rule (a chain that ends in a catch-all instead
of a policy). So every rule the administrator has in FORWARD when the daemon
starts comes first and wins: their DROP still drops tunnel traffic. From
inside the tunnel (``-i <tun>``: to the internet, the LAN, or another peer)
everything is let through; into it only replies, and new connections from
``allow_inbound_from``. The final DROP makes that hold when the FORWARD
policy is ACCEPT, too. A restart puts the block back at the end, after rules
added in the meantime.

MSS = MTU - 40: an IPv4 header (20 bytes, no options) plus a TCP header (20
bytes, no options) around the segment must fit in one TUN packet. A fixed
``--set-mss`` is used rather than ``--clamp-mss-to-pmtu``: the latter clamps
to the MTU of the *route* of the SYN, which for the outbound direction is the
uplink's (typically 1500), not the TUN's; the TUN MTU is what limits, and it
comes from the configuration, so the value follows ``mtu``. Both directions
are clamped (``-i`` and ``-o``) because either end may open the connection and
each SYN advertises the MSS its sender is willing to receive.

IPv6
----
With the tunnel's IPv6 network (``tunnel_cidr6``, config ``net6``) the same
rules go to the IPv6 tables (ip6tables-legacy-save shows them), for that /64
and the IPv6 networks of ``allow_inbound_from``, with MSS = MTU - 60 (a
40-byte IPv6 header). libxtables keeps one address family per process for
extensions that have both (see _in_family_process), so the IPv6 changes are
made by a short-lived python child running this module.

Tag and cleanup
---------------
The comment ``alpaca-tunnel:<tun>`` identifies the daemon instance (one
daemon per TUN name per network namespace). ``remove()`` and ``cleanup()``
delete every rule in the filter, nat and mangle tables whose comment is
exactly that tag, and nothing else: an identical rule without the comment,
or one tagged for another TUN, is left alone. ``cleanup()`` is what the next
start and ``alpaca-tunnel cleanup`` run after a SIGKILLed daemon.

Backend
-------
python-iptables talks to libiptc, i.e. the *legacy* (x_tables) ruleset. On a
Debian 12 host where ``iptables`` is the nf_tables front end, these rules are
visible with ``iptables-legacy-save`` / ``iptables-legacy -t nat -S``, not
with ``iptables -S`` or ``nft list ruleset``; see docs/operations.md.
Changes are made with autocommit off (one table replace per table) while
holding the xtables lock (``/run/xtables.lock``, or ``$XTABLES_LOCKFILE``),
the same lock ``iptables-legacy -w`` takes. This module never runs the
``iptables`` program.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TAG_PREFIX = "alpaca-tunnel:"
IPV4_TCP_HEADERS = 40          # 20 bytes IPv4 header + 20 bytes TCP header
IPV6_TCP_HEADERS = 60          # 40 bytes IPv6 header + 20 bytes TCP header
TABLES = ("mangle", "filter", "nat")   # the tables we use; also the commit order
XT_LOCK_PATH = "/run/xtables.lock"
LOCK_WAIT = 10.0               # seconds to wait for the xtables lock
_COMMIT_TRIES = 3              # a concurrent non-locking writer makes commit fail with EAGAIN
_STANDARD_TARGETS = ("ACCEPT", "DROP", "RETURN", "QUEUE", "")
_COMMENT_LEN = 256             # XT_MAX_COMMENT_LEN


class NatError(Exception):
    """Adding or removing the NAT rules failed; str() is one readable line.

    `partial` is True when some table had already been committed.
    """
    partial = False


def tag_for(tun_name: str) -> str:
    """The comment that marks the rules of the daemon using TUN `tun_name`."""
    _check_ifname(tun_name)
    return TAG_PREFIX + tun_name


def _check_ifname(name: str) -> None:
    # Kernel rules (dev_valid_name) plus: no trailing '+' (iptables would read
    # it as a wildcard) and no quote/backslash (keeps the tag printable as is).
    if (not isinstance(name, str) or not 0 < len(name) <= 15 or name in (".", "..")
            or any(c.isspace() or c in '/:"\\' for c in name) or name.endswith("+")):
        raise ValueError(f"not a usable TUN interface name: {name!r}")


@dataclass(frozen=True)
class RuleSpec:
    """One rule as text: `text` is the line iptables-legacy-save (for IPv6
    rules ip6tables-legacy-save) prints for it."""
    table: str
    chain: str
    text: str
    family: int = 4

    @property
    def command(self) -> str:
        """The program that lists this rule."""
        return "ip6tables-legacy" if self.family == 6 else "iptables-legacy"

    def __str__(self) -> str:
        return f"-t {self.table} {self.text}"


@dataclass(frozen=True)
class _Rule:
    """What python-iptables needs to build one of our rules."""
    table: str
    chain: str
    src: str | None = None
    dst: str | None = None           # may start with "!"
    in_iface: str | None = None
    out_iface: str | None = None
    syn_only_tcp: bool = False
    ctstate: str | None = None       # conntrack --ctstate
    target: str = "ACCEPT"
    set_mss: int | None = None
    family: int = 4

    def spec(self, tag: str) -> RuleSpec:
        parts = [f"-A {self.chain}"]
        if self.src:
            parts.append(f"-s {self.src}")
        if self.dst:
            parts.append(f"! -d {self.dst[1:]}" if self.dst.startswith("!") else f"-d {self.dst}")
        if self.in_iface:
            parts.append(f"-i {self.in_iface}")
        if self.out_iface:
            parts.append(f"-o {self.out_iface}")
        if self.syn_only_tcp:
            parts.append("-p tcp -m tcp --tcp-flags SYN,RST SYN")
        if self.ctstate:
            parts.append(f"-m conntrack --ctstate {self.ctstate}")
        parts.append(f'-m comment --comment "{tag}"')
        parts.append(f"-j {self.target}")
        if self.set_mss is not None:
            parts.append(f"--set-mss {self.set_mss}")
        return RuleSpec(self.table, self.chain, " ".join(parts), self.family)

    def build(self, iptc, tag: str):
        rule = iptc.Rule6() if self.family == 6 else iptc.Rule()
        if self.src:
            rule.src = self.src
        if self.dst:
            rule.dst = self.dst
        if self.in_iface:
            rule.in_interface = self.in_iface
        if self.out_iface:
            rule.out_interface = self.out_iface
        if self.syn_only_tcp:
            rule.protocol = "tcp"
            match = rule.create_match("tcp")
            match.tcp_flags = ["SYN,RST", "SYN"]
        if self.ctstate:
            match = rule.create_match("conntrack")
            match.ctstate = self.ctstate
        comment = rule.create_match("comment")
        comment.comment = tag
        target = rule.create_target(self.target)
        if self.set_mss is not None:
            target.set_mss = str(self.set_mss)
        # Let the extensions fill in their defaults now (MASQUERADE sets
        # rangesize=1 here), so the rule compares equal to its kernel copy.
        rule.final_check()
        return rule


class ServerNat:
    """The NAT/forward/MSS rules of one server instance (see the module docstring).

    `tunnel_cidr6`: the tunnel's IPv6 network (config `net6`), or None for a
    tunnel without IPv6; with it the same rules go to the IPv6 tables too.
    """

    def __init__(self, tun_name: str, tunnel_cidr: str, mtu: int, allow_inbound_from: tuple[str, ...] = (),
                 tunnel_cidr6: str | None = None):
        self.tun_name = tun_name
        self.tag = tag_for(tun_name)
        network = ipaddress.ip_network(tunnel_cidr, strict=False)
        if network.version != 4:
            raise ValueError(f"tunnel network must be IPv4: {tunnel_cidr}")
        self.network = network
        self.network6 = None
        if tunnel_cidr6 is not None:
            self.network6 = ipaddress.ip_network(tunnel_cidr6, strict=False)
            if self.network6.version != 6:
                raise ValueError(f"tunnel IPv6 network must be IPv6: {tunnel_cidr6}")
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
            raise ValueError(f"bad MTU: {mtu!r}")
        self.mtu = mtu
        self.mss = mtu - IPV4_TCP_HEADERS
        self.mss6 = mtu - IPV6_TCP_HEADERS
        inbound = tuple(ipaddress.ip_network(n, strict=True) for n in allow_inbound_from)
        if self.network6 is None:               # a tunnel without IPv6 has no IPv6 rules to add them to
            inbound = tuple(n for n in inbound if n.version == 4)
        self.allow_inbound_from = tuple(str(n) for n in inbound)
        self._rules = _family_rules(tun_name, 4, network, [n for n in inbound if n.version == 4], self.mss)
        if self.network6 is not None:
            self._rules += _family_rules(tun_name, 6, self.network6, [n for n in inbound if n.version == 6],
                                         self.mss6)
        self.families = tuple(dict.fromkeys(r.family for r in self._rules))

    def __repr__(self) -> str:
        return (f"ServerNat({self.tun_name!r}, {str(self.network)!r}, {self.mtu}, {self.allow_inbound_from!r}, "
                f"{self.network6 and str(self.network6)!r})")

    def rules(self) -> list[RuleSpec]:
        """The rules apply() installs, in order (for `alpaca-tunnel check`)."""
        return [r.spec(self.tag) for r in self._rules]

    def apply(self) -> int:
        """Install the rules; return how many were added.

        Idempotent: a rule already present (same spec, same tag) is kept, not
        added again. Tagged rules in our chains that are not (or no longer,
        e.g. after an MTU change) part of the spec, and duplicates, are
        removed: they can only be leftovers of this same instance. Missing
        nat and mangle rules are inserted at the head of their chain, in spec
        order. The filter rules are one ordered block (the DROP must come
        last): kept when it is there whole and in order, else put back whole
        at the end of FORWARD, before its first catch-all DROP/REJECT (module
        docstring). If a table cannot be committed, whatever was committed is
        removed again and NatError is raised.
        """
        done = 0
        added = 0
        try:
            for family in self.families:
                added += _in_family_process(family, "apply", [r for r in self._rules if r.family == family],
                                            self.tag)
                done += 1
        except NatError as exc:
            exc.partial = exc.partial or done > 0   # the IPv4 tables were committed before IPv6 failed
            if exc.partial:
                try:
                    self.remove()
                except NatError as undo:
                    log.warning("could not undo partially added rules: %s", undo)
            raise
        return added

    def remove(self) -> int:
        """Remove every rule with our tag (filter, nat, mangle; any chain; IPv4
        and IPv6); return the count."""
        return _remove_tagged(self.tag)

    def missing(self) -> list[RuleSpec]:
        """The rules of rules() that are not installed right now (read-only)."""
        return [spec for family in self.families
                for spec in _in_family_process(family, "missing", [r for r in self._rules if r.family == family],
                                               self.tag)]


def _apply_rules(rules: list[_Rule], tag: str) -> int:
    """ServerNat.apply() for the rules of one address family."""
    added = 0

    def change(iptc, tables) -> None:
        nonlocal added
        added = 0                               # (a retried transaction starts over)
        for (table_name, chain_name) in dict.fromkeys((r.table, r.chain) for r in rules):
            table = tables[table_name]
            chain = iptc.Chain(table, chain_name)
            wanted = [r.build(iptc, tag) for r in rules if (r.table, r.chain) == (table_name, chain_name)]
            if table_name == "filter":
                added += _place_block(table, chain, wanted, tag)
                continue
            found = [False] * len(wanted)
            stale = []                           # positions to delete
            for pos, entry in _entries(table, chain_name):
                if _comment_of(entry) != tag:
                    continue
                try:
                    existing = table.create_rule(entry, chain)
                except Exception:                # unparsable: certainly not ours as specified
                    stale.append(pos)
                    continue
                for i, want in enumerate(wanted):
                    if not found[i] and _same_rule(existing, want):
                        found[i] = True
                        break
                else:
                    stale.append(pos)
            for pos in reversed(stale):
                _delete_at(table, chain, pos)
            for i in reversed(range(len(wanted))):
                if not found[i]:
                    chain.insert_rule(wanted[i], 0)
                    added += 1

    _transaction(change, "add rules", family=rules[0].family)
    return added


def _missing_rules(rules: list[_Rule], tag: str) -> list[RuleSpec]:
    """ServerNat.missing() for the rules of one address family."""
    result: list[RuleSpec] = []

    def look(iptc, tables) -> None:
        result.clear()
        for r in rules:
            table = tables[r.table]
            chain = iptc.Chain(table, r.chain)
            want = r.build(iptc, tag)
            if not any(_comment_of(e) == tag and _parses_as(table, chain, e, want)
                       for _, e in _entries(table, r.chain)):
                result.append(r.spec(tag))

    _transaction(look, "read rules", commit=False, family=rules[0].family)
    return result


def _remove_family(tag: str, family: int) -> int:
    """Delete the rules tagged `tag` from every chain of our tables of one
    address family; returns how many. For IPv6 only the tables that exist
    are read (_existing_tables6)."""
    removed = 0
    names = TABLES if family == 4 else _existing_tables6()
    if not names:
        return 0

    def change(iptc, tables) -> None:
        nonlocal removed
        removed = 0
        for table in tables.values():
            for chain in table.chains:
                positions = [pos for pos, entry in _entries(table, chain.name) if _comment_of(entry) == tag]
                for pos in reversed(positions):
                    _delete_at(table, chain, pos)
                removed += len(positions)

    _transaction(change, "remove rules", family=family, names=names)
    return removed


_OPERATIONS = {"apply": _apply_rules, "missing": _missing_rules, "remove": _remove_family}


def _in_family_process(family: int, operation: str, *args):
    """Run _OPERATIONS[operation](*args): IPv4 in this process, IPv6 in a
    fresh python of its own.

    Why: libxtables registers an extension that has IPv4 and IPv6 variants
    (MASQUERADE, TCPMSS, conntrack) only for the address family in use when
    it first loads it, once per process; after IPv4 rules, python-iptables
    cannot build the IPv6 ones ("can't find target MASQUERADE"). So one
    process, one family: the daemon keeps IPv4, a short-lived child does
    IPv6. The child is this module again, not the ip6tables program.
    """
    if family == 4:
        return _OPERATIONS[operation](*args)
    request = {"operation": operation, "args": [[dataclasses.asdict(r) for r in a] if isinstance(a, list) else a
                                                 for a in args]}
    boot = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from alpaca.host.nat import _family_child; _family_child()")
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    try:
        done = subprocess.run([sys.executable, "-c", boot, package_root], input=json.dumps(request),
                              capture_output=True, text=True, timeout=LOCK_WAIT + 30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NatError(f"ip6tables (legacy) {operation} failed: the helper process: {exc}") from None
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise NatError(f"ip6tables (legacy) {operation} failed: the helper process exited with "
                       f"{done.returncode}: {last}") from None
    if "error" in answer:
        error = NatError(answer["error"])
        error.partial = answer["partial"]
        raise error
    result = answer["result"]
    return [RuleSpec(**spec) for spec in result] if operation == "missing" else result


def _family_child() -> None:
    """The IPv6 side of _in_family_process: one request on stdin, one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    args = [[_Rule(**r) for r in a] if isinstance(a, list) else a for a in request["args"]]
    try:
        result = _OPERATIONS[request["operation"]](*args)
        answer = {"result": [dataclasses.asdict(s) for s in result] if request["operation"] == "missing"
                  else result}
    except NatError as exc:
        answer = {"error": str(exc), "partial": exc.partial}
    print(json.dumps(answer), flush=True)


def _family_rules(tun_name: str, family: int, network, inbound: list, mss: int) -> list[_Rule]:
    """The rules of one address family (module docstring), in order."""
    net = str(network)
    return [
        _Rule("nat", "POSTROUTING", src=net, dst="!" + net, target="MASQUERADE", family=family),
        _Rule("filter", "FORWARD", in_iface=tun_name, family=family),
        _Rule("filter", "FORWARD", out_iface=tun_name, ctstate="RELATED,ESTABLISHED", family=family),
        *(_Rule("filter", "FORWARD", src=str(n), out_iface=tun_name, family=family) for n in inbound),
        _Rule("filter", "FORWARD", out_iface=tun_name, target="DROP", family=family),
        _Rule("mangle", "FORWARD", in_iface=tun_name, syn_only_tcp=True, target="TCPMSS", set_mss=mss,
              family=family),
        _Rule("mangle", "FORWARD", out_iface=tun_name, syn_only_tcp=True, target="TCPMSS", set_mss=mss,
              family=family),
    ]


def cleanup(tun_name: str) -> int:
    """Remove the leftovers of a previous (e.g. SIGKILLed) run using TUN `tun_name`.

    Deletes exactly the rules whose comment is tag_for(tun_name), in any chain
    of the filter, nat and mangle tables, IPv4 and IPv6; returns how many
    were deleted.
    """
    return _remove_tagged(tag_for(tun_name))


# ---------------------------------------------------------------- internals

def _place_block(table, chain, wanted: list, tag: str) -> int:
    """Our filter rules as one block, in order, after the administrator's
    rules: kept if they are there like that, else all removed and inserted
    again. Returns how many were inserted."""
    ours = [(pos, entry) for pos, entry in _entries(table, chain.name) if _comment_of(entry) == tag]
    positions = [pos for pos, _ in ours]
    if (len(ours) == len(wanted) and positions == list(range(positions[0], positions[0] + len(ours)))
            and all(_parses_as(table, chain, e, w) for (_, e), w in zip(ours, wanted))):
        return 0
    for pos in reversed(positions):
        _delete_at(table, chain, pos)
    at = next((pos for pos, entry in _entries(table, chain.name) if _catch_all(table, chain, entry)), None)
    for i, rule in enumerate(wanted):
        if at is None:
            chain.append_rule(rule)
        else:
            chain.insert_rule(rule, at + i)
    return len(wanted)


def _catch_all(table, chain, entry) -> bool:
    """An unconditional DROP or REJECT: what follows it is never reached."""
    try:
        rule = table.create_rule(entry, chain)
    except Exception:
        return False
    anywhere = ("0.0.0.0/0.0.0.0", "0.0.0.0/0", "::/0")
    return (rule.target.name in ("DROP", "REJECT") and not rule.matches and rule.src in anywhere
            and rule.dst in anywhere and not rule.in_interface and not rule.out_interface
            and rule.protocol in ("ip", "all", "0", None))


def _import_iptc():
    try:
        import iptc  # noqa: PLC0415 - imported lazily so rules() works without libiptc
        import iptc.ip4tc  # noqa: F401
        import iptc.ip6tc  # noqa: F401
    except Exception as exc:  # XTablesError/OSError when libip4tc or libxtables is missing
        raise NatError(f"python-iptables is unusable: {exc}") from None
    return iptc


def _remove_tagged(tag: str) -> int:
    removed = _in_family_process(4, "remove", tag, 4)
    if _existing_tables6():                     # (no helper process where there is nothing to look at)
        removed += _in_family_process(6, "remove", tag, 6)
    return removed


def _existing_tables6() -> tuple[str, ...]:
    """Those of our tables that exist among the IPv6 legacy tables of this
    network namespace. Removing rules looks only there, so that the cleanup
    every start runs does not create IPv6 tables on a host (or a client)
    that never had ours, nor fail where IPv6 is off."""
    try:
        with open("/proc/net/ip6_tables_names") as f:
            present = set(f.read().split())
    except OSError:
        return ()
    return tuple(name for name in TABLES if name in present)


def _entries(table, chain_name: str):
    """(position, raw ipt_entry) for each rule of a chain, straight from libiptc."""
    pos = 0
    entry = table.first_rule(chain_name)
    while entry:
        yield pos, entry
        pos += 1
        entry = table.next_rule(entry)


def _comment_of(entry) -> str | None:
    """The `-m comment` text of a raw ipt_entry, or None.

    Read from the entry bytes, not via python-iptables' match parsing, so that
    rules with matches whose userspace extension is missing, or with comments
    containing spaces or quotes, never confuse the search.
    """
    from iptc.ip4tc import xt_entry_match

    buf = ctypes.string_at(ctypes.addressof(entry), entry.target_offset)
    header = ctypes.sizeof(xt_entry_match)             # u16 size, char name[29], u8 revision
    off = ctypes.sizeof(type(entry))                   # ipt_entry or ip6t_entry
    while off + header <= len(buf):
        size = int.from_bytes(buf[off:off + 2], sys.byteorder)
        name = buf[off + 2:off + 31].split(b"\0", 1)[0]
        if name == b"comment":
            return buf[off + header:off + header + _COMMENT_LEN].split(b"\0", 1)[0].decode(errors="replace")
        if size <= 0:
            break
        off += size
    return None



def _same_rule(a, b) -> bool:
    """Same selector, same matches (in order, userspace data), same target."""
    from iptc.ip4tc import xt_entry_match

    header = ctypes.sizeof(xt_entry_match)
    if (a.src, a.dst, a.in_interface, a.out_interface, a.protocol) != \
            (b.src, b.dst, b.in_interface, b.out_interface, b.protocol):
        return False
    am, bm = a.matches, b.matches
    if len(am) != len(bm):
        return False
    for x, y in zip(am, bm):
        if x.name != y.name or bytes(x.match_buf[header:x.usersize]) != bytes(y.match_buf[header:y.usersize]):
            return False
    ta, tb = a.target, b.target
    if ta.name != tb.name:
        return False
    return ta.name in _STANDARD_TARGETS or ta == tb


def _parses_as(table, chain, entry, want) -> bool:
    try:
        return _same_rule(table.create_rule(entry, chain), want)
    except Exception:
        return False


def _delete_at(table, chain, pos: int) -> None:
    """Delete the rule at `pos` (0-based) of `chain` in the pending table state."""
    lib, handle = getattr(table, "_iptc", None), getattr(table, "_handle", None)
    if lib is not None and handle is not None and hasattr(lib, "iptc_delete_num_entry"):
        if lib.iptc_delete_num_entry(chain.name.encode(), pos, handle) != 1:
            from iptc.ip4tc import IPTCError
            raise IPTCError(f"can't delete rule {pos + 1} of {chain.name}: {table.strerror()}")
        return
    # python-iptables without those internals: delete by content (the entry is ours)
    entries = dict(_entries(table, chain.name))
    chain.delete_rule(table.create_rule(entries[pos], chain))


def _transaction(fn, what: str, commit: bool = True, family: int = 4, names: tuple[str, ...] = ()) -> None:
    """Run fn(iptc, {name: Table}) on fresh, non-autocommit tables of one
    address family (`names`, default TABLES), then commit them.

    Holds the xtables lock throughout. If the kernel refuses a commit because
    the table changed underneath (EAGAIN, a writer that ignores the lock), the
    whole thing is redone from a fresh read.
    """
    iptc = _import_iptc()
    from iptc.errors import XTablesError
    from iptc.ip4tc import IPTCError

    table_class = iptc.Table6 if family == 6 else iptc.Table
    names = names or TABLES
    current = "?"
    committed = 0
    with _xtables_lock(), _only_our_tables(table_class):
        for attempt in range(_COMMIT_TRIES):
            tables: dict = {}
            saved_autocommit: dict = {}
            try:
                for name in names:
                    current = name
                    table = table_class(name)
                    saved_autocommit[name] = table.autocommit
                    table.autocommit = False
                    table.refresh()                 # drop any stale cached state
                    tables[name] = table
                fn(iptc, tables)
                if commit:
                    for name in names:
                        current = name
                        tables[name].commit()
                        committed += 1
                return
            except IPTCError as exc:
                if (commit and not committed and "temporarily unavailable" in str(exc)
                        and attempt + 1 < _COMMIT_TRIES):
                    log.debug("iptables %s table changed during commit, retrying", current)
                    time.sleep(0.05 * (attempt + 1))
                    continue
                error = NatError(_explain(what, current, exc, family))
                error.partial = committed > 0
                raise error from None
            except (XTablesError, ValueError) as exc:
                raise NatError(_explain(what, current, exc, family)) from None
            finally:
                for name, table in tables.items():
                    try:
                        table.refresh()             # autocommit is off: discards, never commits
                    except Exception:
                        pass
                for name, value in saved_autocommit.items():
                    table_class(name).autocommit = value


@contextlib.contextmanager
def _only_our_tables(table_class):
    """Keep python-iptables from instantiating tables we do not use.

    Creating a Target (MASQUERADE, TCPMSS) makes python-iptables check whether
    the name is a chain in *every* table, which opens, and so creates in the
    kernel, the legacy raw and security tables too. Marking those as
    unavailable in its lookup cache avoids that side effect; our targets are
    never chain names anyway.
    """
    known = table_class.existing_table_names
    saved = dict(known)
    for name in table_class.ALL:
        if name not in TABLES:
            known.setdefault(name, False)
    try:
        yield
    finally:
        known.clear()
        known.update(saved)


def _explain(what: str, table: str, exc: Exception, family: int = 4) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    msg = re.sub(r"""\bb(['"])(.*?)\1""", r"\2", msg)       # libiptc strerror() comes back as bytes
    hint = ""
    low = msg.lower()
    if "insmod" in low or "does not exist" in low or "no chain/target/match" in low:
        hint = (" (kernel module missing? try: modprobe ip6_tables ip6table_nat ip6table_mangle xt_comment xt_TCPMSS)"
                if family == 6 else
                " (kernel module missing? try: modprobe ip_tables iptable_nat iptable_mangle xt_comment xt_TCPMSS)")
    elif "permission denied" in low or "not permitted" in low:
        hint = " (needs root / CAP_NET_ADMIN)"
    elif "can't find" in low or "couldn't load" in low:
        hint = " (iptables extension library missing; is the iptables package installed, XTABLES_LIBDIR?)"
    program = "ip6tables" if family == 6 else "iptables"
    return f"{program} (legacy) {what} failed in table {table}: {msg}{hint}"


@contextlib.contextmanager
def _xtables_lock(wait: float | None = None):
    """flock() the file iptables-legacy uses, so we never interleave with it."""
    path = os.environ.get("XTABLES_LOCKFILE") or XT_LOCK_PATH
    wait = LOCK_WAIT if wait is None else wait
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # libiptc itself does not need the lock; carry on rather than fail start-up
        hint = ""
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and path == XT_LOCK_PATH:
            # the units' ProtectSystem=strict: only an existing lock file is made writable
            hint = (" (under ProtectSystem=strict the unit needs ReadWritePaths=-/run/xtables.lock and the file "
                    "must exist before the start: systemd-tmpfiles --create alpaca-tunnel.conf)")
        log.warning("cannot open xtables lock %s (%s); changing rules without it%s", path,
                    exc.strerror or exc, hint)
        yield
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise NatError(f"another process has held the xtables lock {path} for {wait:g}s "
                                   "(a hanging iptables command or firewall manager?)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
