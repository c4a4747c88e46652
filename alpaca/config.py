"""config.json: find it, validate it, turn it into a typed Config (docs/configuration.md).

The daemon refuses to start on any problem in the config, so every problem is
reported at once, one line each, naming the file, the key path and what is
wrong in words an operator understands.  Types, ranges and enums come from
the JSON Schema shipped in alpaca/schema/; what a schema cannot say (reserved
IDs, gateway smaller than id, valid networks) is checked here.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
from jsonschema import Draft202012Validator

from alpaca.protocol.fec import AUTO, FEC_MAX
from alpaca.protocol.ids import IdError, format_id, group_prefix6, parse_id, parse_net

SCHEMA_PATH = Path(__file__).parent / "schema" / "config.schema.json"
RENAMED = {"parity": "fec"}     # keys of earlier versions
CHN_ORIGINAL = "original"      # chnroute.gateway: the original default gateway, followed as it changes

# Keys whose form (a.b / x.y) is checked by parse_id/parse_net, which give a
# better sentence than the schema's pattern.
_ID_KEYS = {"id", "gateway", "forwarders", "net", "virtual_net"}


class ConfigError(Exception):
    """The config (or a file it names) cannot be used; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def parse_fec(value: str) -> str | tuple[int, int] | None:
    """`fec` as config.json writes it (config syntax; the core takes the
    parsed policy): "auto" (follow the loss reports),
    "off" (None), or "K:M": M parity shards per K data shards, as
    UDPspeeder's -fK:M (a message of k shards gets ceil(k * M / K)).
    Raises ValueError with a sentence for anything else."""
    if value in (AUTO, "off"):
        return None if value == "off" else AUTO
    k, sep, m = str(value).partition(":")
    digits = sep and k.isascii() and m.isascii() and k.isdigit() and m.isdigit()
    if not (digits and 1 <= int(k) <= FEC_MAX and 0 <= int(m) <= FEC_MAX):
        raise ValueError(f'{value!r} is not "auto", "off" or "K:M" with K 1..{FEC_MAX} and M 0..{FEC_MAX} '
                         f'(e.g. "20:10")')
    return None if int(m) == 0 else (int(k), int(m))


@dataclass(frozen=True)
class ChnRoute:
    table: str | int
    gateway: str
    data: Path


@dataclass(frozen=True)
class Config:
    path: Path
    name: str
    mode: str
    group: str
    net: tuple[int, int]
    net6: bytes | None          # the IPv6 /64's first 8 bytes; None: no IPv6 in the tunnel
    id: int
    gateway: int | None
    forwarders: tuple[int, ...]
    port: int
    listen: str
    mtu: int
    log_level: str
    secret_file: Path
    chnroute: ChnRoute | None
    local_routes: tuple[str, ...]
    allow_inbound_from: tuple[str, ...]
    pre_up_cmds: tuple[str, ...]
    post_up_cmds: tuple[str, ...]
    pre_down_cmds: tuple[str, ...]
    post_down_cmds: tuple[str, ...]
    duplicate: int
    duplicate_delay_ms: int
    inactive_downward_static: bool
    virtual_net: tuple[int, int] | None
    padding: int
    control_socket: str | None
    offload: bool = True
    kill_switch: bool = True                        # client: block, not leak, while the daemon is dead
    block_ipv6: bool = True                         # client: IPv6 the tunnel does not carry is blocked, not leaked
    fec: str = "auto"                               # parity only where the receiver reports loss
    aead: str = "auto"                              # AES-256-GCM where both ends have it, else XChaCha20-Poly1305
    peers: tuple[tuple[int, str], ...] = ()         # per-peer settings: (peer ID, fec)
    # networks a peer may send from besides its tunnel address: (peer ID, CIDRs)
    peer_networks: tuple[tuple[int, tuple[str, ...]], ...] = ()

    @property
    def is_server(self) -> bool:
        return self.mode == "server"

    @property
    def has_tun(self) -> bool:
        return self.mode != "forwarder"

    @property
    def gateway_in_use(self) -> int | None:
        """The gateway the daemon uses: `gateway`, except a server's or forwarder's own
        id (a config copied from a client), which is ignored (config_warnings says so)."""
        return None if self.gateway == self.id and self.mode != "client" else self.gateway


def parse_net6(text: str, group: str) -> bytes | None:
    """Config `net6`: "auto" (from the group), "off", or a /64 prefix."""
    if text == "auto":
        return group_prefix6(group)
    if text == "off":
        return None
    try:
        network = ipaddress.IPv6Network(text)
    except ValueError:
        raise ValueError(f"{text!r} is not 'auto', 'off' or an IPv6 prefix like 'fd12:3456:789a::/64'") from None
    if network.prefixlen != 64:
        raise ValueError(f"{text!r} is a /{network.prefixlen}; the tunnel's IPv6 prefix is a /64")
    return network.network_address.packed[:8]


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_defaults() -> dict:
    """The default of every optional top-level key, as written in the schema."""
    return {k: v["default"] for k, v in load_schema()["properties"].items() if "default" in v}


def _strict_int(checker, instance) -> bool:
    # JSON Schema counts 1400.0 as an integer; a port or MTU must be written as one.
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_int),
)


# ---------------------------------------------------------------- messages

_TYPE_NAMES = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


def _key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(value) -> str:
    """A value as the operator wrote it: strings quoted, others as JSON, kept short."""
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    return "a list" if isinstance(value, list) else "an object"


def _schema_problems(error) -> list[tuple[str, str]]:
    """(key path, sentence) pairs for one jsonschema error; [] when a semantic check covers it."""
    parts = list(error.absolute_path)
    path = _key_path(parts)
    value, schema, kind = error.instance, error.schema, error.validator

    if kind == "additionalProperties":
        known = list(schema.get("properties", {}))
        out = []
        for key in sorted(set(value) - set(known)):
            hint = [RENAMED[key]] if key in RENAMED and not path else difflib.get_close_matches(key, known, n=1)
            text = f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            out.append((path, text))
        return out
    if kind == "required":
        return [(_key_path(parts + [k]), "required key is missing")
                for k in schema["required"] if k not in value]
    if kind == "type":
        types = error.validator_value
        types = [types] if isinstance(types, str) else types
        expected = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
        return [(path, f"expected {expected}, got {_describe(value)}")]
    if kind == "enum":
        options = ", ".join(_show(o) for o in error.validator_value)
        return [(path, f"{_show(value)} is not one of {options}")]
    if kind in ("minimum", "maximum"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and hi is not None:
            return [(path, f"{value} is out of range: it must be between {lo} and {hi}")]
        return [(path, f"{value} is out of range: it must be at least {lo}" if lo is not None
                 else f"{value} is out of range: it must be at most {hi}")]
    if kind == "minLength":
        if error.validator_value == 1:
            return [(path, "must not be empty")]
        return [(path, f"{_show(value)} is too short: at least {error.validator_value} characters are needed")]
    if kind == "maxLength":
        return [(path, f"{_show(value)} is too long: at most {error.validator_value} characters are allowed")]
    if kind == "uniqueItems":
        seen, dups = set(), []
        for item in value:
            key = json.dumps(item, sort_keys=True)
            if key in seen and item not in dups:
                dups.append(item)
            seen.add(key)
        return [(path, f"{_show(d)} is listed more than once") for d in dups]
    if kind == "pattern":
        if parts and parts[0] in _ID_KEYS:
            return []
        if parts == ["name"]:
            return [(path, f"{_show(value)} is not a usable interface name: "
                           "use only letters, digits, '_', '.' and '-'")]
        return [(path, f"{_show(value)} does not have the expected form")]
    return [(path, " ".join(error.message.split()))]  # fallback, kept on one line


def _path_sort_key(error):
    return [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in error.absolute_path]


def _semantic_problems(data: dict) -> list[tuple[str, str]]:
    """What the schema cannot check: ID rules, nets and addresses."""
    check = _Semantics(data)
    check.ids()
    check.addresses()
    check.fec_and_peers()
    return check.out


class _Semantics:
    """The checks of _semantic_problems, a section each; problems collect in
    `out` as (key, message). A value of the wrong type is skipped: the schema
    has reported it."""

    def __init__(self, data: dict):
        self.data = data
        self.out: list[tuple[str, str]] = []
        self.my_id = self.peer_id("id", data.get("id"))

    def peer_id(self, key: str, text) -> int | None:
        if not isinstance(text, str):
            return None
        try:
            return parse_id(text)
        except IdError as e:
            self.out.append((key, str(e)))
            return None

    def ids(self) -> None:
        data, out, my_id = self.data, self.out, self.my_id
        gateway = self.peer_id("gateway", data.get("gateway"))
        if gateway is not None and my_id is not None:
            if gateway == my_id:
                # a server's or forwarder's own id (a config copied from a client) is ignored, with
                # a warning (config_warnings), as WireGuard ignores a peer with the device's own key
                if data.get("mode", "client") == "client":
                    out.append(("gateway", f"gateway {data['gateway']!r} is this client's own id: "
                                           "name a server, a smaller ID such as '1.1'"))
            elif gateway > my_id:
                out.append(("gateway", f"gateway {data['gateway']!r} is not a server: it must be "
                                       f"a smaller ID than this peer's id {data.get('id')!r}"))
        if data.get("mode", "client") == "client" and data.get("gateway") is None:
            out.append(("gateway", "client mode needs a gateway: the ID of a server, e.g. '1.1'"))
        forwarders = data.get("forwarders")
        if isinstance(forwarders, list):
            seen: dict[int, int] = {}
            for i, text in enumerate(forwarders):
                fid = self.peer_id(f"forwarders[{i}]", text)
                if fid is None:
                    continue
                if fid == my_id:
                    out.append((f"forwarders[{i}]", f"{text!r} is this peer's own id"))
                elif fid in seen and forwarders[seen[fid]] != text:  # same text: uniqueItems says so
                    out.append((f"forwarders[{i}]", f"{text!r} is the same peer as "
                                                    f"forwarders[{seen[fid]}] ({format_id(fid)})"))
                seen.setdefault(fid, i)

    def addresses(self) -> None:
        data, out = self.data, self.out
        for key in ("net", "virtual_net"):
            if isinstance(data.get(key), str):
                try:
                    parse_net(data[key])
                except IdError as e:
                    out.append((key, str(e)))
        listen = data.get("listen")
        if isinstance(listen, str) and listen:
            try:
                ipaddress.ip_address(listen)
            except ValueError:
                out.append(("listen", f"{listen!r} is not an IP address "
                                      "(use 0.0.0.0 for all IPv4 addresses or :: for all IPv6 addresses)"))
        net6 = data.get("net6")
        if isinstance(net6, str) and net6 not in ("auto", "off"):
            try:
                parse_net6(net6, "")
            except ValueError as e:
                out.append(("net6", str(e)))
        self.local_networks("local_routes")
        self.ip_networks("allow_inbound_from", net6_off=data.get("net6") == "off")
        chn = data.get("chnroute")
        if isinstance(chn, dict) and isinstance(chn.get("gateway"), str) and chn["gateway"] != CHN_ORIGINAL:
            try:
                if ipaddress.ip_address(chn["gateway"]).is_link_local:     # a route via one needs a device
                    out.append(("chnroute.gateway", f"{chn['gateway']!r} is a link-local address: "
                                                    f'use "{CHN_ORIGINAL}" (the router the IPv6 default route names)'))
            except ValueError:
                out.append(("chnroute.gateway", f"{chn['gateway']!r} is neither an IP address nor "
                                                f'"{CHN_ORIGINAL}" (follow the original default gateway)'))

    def _networks(self, key: str, strict: bool, hint: str = ""):
        """(path, text, network) for each entry of the list `key` that is a
        network; an entry that is not gets one line (`hint` after the example)."""
        texts = self.data.get(key)
        for i, text in enumerate(texts if isinstance(texts, list) else ()):
            if isinstance(text, str):
                try:
                    network = ipaddress.ip_network(text, strict=strict)
                except ValueError:
                    self.out.append((f"{key}[{i}]", f"{text!r} is not a network like 192.168.1.0/24 "
                                                    f"or 2001:db8:1::/64{hint}"))
                    continue
                yield f"{key}[{i}]", text, network

    def local_networks(self, key: str) -> None:
        """IPv4 or IPv6 networks, host bits allowed, not a default route."""
        for path, text, network in self._networks(key, strict=False):
            if network.prefixlen == 0:
                self.out.append((path, f"{text!r} would be a second default route"))

    def ip_networks(self, key: str, net6_off: bool) -> None:
        """IPv4 or IPv6 networks, host bits zero; IPv6 ones only with an IPv6 tunnel."""
        for path, text, network in self._networks(key, strict=True, hint=" (host bits must be zero)"):
            if network.version == 6 and net6_off:
                self.out.append((path, f"{text!r} is an IPv6 network, but net6 is \"off\""))

    def fec(self, key: str, text) -> None:
        if isinstance(text, str):
            try:
                parse_fec(text)
            except ValueError as e:
                self.out.append((key, str(e)))

    def fec_and_peers(self) -> None:
        self.fec("fec", self.data.get("fec"))
        peers = self.data.get("peers")
        if not isinstance(peers, dict):
            return
        for text, entry in peers.items():
            if self.peer_id(f"peers.{text}", text) == self.my_id and self.my_id is not None:
                self.out.append((f"peers.{text}", "this is this peer's own id"))
            if not isinstance(entry, dict):
                continue
            self.fec(f"peers.{text}.fec", entry.get("fec"))
            for i, net in enumerate(entry.get("networks") or ()):
                if isinstance(net, str):
                    try:
                        ipaddress.ip_network(net, strict=True)
                    except ValueError:
                        self.out.append((f"peers.{text}.networks[{i}]",
                                         f"{net!r} is not a network like 192.168.5.0/24 or 2001:db8:5::/48 "
                                         f"(host bits must be zero)"))


def validate_config(data: object, source: str = "config.json") -> list[str]:
    """Every problem in a parsed config.json, one line each: '<source>: <key path>: <sentence>'."""
    if not isinstance(data, dict):
        return [f"{source}: the file must hold a JSON object ({{...}}) at the top level, "
                f"not {_describe(data)}"]
    pairs: list[tuple[str, str]] = []
    for error in sorted(_Validator(load_schema()).iter_errors(data), key=_path_sort_key):
        pairs.extend(_schema_problems(error))
    pairs.extend(_semantic_problems(data))
    lines: list[str] = []
    for path, text in pairs:
        line = f"{source}: {path}: {text}" if path else f"{source}: {text}"
        if line not in lines:
            lines.append(line)
    return lines


# ---------------------------------------------------------------- loading

def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid JSON: the file is not UTF-8 text"]) from None

    duplicates: list[str] = []

    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                duplicates.append(key)
            obj[key] = value
        return obj

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError([f"{path}: line {e.lineno} column {e.colno}: not valid JSON: {e.msg}"]) from None
    if duplicates:
        raise ConfigError([f"{path}: key {k!r} appears more than once; keep only one" for k in duplicates])
    return data


def load_config(path: str | Path) -> Config:
    """Read, validate and type the config; raise ConfigError listing every problem."""
    path = Path(path)
    data = _read_json(path)
    problems = validate_config(data, str(path))
    if problems:
        raise ConfigError(problems)

    d = {**schema_defaults(), **data}
    base = path.absolute().parent  # relative paths are relative to config.json, never the executable
    chn = d["chnroute"]
    return Config(
        path=path,
        name=d["name"],
        mode=d["mode"],
        group=d["group"],
        net=parse_net(d["net"]),
        net6=parse_net6(d["net6"], d["group"]),
        id=parse_id(d["id"]),
        gateway=None if d["gateway"] is None else parse_id(d["gateway"]),
        forwarders=tuple(parse_id(f) for f in d["forwarders"]),
        port=d["port"],
        listen=d["listen"],
        mtu=d["mtu"],
        log_level=d["log_level"],
        secret_file=base / d["secret_file"],
        chnroute=None if chn is None else ChnRoute(chn["table"], chn["gateway"], base / chn["data"]),
        local_routes=tuple(d["local_routes"]),
        allow_inbound_from=tuple(d["allow_inbound_from"]),
        pre_up_cmds=tuple(d["pre_up_cmds"]),
        post_up_cmds=tuple(d["post_up_cmds"]),
        pre_down_cmds=tuple(d["pre_down_cmds"]),
        post_down_cmds=tuple(d["post_down_cmds"]),
        duplicate=d["duplicate"],
        duplicate_delay_ms=d["duplicate_delay_ms"],
        inactive_downward_static=d["inactive_downward_static"],
        virtual_net=None if d["virtual_net"] is None else parse_net(d["virtual_net"]),
        padding=d["padding"],
        control_socket=d["control_socket"],
        offload=d["offload"],
        kill_switch=d["kill_switch"],
        block_ipv6=d["block_ipv6"],
        fec=d["fec"],
        aead=d["aead"],
        peers=tuple(sorted((parse_id(k), v["fec"]) for k, v in d["peers"].items() if "fec" in v)),
        peer_networks=tuple(sorted((parse_id(k), tuple(v["networks"])) for k, v in d["peers"].items()
                                   if v.get("networks"))),
    )


def config_warnings(config: Config) -> list[str]:
    """What is allowed but worth changing, one line each: the daemon logs these at
    start and `alpaca-tunnel check` prints them."""
    out = []
    if config.group == schema_defaults()["group"]:
        # every datagram is authenticated by a pair key whatever the group; the group
        # name only hides the headers, so a guessable one is a privacy loss, not a hole
        out.append(f'{config.path}: group is "{config.group}": anyone who guesses it can read the peer IDs '
                   "and timing in packet headers (not their contents); set a group name of your own")
    if config.virtual_net is not None:
        out.append(f"{config.path}: virtual_net is accepted for compatibility but has no effect yet")
    if config.gateway is not None and config.gateway_in_use is None:
        out.append(f"{config.path}: gateway {format_id(config.gateway)!r} is this {config.mode}'s own id "
                   f"(a config copied from a client?): ignored; remove it, or name another server")
    if config.padding > config.mtu:
        # a full-size packet makes a datagram of mtu + OVERHEAD; padding past mtu makes
        # every datagram bigger than that, so a path sized for mtu fragments all of them
        out.append(f"{config.path}: padding {config.padding} is above mtu {config.mtu}: every datagram grows "
                   f"past the largest a packet makes and is fragmented where mtu fits the path; "
                   f"set padding to {config.mtu} or less")
    return out


def default_config_path(executable: str) -> Path:
    """Where config.json is when no -C is given (docs/configuration.md "Where config.json is found"), from the executable's location."""
    here = Path(os.path.abspath(executable)).parent
    real = Path(os.path.realpath(here))  # /bin -> /usr/bin on merged-/usr systems
    if real in (Path("/usr/bin"), Path("/usr/sbin")):
        return Path("/etc/alpaca-tunnel.d/config.json")
    if real in (Path("/usr/local/bin"), Path("/usr/local/sbin")):
        return Path("/usr/local/etc/alpaca-tunnel.d/config.json")
    return here / "alpaca-tunnel.d" / "config.json"
