"""alpaca/host/sysctl.py on a directory standing in for /proc/sys (tier 1).

A real /proc/sys copies all/forwarding to every interface when written; the
stand-in does not, so these tests check what is written and put back, and
tests/test_ipv6_server.py checks the kernel's side.
"""

from __future__ import annotations

from pathlib import Path

from alpaca.host import sysctl
from alpaca.host.sysctl import IPV6_FORWARDING, Sysctl


def proc(tmp_path: Path, accept_ra: dict[str, str], forwarding: dict[str, str] | None = None) -> Path:
    root = tmp_path / "sys"
    for name in ["all", *accept_ra]:
        conf = root / "net/ipv6/conf" / name
        conf.mkdir(parents=True)
        (conf / "accept_ra").write_text(accept_ra.get(name, "1") + "\n")
        (conf / "forwarding").write_text((forwarding or {}).get(name, "0") + "\n")
    return root


def values(root: Path, key: str) -> dict[str, str]:
    return {p.name: (p / key).read_text().strip() for p in sorted((root / "net/ipv6/conf").iterdir())}


def test_forward_ipv6_keeps_router_advertisements_and_restores_exactly(tmp_path):
    root = proc(tmp_path, {"default": "1", "eth0": "1", "eth1": "0", "wlan0": "2"}, {"eth1": "1"})
    before = (values(root, "accept_ra"), values(root, "forwarding"))
    s = Sysctl("alp0", root=str(root), state_dir=tmp_path / "run")
    assert s.forward_ipv6()
    assert values(root, "accept_ra") == {"all": "1", "default": "2", "eth0": "2", "eth1": "0", "wlan0": "2"}
    assert (root / IPV6_FORWARDING).read_text().strip() == "1"
    # eth1 forwarded before: writing `all` back to 0 would turn it off, so it is remembered
    assert s.saved["net/ipv6/conf/eth1/forwarding"] == "1"
    assert list(s.saved)[-1] == IPV6_FORWARDING          # changed last, so put back first
    s.restore()
    assert (values(root, "accept_ra"), values(root, "forwarding")) == before
    assert not list((tmp_path / "run").iterdir())


def test_forward_ipv6_after_a_kill_is_undone_by_cleanup(tmp_path):
    root = proc(tmp_path, {"default": "1", "eth0": "1"})
    before = values(root, "accept_ra")
    Sysctl("alp0", root=str(root), state_dir=tmp_path / "run").forward_ipv6()   # and the process "dies"
    assert sysctl.cleanup("alp0", root=str(root), state_dir=tmp_path / "run") == 3
    assert values(root, "accept_ra") == before and (root / IPV6_FORWARDING).read_text().strip() == "0"
    assert sysctl.cleanup("alp0", root=str(root), state_dir=tmp_path / "run") == 0


def test_a_host_that_already_forwards_ipv6_is_left_alone(tmp_path):
    root = proc(tmp_path, {"eth0": "1"}, {"all": "1", "eth0": "1"})
    s = Sysctl("alp0", root=str(root), state_dir=tmp_path / "run")
    assert s.forward_ipv6() and s.saved == {}
    assert values(root, "accept_ra")["eth0"] == "1"


def test_no_ipv6_in_the_kernel(tmp_path):
    (tmp_path / "sys").mkdir()
    assert not Sysctl("alp0", root=str(tmp_path / "sys"), state_dir=tmp_path / "run").forward_ipv6()
