"""config.json validation: every class of error gives one exact, one-line message."""

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from alpaca.config import (ChnRoute, ConfigError, SCHEMA_PATH, config_warnings, default_config_path,
                           load_config, load_schema, schema_defaults, validate_config)

GOOD = {"id": "16.1", "gateway": "1.1"}


def problems(**changes):
    return validate_config({**GOOD, **changes})


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_schema_is_valid_and_documented():
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for key, prop in schema["properties"].items():
        assert prop.get("description"), key
        assert key == "id" or "default" in prop, key
    assert schema["required"] == ["id"]


def test_good_config_has_no_problems():
    assert problems() == []


def test_unknown_key_with_suggestion():
    assert problems(forwarder=[]) == ["config.json: unknown key 'forwarder' (did you mean 'forwarders'?)"]


def test_unknown_key_without_suggestion():
    assert problems(zzz=1) == ["config.json: unknown key 'zzz'"]


def test_unknown_nested_key():
    chn = {"table": 100, "gateway": "192.168.1.1", "data": "chnroute.txt", "tabel": 1}
    assert problems(chnroute=chn) == ["config.json: chnroute: unknown key 'tabel' (did you mean 'table'?)"]


def test_wrong_type():
    assert problems(port="1040") == ["config.json: port: expected a whole number, got the string '1040'"]
    assert problems(inactive_downward_static="yes") == [
        "config.json: inactive_downward_static: expected true or false, got the string 'yes'"]


def test_float_is_not_an_integer():
    assert problems(mtu=1400.0) == ["config.json: mtu: expected a whole number, got the number 1400.0"]


def test_enum():
    assert problems(mode="sever") == [
        "config.json: mode: 'sever' is not one of 'server', 'client', 'forwarder'"]


def test_port_out_of_range():
    assert problems(port=70000) == ["config.json: port: 70000 is out of range: it must be between 1 and 65535"]


def test_missing_id():
    assert validate_config({"gateway": "1.1"}) == ["config.json: id: required key is missing"]


def test_reserved_id():
    assert problems(id="0.1", gateway=None, mode="server") == [
        "config.json: id: peer ID '0.1' is reserved (0.0, 0.1 and 255.255 cannot be used)"]


def test_reserved_forwarder():
    assert problems(forwarders=["1.2", "0.1"]) == [
        "config.json: forwarders[1]: peer ID '0.1' is reserved (0.0, 0.1 and 255.255 cannot be used)"]


def test_malformed_id():
    assert problems(id="16-1") == ["config.json: id: peer ID '16-1' is not of the form a.b (e.g. 16.1)"]


def test_id_part_above_255():
    assert problems(id="16.256") == ["config.json: id: peer ID '16.256' has a part above 255"]


def test_net_octet_above_255():
    assert problems(net="10.300") == ["config.json: net: net '10.300' has an octet above 255"]


def test_net6_is_auto_off_or_a_64():
    assert problems(net6="auto") == [] and problems(net6="off") == [] and problems(net6="fd12:3456:789a::/64") == []
    assert problems(net6="fd12::/48") == ["config.json: net6: 'fd12::/48' is a /48; the tunnel's IPv6 prefix is a /64"]
    assert problems(net6="10.17") == ["config.json: net6: '10.17' is not 'auto', 'off' or an IPv6 prefix "
                                      "like 'fd12:3456:789a::/64'"]


def test_net6_auto_is_a_unique_local_prefix_of_the_group(tmp_path):
    from alpaca.protocol.ids import TunnelNet, group_prefix6
    one, other = group_prefix6("office"), group_prefix6("home")
    assert one[0] == 0xFD and one[6:] == b"\0\0" and one != other
    cfg = load_config(write(tmp_path, {**GOOD, "group": "office"}))
    assert cfg.net6 == one
    net = TunnelNet(cfg.net, cfg.net6)
    # peer a.b is <prefix>::a:b, the ID's decimal octets read as hex digits
    address = net.address6(cfg.id)
    assert str(address).endswith("::16:1") and net.id_of(address.packed) == cfg.id
    assert all(net.id_of(net.address6(i).packed) == i for i in (0x0102, 0xFFFE, 0x1001, 0x0A0B))
    assert net.id_of(bytes(16)) is None and net.id_of(address.packed[:14] + b"\x00\x0a") is None
    assert load_config(write(tmp_path, {**GOOD, "net6": "off"}, "off.json")).net6 is None


def test_block_ipv6_is_on_by_default(tmp_path):
    """A client with net6 "off" that takes the default route blocks IPv6 unless told otherwise."""
    assert load_config(write(tmp_path, {**GOOD, "net6": "off"})).block_ipv6 is True
    assert load_config(write(tmp_path, {**GOOD, "block_ipv6": False}, "b.json")).block_ipv6 is False
    assert problems(block_ipv6="yes") == ["config.json: block_ipv6: expected true or false, got the string 'yes'"]
    assert problems(chnroute={"table": 100, "gateway": "2001:db8::1", "data": "chn.txt"}) == []
    assert problems(chnroute={"table": 100, "gateway": "fe80::1", "data": "chn.txt"}) == [
        "config.json: chnroute.gateway: 'fe80::1' is a link-local address: use \"original\" "
        "(the router the IPv6 default route names)"]


def test_gateway_not_a_server():
    assert problems(gateway="16.2") == [
        "config.json: gateway: gateway '16.2' is not a server: it must be a smaller ID than this peer's id '16.1'"]


def test_gateway_is_own_id():
    assert problems(gateway="16.1") == [
        "config.json: gateway: gateway '16.1' is this client's own id: name a server, a smaller ID such as '1.1'"]


def test_server_with_own_id_as_gateway_is_accepted_and_warned(tmp_path):
    """A config copied from a client onto its server: the gateway is ignored, with one warning
    (as WireGuard ignores a peer with the interface's own key), instead of a refusal."""
    from alpaca.peerlist import cross_problems
    from alpaca.secrets import parse_secrets
    for mode, my_id in (("server", "1.1"), ("forwarder", "2.1")):
        data = {"id": my_id, "mode": mode, "gateway": my_id, "group": "g"}
        assert validate_config(data) == []
        path = write(tmp_path, data)
        config = load_config(path)
        assert config.gateway_in_use is None
        assert config_warnings(config) == [
            f"{path}: gateway '{my_id}' is this {mode}'s own id (a config copied from a client?): ignored; "
            "remove it, or name another server"]
        secrets, _ = parse_secrets(f"{my_id} {'k' * 43}\n")         # its own line has no address
        assert cross_problems(config, secrets) == []
    # another server as a server's gateway still counts, and no warning
    config = load_config(write(tmp_path, {"id": "1.2", "mode": "server", "gateway": "1.1", "group": "g"}))
    assert config.gateway_in_use == 0x0101 and config_warnings(config) == []


def test_forwarder_is_own_id():
    assert problems(forwarders=["16.1"]) == ["config.json: forwarders[0]: '16.1' is this peer's own id"]


def test_duplicate_forwarders():
    assert problems(forwarders=["1.2", "1.2"]) == ["config.json: forwarders: '1.2' is listed more than once"]


def test_client_without_gateway():
    assert validate_config({"id": "16.1"}) == [
        "config.json: gateway: client mode needs a gateway: the ID of a server, e.g. '1.1'"]


def test_server_and_forwarder_need_no_gateway():
    assert validate_config({"id": "1.1", "mode": "server"}) == []
    assert validate_config({"id": "2.1", "mode": "forwarder"}) == []


def test_bad_local_route():
    assert problems(local_routes=["192.168.0.0/16", "10.0.0.0/33", "2001:db8:1::5/64", "::/0"]) == [
        "config.json: local_routes[1]: '10.0.0.0/33' is not a network like 192.168.1.0/24 or 2001:db8:1::/64",
        "config.json: local_routes[3]: '::/0' would be a second default route"]
    assert problems(allow_inbound_from=["192.168.1.0/24", "192.168.1.1/24"]) == [
        "config.json: allow_inbound_from[1]: '192.168.1.1/24' is not a network like 192.168.1.0/24 "
        "or 2001:db8:1::/64 (host bits must be zero)"]
    assert problems(allow_inbound_from=["192.168.1.0/24", "2001:db8:1::/64"]) == []
    assert problems(allow_inbound_from=["2001:db8:1::/64"], net6="off") == [
        "config.json: allow_inbound_from[0]: '2001:db8:1::/64' is an IPv6 network, but net6 is \"off\""]


def test_bad_listen_and_chnroute_gateway():
    chn = {"table": "chn", "gateway": "gw", "data": "chnroute.txt"}
    assert problems(listen="any", chnroute=chn) == [
        "config.json: listen: 'any' is not an IP address "
        "(use 0.0.0.0 for all IPv4 addresses or :: for all IPv6 addresses)",
        "config.json: chnroute.gateway: 'gw' is neither an IP address nor \"original\" "
        "(follow the original default gateway)"]
    assert problems(chnroute={**chn, "gateway": "original"}) == []
    assert problems(chnroute={**chn, "gateway": "Original"}) != []      # one spelling only


def test_tun_name_too_long():
    assert problems(name="x" * 16) == [
        "config.json: name: 'xxxxxxxxxxxxxxxx' is too long: at most 15 characters are allowed"]


def test_top_level_not_an_object():
    assert validate_config([1]) == [
        "config.json: the file must hold a JSON object ({...}) at the top level, not a list"]


def test_all_problems_reported_each_on_one_line():
    bad = {"id": "0.0", "mode": "sever", "forwarder": [], "port": 0, "net": "10.x",
           "local_routes": ["nope"], "chnroute": {"table": 1}, "padding": -1, "name": "a\nb"}
    lines = validate_config(bad, "/etc/alpaca-tunnel.d/config.json")
    assert len(lines) >= 9
    for line in lines:
        assert "\n" not in line and line.startswith("/etc/alpaca-tunnel.d/config.json: ")
        assert "Traceback" not in line and "Failed validating" not in line


def test_malformed_json_names_line(tmp_path):
    path = write(tmp_path, '{\n  "id": "16.1",\n  "gateway": "1.1"\n  "port": 1\n}\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [f"{path}: line 4 column 3: not valid JSON: Expecting ',' delimiter"]
    assert str(e.value) == e.value.problems[0]


def test_duplicate_json_key(tmp_path):
    path = write(tmp_path, '{"id": "16.1", "gateway": "1.1", "port": 1, "port": 2}')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [f"{path}: key 'port' appears more than once; keep only one"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_load_config_reports_all_problems_with_file_name(tmp_path):
    path = write(tmp_path, {"id": "16.1", "gateway": "1.1", "port": 0, "mode": "x"})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [
        f"{path}: mode: 'x' is not one of 'server', 'client', 'forwarder'",
        f"{path}: port: 0 is out of range: it must be between 1 and 65535"]
    assert str(e.value) == "\n".join(e.value.problems)


def test_defaults_applied(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.name, cfg.mode, cfg.group, cfg.net) == ("alpaca", "client", "default", (10, 17))
    assert (cfg.id, cfg.gateway, cfg.forwarders) == (16 * 256 + 1, 257, ())
    assert (cfg.port, cfg.listen, cfg.mtu, cfg.log_level) == (1040, "0.0.0.0", 1400, "info")
    assert cfg.chnroute is None and cfg.local_routes == () and cfg.allow_inbound_from == ()
    assert cfg.pre_up_cmds == cfg.post_up_cmds == cfg.pre_down_cmds == cfg.post_down_cmds == ()
    assert (cfg.duplicate, cfg.duplicate_delay_ms, cfg.padding) == (0, 10, 0)
    assert cfg.inactive_downward_static is False
    assert cfg.virtual_net is None and cfg.control_socket is None
    assert not cfg.is_server and cfg.has_tun
    # every schema default is used by load_config
    assert set(schema_defaults()) == set(load_schema()["properties"]) - {"id"}


def test_values_converted(tmp_path):
    data = {"id": "1.1", "mode": "server", "forwarders": ["2.1", "2.2"], "virtual_net": "10.18",
            "local_routes": ["192.168.0.0/16"], "post_up_cmds": ["true"]}
    cfg = load_config(write(tmp_path, data))
    assert cfg.is_server and cfg.has_tun and cfg.gateway is None
    assert cfg.forwarders == (513, 514) and cfg.virtual_net == (10, 18)
    assert cfg.local_routes == ("192.168.0.0/16",) and cfg.post_up_cmds == ("true",)
    assert not load_config(write(tmp_path, {"id": "2.1", "mode": "forwarder"}, "f.json")).has_tun


def test_secret_file_and_chnroute_relative_to_config_dir(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir, {**GOOD, "chnroute": {"table": 100, "gateway": "192.168.1.1",
                                                 "data": "chnroute.txt"}})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("conf/config.json"))
    assert cfg.secret_file == conf_dir / "secrets.txt"
    assert cfg.chnroute == ChnRoute(100, "192.168.1.1", conf_dir / "chnroute.txt")
    cfg = load_config(write(conf_dir, {**GOOD, "secret_file": "/srv/keys.txt"}, "abs.json"))
    assert cfg.secret_file == Path("/srv/keys.txt")
    assert path.exists()


def test_default_config_path(tmp_path):
    assert default_config_path("/usr/bin/alpaca-tunnel") == Path("/etc/alpaca-tunnel.d/config.json")
    assert default_config_path("/usr/local/bin/alpaca-tunnel") == Path(
        "/usr/local/etc/alpaca-tunnel.d/config.json")
    exe = tmp_path / "bin" / "alpaca-tunnel"
    assert default_config_path(str(exe)) == tmp_path / "bin" / "alpaca-tunnel.d" / "config.json"


def test_example_config_is_valid():
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "etc" / "alpaca-tunnel.d" / "config.json")
    assert cfg.mode == "client" and cfg.secret_file == root / "etc" / "alpaca-tunnel.d" / "secrets.txt"


def test_schema_ships_in_package():
    assert SCHEMA_PATH.parent.name == "schema" and SCHEMA_PATH.parent.parent.name == "alpaca"


def test_default_group_warns_once(tmp_path):
    """The group name only hides headers (pair keys authenticate everything), so a
    guessable one is worth a warning, not a refusal."""
    path = write(tmp_path, GOOD)
    warning = (f'{path}: group is "default": anyone who guesses it can read the peer IDs and timing '
               "in packet headers (not their contents); set a group name of your own")
    assert config_warnings(load_config(path)) == [warning]                      # key missing
    assert config_warnings(load_config(write(tmp_path, {**GOOD, "group": "default"}))) == [warning]
    assert config_warnings(load_config(write(tmp_path, {**GOOD, "group": "Yx3-home"}))) == []
    assert config_warnings(load_config(write(tmp_path, {**GOOD, "group": "g", "virtual_net": "10.18"}))) == [
        f"{path}: virtual_net is accepted for compatibility but has no effect yet"]


def test_padding_above_mtu_warns(tmp_path):
    """Padding past mtu makes every datagram bigger than a full packet's, so a path
    sized for mtu fragments each one: allowed, but worth one line naming both keys."""
    path = write(tmp_path, {**GOOD, "group": "g", "mtu": 1400, "padding": 1401})
    assert config_warnings(load_config(path)) == [
        f"{path}: padding 1401 is above mtu 1400: every datagram grows past the largest a packet makes "
        "and is fragmented where mtu fits the path; set padding to 1400 or less"]
    assert config_warnings(load_config(write(tmp_path, {**GOOD, "group": "g", "mtu": 1400, "padding": 1400}))) == []
    assert config_warnings(load_config(write(tmp_path, {**GOOD, "group": "g", "mtu": 1280, "padding": 1400})))


def test_fec_is_auto_unless_asked_otherwise(tmp_path):
    """Adaptive FEC is the default: a clean path gets no parity, a lossy one
    is protected without a setting (docs/configuration.md)."""
    assert load_config(write(tmp_path, GOOD)).fec == "auto"


def test_fec_values():
    for good in ("auto", "off", "20:10", "1:3", "64:64", "8:0"):
        assert problems(fec=good) == [], good
    assert problems(fec="20/10") == ['config.json: fec: \'20/10\' is not "auto", "off" or "K:M" with K 1..64 '
                                     'and M 0..64 (e.g. "20:10")']
    assert problems(fec="0:5")[0].startswith("config.json: fec: '0:5' is not")
    assert problems(fec="2²:1")[0].startswith("config.json: fec: '2²:1' is not")   # not int()-able
    assert problems(parity=3) == ["config.json: unknown key 'parity' (did you mean 'fec'?)"]


def test_fec_per_peer(tmp_path):
    assert problems(peers={"1.1": {"fec": "20:10"}, "1.2": {"fec": "off"}}) == []
    assert problems(peers={"1.x": {"fec": "auto"}}) == [
        "config.json: peers.1.x: peer ID '1.x' is not of the form a.b (e.g. 16.1)"]
    assert problems(peers={"1.1": {"fec": "lots"}})[0].startswith("config.json: peers.1.1.fec: 'lots' is not")
    assert problems(peers={"1.1": {"parity": 3}}) == ["config.json: peers.1.1: unknown key 'parity'"]
    assert problems(peers={"16.1": {"fec": "off"}}) == ["config.json: peers.16.1: this is this peer's own id"]
    config = load_config(write(tmp_path, {**GOOD, "fec": "off", "peers": {"1.2": {"fec": "4:1"}, "1.1": {}}}))
    assert (config.fec, config.peers) == ("off", ((0x0102, "4:1"),))


def test_peer_networks(tmp_path):
    """peers.<id>.networks: what a peer may send from besides its tunnel address."""
    assert problems(peers={"1.1": {"networks": ["192.168.5.0/24", "2001:db8:5::/48"]}}) == []
    assert problems(peers={"1.1": {"networks": ["192.168.5.1/24"]}}) == [
        "config.json: peers.1.1.networks[0]: '192.168.5.1/24' is not a network like 192.168.5.0/24 or "
        "2001:db8:5::/48 (host bits must be zero)"]
    assert problems(peers={"1.1": {"networks": ["lan"]}})[0].startswith(
        "config.json: peers.1.1.networks[0]: 'lan' is not a network")
    config = load_config(write(tmp_path, {**GOOD, "peers": {"1.1": {"networks": ["10.9.0.0/16"]}}}))
    assert config.peer_networks == ((0x0101, ("10.9.0.0/16",)),)
