"""secrets.txt parsing: good lines kept, each bad line one exact message with its line number."""

from pathlib import Path

import pytest

from alpaca.protocol.ids import parse_id

from alpaca.config import ConfigError
from alpaca.host.resolver import resolve_host
from alpaca.secrets import PeerSecret, load_secrets, parse_secrets

KEY = "k" * 43


def parse(text):
    peers, problems = parse_secrets(text)
    return peers, [str(p) for p in problems]


def test_good_file():
    peers, problems = parse(f"1.1 {KEY} 192.0.2.1 2001:db8::1 1040\n16.1 {'z' * 16} null null null\n")
    assert problems == []
    assert peers == {
        257: PeerSecret(257, KEY, "192.0.2.1", "2001:db8::1", 1040, 1),
        4097: PeerSecret(4097, "z" * 16, None, None, None, 2),
    }


def test_comments_and_blank_lines():
    text = f"# header\n\n   \n1.2 {KEY} null null 1040  # trailing comment\n  # indented\n"
    peers, problems = parse(text)
    assert problems == [] and list(peers) == [258] and peers[258].line == 4


def test_null_columns():
    peers, problems = parse(f"1.2 {KEY} null 2001:db8::2 null\n")
    assert problems == []
    assert (peers[258].host, peers[258].ip6, peers[258].port) == (None, "2001:db8::2", None)


def test_host_names():
    peers, problems = parse(f"1.1 {KEY} vpn.example.com null 1040\n1.2 {KEY} gw1. null 1040\n")
    assert problems == [] and peers[257].host == "vpn.example.com" and peers[258].host == "gw1."


def test_bad_host():
    _, problems = parse(f"1.1 {KEY} 192.0.2.256 null 1040\n1.2 {KEY} bad_name! null 1\n")
    assert problems == [
        "secrets.txt: line 1: ip '192.0.2.256' is neither an IPv4 address nor a host name",
        "secrets.txt: line 2: ip 'bad_name!' is neither an IPv4 address nor a host name"]


def test_ipv6_in_ip_column():
    _, problems = parse(f"1.1 {KEY} 2001:db8::1 null 1040\n")
    assert problems == ["secrets.txt: line 1: ip '2001:db8::1' is an IPv6 address: put it in the ip6 "
                        "column (the ip column takes an IPv4 address or a host name)"]


def test_trailing_columns_may_be_left_out():
    """A client's line as a user writes it: the missing columns are null."""
    text = f"16.3 {KEY}\n16.4 {KEY} 192.0.2.4\n16.5 {KEY} vpn.example.com 2001:db8::5\n1.2 {KEY} null null\n"
    peers, problems = parse(text)
    assert problems == []
    assert peers == {
        parse_id("16.3"): PeerSecret(parse_id("16.3"), KEY, None, None, None, 1),
        parse_id("16.4"): PeerSecret(parse_id("16.4"), KEY, "192.0.2.4", None, None, 2),
        parse_id("16.5"): PeerSecret(parse_id("16.5"), KEY, "vpn.example.com", "2001:db8::5", None, 3),
        parse_id("1.2"): PeerSecret(parse_id("1.2"), KEY, None, None, None, 4),
    }
    peers, problems = parse("16.6 null  # a server's line on a client may be just its ID and null\n")
    assert problems == [] and peers[parse_id("16.6")].key is None


def test_bad_column_count():
    peers, problems = parse(f"1.1\n1.2 {KEY} null null 1 extra\n1.3 {KEY} null null 1\n")
    assert problems == [
        "secrets.txt: line 1: expected at least 2 columns (id key ip ip6 port; the last three may be left out), "
        "found 1",
        "secrets.txt: line 2: expected at most 5 columns (id key ip ip6 port), found 6"]
    assert list(peers) == [259]


def test_port_without_the_columns_before_it():
    """A short line ending in a number is ambiguous (a port, read as ip or ip6): refused, with
    the line to write instead (never echoing the key)."""
    peers, problems = parse(f"1.1 {KEY} 192.0.2.1 1040\n1.2 {KEY} 1040\n")
    assert problems == [
        "secrets.txt: line 1: '1040' is in the ip6 column but looks like a port; the port is the 5th column: "
        "write `1.1 <key> 192.0.2.1 null 1040`",
        "secrets.txt: line 2: '1040' is in the ip column but looks like a port; the port is the 5th column: "
        "write `1.2 <key> null null 1040`"]
    assert peers == {} and KEY not in "".join(problems)


def test_reserved_id():
    _, problems = parse(f"# c\n255.255 {KEY} null null null\n")
    assert problems == [
        "secrets.txt: line 2: peer ID '255.255' is reserved (0.0, 0.1 and 255.255 cannot be used)"]


def test_malformed_id():
    _, problems = parse(f"1 {KEY} null null null\n")
    assert problems == ["secrets.txt: line 1: peer ID '1' is not of the form a.b (e.g. 16.1)"]


def test_short_key():
    _, problems = parse("1.1 short null null null\n")
    assert problems == ["secrets.txt: line 1: the key is too short (5 characters, at least 16 are needed): "
                        "make one with `alpaca-tunnel genkey`"]


def test_null_and_non_ascii_key():
    # null: this host never needs that key (a server's line on a client)
    peers, problems = parse(f"1.1 null null null null\n1.2 {'é' * 20} null null null\n")
    assert peers[parse_id("1.1")].key is None
    assert problems == [
        "secrets.txt: line 2: the key may contain only printable ASCII characters without spaces"]


def test_bad_ip6():
    _, problems = parse(f"1.1 {KEY} null 192.0.2.1 1040\n")
    assert problems == ["secrets.txt: line 1: ip6 '192.0.2.1' is not an IPv6 address"]


def test_bad_port():
    _, problems = parse(f"1.1 {KEY} null null 0\n1.2 {KEY} null null 65536\n1.3 {KEY} null null x\n")
    assert problems == [
        "secrets.txt: line 1: port '0' is not a port number between 1 and 65535",
        "secrets.txt: line 2: port '65536' is not a port number between 1 and 65535",
        "secrets.txt: line 3: port 'x' is not a port number between 1 and 65535"]


def test_duplicate_id_names_both_lines():
    text = f"1.1 {KEY} null null null\n# x\n1.1 {'y' * 43} null null null\n01.1 {KEY} null null null\n"
    peers, problems = parse(text)
    assert problems == [
        "secrets.txt: line 3: peer ID '1.1' is already listed on line 1; this line is skipped",
        "secrets.txt: line 4: peer ID '01.1' is already listed on line 1; this line is skipped"]
    assert peers[257].key == KEY and peers[257].line == 1


def test_bad_lines_skipped_good_kept():
    peers, problems = parse(f"1.1 {KEY} null null null\n1.2 bad null null null\n1.3 {KEY} null null null\n")
    assert sorted(peers) == [257, 259] and len(problems) == 1


def test_every_message_is_one_line():
    text = "\n".join([f"0.0 {KEY} null null null", "1.1 short null null null", "a b c",
                      f"1.2 {KEY} x..y null null", f"1.3 {KEY} null nope null", f"1.4 {KEY} null null -1"])
    _, problems = parse_secrets(text, "/etc/alpaca-tunnel.d/secrets.txt")
    assert [p.line for p in problems] == [1, 2, 3, 4, 5, 6]
    for p in problems:
        assert "\n" not in str(p) and str(p).startswith(f"/etc/alpaca-tunnel.d/secrets.txt: line {p.line}: ")


def test_load_secrets_and_permission_warning(tmp_path):
    path = tmp_path / "secrets.txt"
    path.write_text(f"1.1 {KEY} null null null\n")
    path.chmod(0o600)
    peers, problems, warnings = load_secrets(path)
    assert list(peers) == [257] and problems == [] and warnings == []

    path.chmod(0o644)
    _, _, warnings = load_secrets(path)
    assert warnings == [f"{path}: is world-readable: every user of this host can read the keys "
                        f"(mode 0644); run: chmod 600 {path}"]

    path.chmod(0o640)
    _, _, warnings = load_secrets(path)
    assert warnings == [f"{path}: is open to users other than its owner (mode 0640); run: chmod 600 {path}"]


def test_load_secrets_problems_name_the_file(tmp_path):
    path = tmp_path / "secrets.txt"
    path.write_text("1.1 short null null null\n")
    path.chmod(0o600)
    _, problems, _ = load_secrets(path)
    assert str(problems[0]).startswith(f"{path}: line 1: the key is too short")


def test_load_secrets_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as e:
        load_secrets(path)
    assert e.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_example_secrets_file_parses():
    path = Path(__file__).resolve().parent.parent / "etc" / "alpaca-tunnel.d" / "secrets.txt"
    peers, problems = parse_secrets(path.read_text(), str(path))
    assert problems == [] and sorted(peers) == [257, 258, 4097]
    assert len(peers[4097].key) == 43 and peers[257].key is None and peers[258].key is None
    assert peers[4097].host is None


def test_resolve_host():
    assert resolve_host("192.0.2.7") == "192.0.2.7"
    assert resolve_host("localhost") in ("127.0.0.1", None)  # None only on a host without /etc/hosts
    assert resolve_host("no-such-host.invalid") is None
    assert resolve_host("bad host name") is None
