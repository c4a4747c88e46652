"""Packaging: the .deb from packaging/build-deb.sh in a clean Debian 12 under a real
systemd, and `pip install .` into a fresh venv.

The .deb test boots a minimal bookworm tree (debootstrap --variant=minbase, cached
under /var/cache/alpaca-test and never modified: --volatile=overlay) with
systemd-nspawn in a network namespace of our testbed. The container has no way
out to the internet, so everything the package Depends on must already be in the
tree. We drive it from outside with nsenter, as an operator would from inside:
dpkg -i, write a real config, systemctl start/reload/stop, dpkg -r, dpkg -P.

Caches (both safe to delete):
  /var/cache/alpaca-test/rootfs-bookworm   the debootstrap tree (~90 s to make)
  /var/cache/alpaca-test/deb/<hash>/       the .deb, keyed by a hash of the packaged sources
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpaca.lab.container import CannotBoot, Container
from alpaca.lab.testbed import wait_for

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ALPACA_TEST_CACHE", "/var/cache/alpaca-test"))
ROOTFS = CACHE / "rootfs-bookworm"
DEB_CACHE = CACHE / "deb"
# procps: /bin/kill (ExecReload); kmod: /sbin/modprobe (python-iptables); iputils-ping: debugging
INCLUDE = "systemd,systemd-sysv,dbus,python3,iptables,iproute2,procps,iputils-ping,kmod"
# what goes into the .deb; a change anywhere else (tests, bench) does not rebuild it
PACKAGED = ("alpaca/", "systemd/", "etc/", "docs/", "packaging/", "pyproject.toml", "README.md")
CT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


# ------------------------------------------------------------------ helpers

def _source_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files (what build-deb.sh packages)."""
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       check=False, capture_output=True, text=True)
    if r.returncode == 0:
        names = [n for n in r.stdout.split("\0") if n]
    else:   # not a git checkout
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not {".git", ".venv", "__pycache__", "build", "dist"} & set(p.parts)
                 and ".egg-info" not in str(p)]
    return sorted(n for n in names if (ROOT / n).is_file())


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in _source_files():
        if name.startswith(PACKAGED):
            h.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


class _Lock:
    """An exclusive lock on a file, so two test runs do not build the same cache at once."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")  # noqa: SIM115 - held until __exit__

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _apt_install(package: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> bool:
        return subprocess.run(["apt-get", *args], check=False, capture_output=True, env=env,
                              timeout=300).returncode == 0
    return apt("install", "-y", "-qq", package) or (apt("update", "-qq") and apt("install", "-y", "-qq", package))


def _mirror() -> str:
    """The host's Debian mirror (deb822 or one-line format), as the nspawn recipe does."""
    try:
        for line in Path("/etc/apt/sources.list.d/debian.sources").read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    except OSError:
        pass
    try:
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    except OSError:
        pass
    return "http://deb.debian.org/debian"


# ------------------------------------------------------------------ the .deb

@pytest.fixture(scope="module")
def deb() -> Path:
    if shutil.which("dpkg-deb") is None or not Path("/etc/debian_version").exists():
        pytest.skip("needs Debian (dpkg-deb) to build the package")
    key = _source_hash()
    target = DEB_CACHE / key
    with _Lock(CACHE / "deb.lock"):
        found = sorted(target.glob("alpaca-tunnel_*.deb"))
        if found:
            print(f"\nreusing {found[0]}")
            return found[0]
        out = DEB_CACHE / f".build-{os.getpid()}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.monotonic()
        r = subprocess.run(["bash", str(ROOT / "packaging" / "build-deb.sh"), str(out)],
                           check=False, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        print(f"\nbuilt {r.stdout.strip().splitlines()[-1]} in {time.monotonic() - t:.1f}s")
        for old in DEB_CACHE.iterdir():     # keep only the current build
            if old.is_dir() and old != out:
                shutil.rmtree(old, ignore_errors=True)
        out.rename(target)
        return min(target.glob("alpaca-tunnel_*.deb"))


# ------------------------------------------------------------------ the clean Debian tree

@pytest.fixture(scope="module")
def rootfs() -> Path:
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn not installed (apt-get install systemd-container)")
    if shutil.which("debootstrap") is None and not _apt_install("debootstrap"):
        pytest.skip("debootstrap not installed and apt-get install debootstrap failed")
    stamp = f"bookworm minbase {INCLUDE}\n"
    with _Lock(CACHE / "rootfs.lock"):
        marker = ROOTFS / ".alpaca-debootstrap"
        if (ROOTFS / "usr/lib/systemd/systemd").exists() and marker.exists() and marker.read_text() == stamp:
            return ROOTFS
        tmp = CACHE / f".rootfs-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.monotonic()
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", "bookworm", str(tmp),
                            _mirror()], check=False, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"debootstrap failed (no mirror?): {(r.stdout + r.stderr)[-500:]}")
        # apt's caches are not needed to boot; a smaller tree copies and overlays faster
        shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
        (tmp / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        (tmp / ".alpaca-debootstrap").write_text(stamp)
        print(f"\ndebootstrap took {time.monotonic() - t:.1f}s")
        shutil.rmtree(ROOTFS, ignore_errors=True)
        tmp.rename(ROOTFS)
        return ROOTFS


@pytest.fixture
def debian(deb, rootfs, tmp_path):
    from alpaca.lab.testbed import Testbed
    tb = Testbed(f"pk{os.getpid() % 100000}")
    ct = None
    try:
        ip = tb.add_host("ct", 1)
        try:
            ct = Container(rootfs, tb.ns("ct"), tmp_path, {"/mnt/alpaca-deb": deb.parent}, machine="alpacapkg",
                           env=CT_ENV)
        except CannotBoot as e:
            pytest.skip(f"systemd-nspawn cannot boot a container here: {str(e)[-500:]}")
        yield {"ct": ct, "tb": tb, "ip": ip, "deb": f"/mnt/alpaca-deb/{deb.name}"}
    finally:
        if ct is not None:
            ct.close()
        tb.close()


# ------------------------------------------------------------------ tests

@pytest.mark.root
def test_deb_in_clean_debian(debian):
    ct, tb, ip = debian["ct"], debian["tb"], debian["ip"]

    def tun() -> bool:
        return tb.run("ct", ["ip", "link", "show", "alpaca0"]).returncode == 0

    # the container is clean: no alpaca-tunnel, no network beyond the testbed
    assert not ct.exists("/usr/bin/alpaca-tunnel")
    assert ct.ctl("dpkg", "-s", "alpaca-tunnel").returncode != 0
    assert not ct.exists("/run/xtables.lock")       # nothing has run iptables yet

    # install: every Depends is already in the minbase tree (there is no network to fetch more)
    r = ct.ctl("dpkg", "-i", debian["deb"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ct.ctl("readlink", "/usr/bin/alpaca-tunnel").stdout.strip() == "/opt/alpaca-tunnel/bin/alpaca-tunnel"
    assert ct.ctl("head", "-n1", "/opt/alpaca-tunnel/bin/alpaca-tunnel").stdout.startswith(
        "#!/opt/alpaca-tunnel/bin/python")
    st = ct.ctl("stat", "-c", "%a %U %G", "/etc/alpaca-tunnel.d/secrets.txt").stdout.split()
    assert st == ["600", "root", "root"], st
    st = ct.ctl("stat", "-c", "%a %U %G", "/etc/alpaca-tunnel.d/config.json").stdout.split()
    assert st == ["640", "root", "root"], st      # names the group: not for every local user
    # the xtables lock file that the units make writable: made at once by postinst, at boot by tmpfiles.d
    assert ct.exists("/usr/lib/tmpfiles.d/alpaca-tunnel.conf")
    assert ct.ctl("stat", "-c", "%a %U %F", "/run/xtables.lock").stdout.split() == ["600", "root", "regular", "empty", "file"]
    conffiles = ct.ctl("dpkg-query", "-W", "-f=${Conffiles}", "alpaca-tunnel").stdout
    assert "/etc/alpaca-tunnel.d/config.json" in conffiles and "/etc/alpaca-tunnel.d/secrets.txt" in conffiles
    # postinst reloaded systemd but neither enabled nor started the service (example keys)
    assert ct.ctl("systemctl", "is-enabled", "alpaca-tunnel").stdout.strip() == "disabled"
    assert ct.show("ActiveState") == "inactive"
    assert ct.show("LoadState") == "loaded"
    assert ct.show("FragmentPath") == "/lib/systemd/system/alpaca-tunnel.service"
    assert ct.show("LoadState", "alpaca-tunnel@x.service") == "loaded"
    r = ct.ctl("systemd-analyze", "verify", "alpaca-tunnel.service", "alpaca-tunnel@x.service")
    assert r.returncode == 0, r.stderr
    assert ct.exists("/usr/share/doc/alpaca-tunnel/README.md")
    assert ct.exists("/usr/share/doc/alpaca-tunnel/docs/protocol.md")

    # installed under /usr/bin, the command finds /etc/alpaca-tunnel.d/config.json by itself
    r = ct.ctl("alpaca-tunnel", "check")
    assert r.returncode == 0 and "group 'example'" in r.stdout, r.stdout + r.stderr

    # a real config: server 1.1 of group test, keys made by the installed genkey
    keys = [ct.ctl("alpaca-tunnel", "genkey").stdout.strip() for _ in range(2)]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", k) for k in keys), keys
    config = {"id": "1.1", "mode": "server", "group": "test", "name": "alpaca0"}
    secrets = f"1.1 {keys[0]} {ip} null 1040\n16.1 {keys[1]} null null null\n"
    assert ct.sh("cat > /etc/alpaca-tunnel.d/config.json", input=json.dumps(config, indent=2) + "\n").returncode == 0
    assert ct.sh("cat > /etc/alpaca-tunnel.d/secrets.txt", input=secrets).returncode == 0
    assert ct.ctl("alpaca-tunnel", "check").returncode == 0

    r = ct.ctl("systemctl", "start", "alpaca-tunnel", timeout=90)
    assert r.returncode == 0, r.stderr + ct.journal()
    assert ct.show("ActiveState") == "active"
    assert ct.show("StatusText"), ct.show("StatusText")
    assert tun()
    r = ct.ctl("alpaca-tunnel", "status")
    assert r.returncode == 0 and "16.1" in r.stdout, r.stdout + r.stderr
    assert ct.ctl("alpaca-tunnel", "status", "--json").returncode == 0
    assert "alpaca-tunnel" in ct.ctl("iptables-legacy-save").stdout    # NAT via python-iptables
    assert "xtables lock" not in ct.journal(), ct.journal()[-3000:]   # it changed them holding the lock
    pid = ct.show("MainPID")
    assert ct.ctl("systemctl", "reload", "alpaca-tunnel").returncode == 0
    assert wait_for(lambda: ct.show("ActiveState") == "active", 10) and ct.show("MainPID") == pid

    # reinstalling (as an upgrade would) keeps the edited conffiles and restarts a running daemon;
    # it never loosens the modes an admin chose
    assert ct.ctl("chmod", "600", "/etc/alpaca-tunnel.d/config.json").returncode == 0
    r = ct.ctl("dpkg", "-i", debian["deb"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(ct.ctl("cat", "/etc/alpaca-tunnel.d/config.json").stdout) == config
    assert ct.ctl("stat", "-c", "%a", "/etc/alpaca-tunnel.d/secrets.txt").stdout.strip() == "600"
    assert ct.ctl("stat", "-c", "%a", "/etc/alpaca-tunnel.d/config.json").stdout.strip() == "600"
    assert wait_for(lambda: ct.show("ActiveState") == "active" and ct.show("MainPID") not in ("0", pid), 30), \
        ct.journal()[-3000:]

    r = ct.ctl("systemctl", "stop", "alpaca-tunnel", timeout=60)
    assert r.returncode == 0, r.stderr
    assert ct.show("ActiveState") == "inactive"
    assert not tun()
    assert "alpaca-tunnel" not in ct.ctl("iptables-legacy-save").stdout
    journal = ct.journal()
    assert "Traceback" not in journal, journal[-3000:]

    # remove: prerm stops a running daemon; the program goes, the conffiles stay
    assert ct.ctl("systemctl", "start", "alpaca-tunnel", timeout=90).returncode == 0
    assert tun()
    r = ct.ctl("dpkg", "-r", "alpaca-tunnel", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not tun()
    assert ct.show("ActiveState") in ("inactive", "")
    assert not ct.exists("/usr/bin/alpaca-tunnel")
    assert not ct.exists("/opt/alpaca-tunnel")
    assert not ct.exists("/lib/systemd/system/alpaca-tunnel.service")
    assert json.loads(ct.ctl("cat", "/etc/alpaca-tunnel.d/config.json").stdout) == config
    assert ct.exists("/etc/alpaca-tunnel.d/secrets.txt")
    assert "config-files" in ct.ctl("dpkg-query", "-W", "-f=${Status}", "alpaca-tunnel").stdout

    # purge: the configuration goes too
    r = ct.ctl("dpkg", "-P", "alpaca-tunnel", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not ct.exists("/etc/alpaca-tunnel.d")
    assert ct.ctl("dpkg", "-s", "alpaca-tunnel").returncode != 0


def test_pip_install(tmp_path):
    """`pip install .` (with its dependencies, from PyPI or pip's cache) installs a working command."""
    src = tmp_path / "src"
    for name in _source_files():
        if name.startswith(("alpaca/", "pyproject.toml", "README.md")):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        str(src)], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    exe = venv / "bin" / "alpaca-tunnel"
    assert exe.exists()
    r = subprocess.run([str(exe), "genkey"], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and re.fullmatch(r"[A-Za-z0-9_-]{43}\n", r.stdout), r.stdout + r.stderr
    # the JSON schema (package data) is installed: the example config validates
    example = tmp_path / "alpaca-tunnel.d"
    shutil.copytree(ROOT / "etc" / "alpaca-tunnel.d", example)
    (example / "secrets.txt").chmod(0o600)
    r = subprocess.run([str(exe), "check", "-C", str(example / "config.json")], check=False,
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ the README's tour

TOUR_BLOCK = re.compile(r"<!-- tour:(\S+)(?: ([^\n]*?))? -->\n```[a-z]*\n(.*?)```", re.S)
TOUR_SERVER_ADDRESS = "203.0.113.10"     # the tour's example public address of 1.1


def tour_blocks() -> dict[str, str]:
    """The README's tour: each fenced block after a `<!-- tour:NAME [what] -->`
    marker, by NAME and what (the files' blocks say which file on which host)."""
    text = (ROOT / "README.md").read_text()
    return {" ".join(filter(None, (name, what))): body for name, what, body in TOUR_BLOCK.findall(text)}


def tour_commands(block: str) -> list[str]:
    """A block's command lines, without the comments a reader needs and a shell does not."""
    return [cmd for cmd in (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines())
            if cmd and not cmd.startswith("#")]


def test_tour_blocks_are_all_there():
    blocks = tour_blocks()
    assert set(blocks) == {"build", "install", "start", "ping", "file /etc/alpaca-tunnel.d/secrets.txt",
                           "file /etc/alpaca-tunnel.d/config.json on the server",
                           "file /etc/alpaca-tunnel.d/config.json on the client"}, set(blocks)
    # the deb fixture runs exactly this, on the machine that runs the tests
    assert tour_commands(blocks["build"]) == ["packaging/build-deb.sh"]
    assert not any("pip install" in cmd for cmd in tour_commands(blocks["install"]))


@pytest.fixture
def tour_hosts(deb, rootfs, tmp_path):
    """Two clean Debian 12 hosts on one LAN, no way out, the .deb in /mnt/alpaca-deb."""
    from alpaca.lab.testbed import Testbed
    tb = Testbed(f"tr{os.getpid() % 100000}")
    hosts = {}
    try:
        ips = {"server": tb.add_host("server", 1), "client": tb.add_host("client", 2)}
        # the client's uplink router: what a client's default route points at before the tunnel
        tb.run("client", ["ip", "route", "add", "default", "via", ips["server"]], check=True)
        for name in ("server", "client"):
            (tmp_path / name).mkdir()
            try:
                hosts[name] = Container(rootfs, tb.ns(name), tmp_path / name, {"/mnt/alpaca-deb": deb.parent},
                                        machine=f"tour{name[0]}", env=CT_ENV)
            except CannotBoot as e:
                pytest.skip(f"systemd-nspawn cannot boot a container here: {str(e)[-500:]}")
        yield hosts, ips
    finally:
        for ct in hosts.values():
            ct.close()
        tb.close()


@pytest.mark.root
def test_readme_tour_in_clean_debian(tour_hosts):
    """The README's tour, its commands as printed, on two clean Debian 12 hosts
    without network: install the .deb, make keys, write the files (the test
    fills in the placeholders: the keys and the server's address), start both
    under systemd, ping the server through the tunnel."""
    hosts, ips = tour_hosts
    blocks = tour_blocks()

    def run(host: str, cmd: str) -> str:
        r = hosts[host].sh(f"cd /mnt/alpaca-deb && {cmd}", timeout=120)
        assert r.returncode == 0, f"{host}: {cmd}: {r.stdout[-2000:]}{r.stderr[-2000:]}{hosts[host].journal()[-2000:]}"
        return r.stdout

    keys = {}
    for host, peer in (("server", "1.1"), ("client", "16.1")):
        for cmd in tour_commands(blocks["install"]):
            out = run(host, cmd)
            if cmd == "alpaca-tunnel genkey":
                keys[peer] = out.strip()
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", k) for k in keys.values()), keys

    def fill(text: str) -> str:
        for peer, key in keys.items():
            text = text.replace(f"<key of {peer}>", key)
        return text.replace(TOUR_SERVER_ADDRESS, ips["server"])

    secrets = "/etc/alpaca-tunnel.d/secrets.txt"
    for host in ("server", "client"):
        for path, text in ((secrets, blocks[f"file {secrets}"]),
                           ("/etc/alpaca-tunnel.d/config.json",
                            blocks[f"file /etc/alpaca-tunnel.d/config.json on the {host}"])):
            assert "<" not in fill(text), fill(text)
            assert hosts[host].sh(f"cat > {path}", input=fill(text)).returncode == 0
        assert hosts[host].ctl("stat", "-c", "%a", secrets).stdout.strip() == "600"

    for host in ("server", "client"):
        for cmd in tour_commands(blocks["start"]):
            run(host, cmd)
        assert hosts[host].show("ActiveState") == "active"
    for cmd in tour_commands(blocks["ping"]):
        run("client", cmd)

    status = run("client", "alpaca-tunnel status")
    assert re.search(r"peer 1\.1 \(10\.17\.1\.1\) gateway (active|idle)", status), status
    # what the tour says next: the client's default route now goes through the tunnel,
    # and the server's own address stays outside it
    assert " dev alpaca " in run("client", "ip route get 198.51.100.1")
    assert " dev alpaca " not in run("client", f"ip route get {ips['server']}")
    for ct in hosts.values():
        assert "Traceback" not in ct.journal()
