#!/bin/bash
# Build the Debian 12 package of alpaca-tunnel:  packaging/build-deb.sh [OUTDIR]
#
# Run as root on Debian 12 (bookworm). Writes OUTDIR/alpaca-tunnel_<version>_<arch>.deb
# (OUTDIR defaults to dist/ in the repository) and prints its path on the last line.
#
#   /opt/alpaca-tunnel/                 a self-contained venv (Debian's /usr/bin/python3) with
#                                       the project and its PyPI dependencies
#   /usr/bin/alpaca-tunnel              -> /opt/alpaca-tunnel/bin/alpaca-tunnel
#   /lib/systemd/system/alpaca-tunnel.service, alpaca-tunnel@.service
#   /usr/lib/tmpfiles.d/alpaca-tunnel.conf   creates /run/xtables.lock (the units' ReadWritePaths)
#   /etc/alpaca-tunnel.d/config.json (0640), secrets.txt (0600)    conffiles, root:root
#   /usr/share/doc/alpaca-tunnel/       README.md, docs/, README.Debian, copyright
#
# The venv is created at its final path, /opt/alpaca-tunnel, inside a private mount namespace
# where the staging directory is bind-mounted there: shebangs, pyvenv.cfg and the compiled
# bytecode name the real path, and the build host's own /opt/alpaca-tunnel (if any) is not
# touched. Packages from PyPI are cached under /var/cache/alpaca-build (ALPACA_BUILD_CACHE).
# Only the Debian packages needed to build are installed (apt), and only if missing.
set -euo pipefail
umask 022
export LC_ALL=C.UTF-8

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$(realpath -m "${1:-$REPO/dist}")
PKG=alpaca-tunnel
PREFIX=/opt/alpaca-tunnel
CACHE=${ALPACA_BUILD_CACHE:-/var/cache/alpaca-build}
PY=/usr/bin/python3

say() { echo "build-deb: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the venv is built at $PREFIX in a private mount namespace)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this script builds on Debian 12"

# ------------------------------------------------------------------ build dependencies (apt)
# python3-venv: venv + ensurepip; python3-dev, gcc, libc6-dev: C extensions without a wheel
# (python-pytun, python-iptables' libxtwrapper); libffi-dev: cffi if it has to be built;
# binutils: strip/objdump; iptables: to import python-iptables when checking the result.
BUILD_DEPS=(python3 python3-venv python3-dev gcc libc6-dev libffi-dev binutils iptables)
missing=()
for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing build dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VERSION=$(cd "$REPO" && $PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
# PEP 440 pre-releases sort before the release in Debian only with a tilde: 1.0rc1 -> 1.0~rc1
DEB_VERSION=$(echo "$VERSION" | sed -E 's/^([0-9][0-9.]*)[.-]?((a|b|rc|alpha|beta|dev)[0-9]*)$/\1~\2/')
ARCH=$(dpkg --print-architecture)
PYVER=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYNEXT=$($PY -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

WORK=$(mktemp -d /var/tmp/alpaca-deb.XXXXXX)
STAGE=$WORK/root
SRC=$WORK/src
CREATED_MOUNTPOINT=
cleanup() {
    # the mount namespace is gone with its process; only a mount point we made may remain
    if [ -n "$CREATED_MOUNTPOINT" ]; then rmdir "$PREFIX" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$STAGE$PREFIX" "$SRC" "$OUTDIR" "$CACHE/pip"

# ------------------------------------------------------------------ a clean copy of the source
# Tracked plus untracked-but-not-ignored files (no .venv, build/, caches); plain copy without git.
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
        | tar --null -T - -cf -) | tar -C "$SRC" -xf -
else
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf -
fi

# ------------------------------------------------------------------ the venv, built in place
# A bind mount needs a mount point: create an empty /opt/alpaca-tunnel only if there is none
# (removed again on exit); an installed one is shadowed in the private namespace, not modified.
if [ ! -e "$PREFIX" ]; then
    mkdir -p "$PREFIX"
    CREATED_MOUNTPOINT=1
fi
cat > "$WORK/venv.sh" <<EOF
set -euo pipefail
mount --bind "$STAGE$PREFIX" "$PREFIX"
$PY -m venv "$PREFIX"
export PIP_CACHE_DIR="$CACHE/pip" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1
"$PREFIX/bin/pip" install -q --no-compile --use-pep517 "$SRC"
"$PREFIX/bin/pip" uninstall -q -y pip setuptools
# where it was built from (a temporary directory) is of no use, and differs on every build
rm -f "$PREFIX"/lib/python*/site-packages/alpaca_tunnel-*.dist-info/direct_url.json
sed -i '/direct_url.json/d' "$PREFIX"/lib/python*/site-packages/alpaca_tunnel-*.dist-info/RECORD
find "$PREFIX" -name __pycache__ -prune -exec rm -rf {} +
find "$PREFIX" -name '*.so' -type f -exec sh -c 'for f; do strip --strip-debug "\$f" 2>/dev/null || true; done' sh {} +
# bytecode that is valid whatever the files' mtimes (and readable under ProtectSystem=strict)
"$PREFIX/bin/python" -m compileall -q -j0 --invalidation-mode checked-hash "$PREFIX/lib" >/dev/null
# it runs from its final path
"$PREFIX/bin/python" -c 'import alpaca.cli, alpaca.daemon, nacl.secret, pytun, pyroute2, sdnotify, jsonschema, iptc.ip4tc'
"$PREFIX/bin/alpaca-tunnel" genkey >/dev/null
EOF
say "building the venv at $PREFIX (python $PYVER, pip cache $CACHE/pip)"
unshare --mount --propagation private bash "$WORK/venv.sh"
if [ -n "$CREATED_MOUNTPOINT" ]; then rmdir "$PREFIX"; CREATED_MOUNTPOINT=; fi

V=$STAGE$PREFIX
for f in "$V"/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    if head -c2 "$f" | grep -q '^#!'; then
        line=$(head -n1 "$f")
        case "$line" in
            "#!$PREFIX/bin/python"*|"#!/bin/sh"*|"#!/bin/bash"*) ;;
            *) die "$f: unexpected interpreter line: $line" ;;
        esac
    fi
done
[ "$(head -n1 "$V/bin/alpaca-tunnel")" = "#!$PREFIX/bin/python3" ] || die "bad shebang in bin/alpaca-tunnel"
if grep -rlF "$WORK" "$V" >/dev/null; then
    die "the venv refers to the build directory: $(grep -rlF "$WORK" "$V" | head -3)"
fi

# ------------------------------------------------------------------ the rest of the tree
mkdir -p "$STAGE/usr/bin" "$STAGE/lib/systemd/system" "$STAGE/usr/lib/tmpfiles.d" \
         "$STAGE/etc/alpaca-tunnel.d" "$STAGE/usr/share/doc/$PKG" "$STAGE/DEBIAN"
ln -s "$PREFIX/bin/alpaca-tunnel" "$STAGE/usr/bin/alpaca-tunnel"
install -m 0644 "$SRC/systemd/alpaca-tunnel.service" "$SRC/systemd/alpaca-tunnel@.service" \
    "$STAGE/lib/systemd/system/"
install -m 0644 "$SRC/systemd/alpaca-tunnel.tmpfiles" "$STAGE/usr/lib/tmpfiles.d/alpaca-tunnel.conf"
# not a key, but it names the group, which hides the packet headers: not for every local user
install -m 0640 "$SRC/etc/alpaca-tunnel.d/config.json" "$STAGE/etc/alpaca-tunnel.d/config.json"
install -m 0600 "$SRC/etc/alpaca-tunnel.d/secrets.txt" "$STAGE/etc/alpaca-tunnel.d/secrets.txt"
DOC=$STAGE/usr/share/doc/$PKG
install -m 0644 "$SRC/README.md" "$DOC/README.md"
cp -r "$SRC/docs" "$DOC/docs"
install -m 0644 "$SRC/packaging/README.md" "$DOC/README.Debian"
cat > "$DOC/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: alpaca-tunnel

Files: *
License: GPL-3.0-or-later
 On Debian systems the full text of the GNU General Public License version 3
 is in /usr/share/common-licenses/GPL-3.
 .
 $PREFIX holds third-party Python packages from PyPI under their own
 licenses; each one's license is in its *.dist-info directory there.
EOF
chmod -R u=rwX,go=rX "$DOC"

# ------------------------------------------------------------------ Depends
# Shared libraries the compiled extensions link against, mapped to their Debian packages
# (what dpkg-shlibdeps would do), plus what is loaded or run at run time:
#   python3 $PYVER    the venv's interpreter (its site-packages is lib/python$PYVER)
#   libip4tc2, libip6tc2, libxtables12   dlopen()ed by python-iptables (ctypes: ip4tc, ip6tc,
#                     xtables), iptables  its extensions /usr/lib/<triplet>/xtables/libxt_*.so
#   kmod              python-iptables runs /sbin/modprobe ip_tables where modules exist
#   procps            /bin/kill for the units' ExecReload
declare -A seen=()
shlib_pkgs=()
glibc=2.17
while IFS= read -r -d '' so; do
    [ "$(head -c4 "$so" | tail -c3)" = ELF ] || continue
    v=$(objdump -T "$so" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1 || true)
    if [ -n "$v" ]; then glibc=$(printf '%s\n%s\n' "$glibc" "$v" | sort -V | tail -n1); fi
    while read -r lib; do
        case "$lib" in "$V"/*|"$STAGE"/*|"") continue ;; esac
        pkg=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$(realpath "$lib")" 2>/dev/null || \
              dpkg -S "${lib/#\/usr\/lib\//\/lib\/}" 2>/dev/null || true)
        pkg=${pkg%%:*}
        if [ -n "$pkg" ] && [ -z "${seen[$pkg]:-}" ]; then seen[$pkg]=1; shlib_pkgs+=("$pkg"); fi
    done < <(ldd "$so" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
done < <(find "$V" -type f -name '*.so*' -print0 | sort -z)
depends="python3 (>= $PYVER), python3 (<< $PYNEXT), iptables, libip4tc2, libip6tc2, libxtables12, kmod, procps"
for p in $(printf '%s\n' "${shlib_pkgs[@]}" | sort -u); do
    case "$p" in
        libc6) depends="$depends, libc6 (>= $glibc)" ;;
        libip4tc2|libip6tc2|libxtables12|iptables|kmod|procps) ;;
        *) depends="$depends, $p" ;;
    esac
done
case "$depends" in *libc6*) ;; *) depends="$depends, libc6 (>= $glibc)" ;; esac

INSTALLED_SIZE=$(du -sk --apparent-size --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<EOF
Package: $PKG
Version: $DEB_VERSION
Architecture: $ARCH
Maintainer: alpaca-tunnel developers <alpaca-tunnel@localhost>
Installed-Size: $INSTALLED_SIZE
Depends: $depends
Section: net
Priority: optional
Description: multi-peer mesh VPN daemon run by systemd
 Every host of a group runs the same daemon. Each daemon owns one TUN device
 and one UDP socket, routes packets by peer ID, encrypts them with a key
 shared per peer pair, and forwards datagrams through servers and forwarders,
 over several paths at once if asked to.
 .
 This package ships the daemon in a self-contained Python environment under
 $PREFIX, the systemd units alpaca-tunnel.service and
 alpaca-tunnel@.service, and an example configuration in
 /etc/alpaca-tunnel.d/. The service is not enabled: edit config.json and
 secrets.txt first, then run: systemctl enable --now alpaca-tunnel
EOF
printf '%s\n' /etc/alpaca-tunnel.d/config.json /etc/alpaca-tunnel.d/secrets.txt > "$STAGE/DEBIAN/conffiles"

cat > "$STAGE/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# alpaca-tunnel postinst: keep the keys and the group name private, tell systemd about the units.
# The service is NOT enabled or started: the shipped config holds example keys.
set -e
# private FILE MODE TIGHTER PREVIOUS_VERSION: on first install exactly root:root MODE;
# on an upgrade only chmod TIGHTER: never loosen an admin's choice
private() {
    [ -f "$1" ] || return 0
    if [ -z "$4" ]; then
        chown root:root "$1"
        chmod "$2" "$1"
    else
        chmod "$3" "$1"
    fi
}
if [ "$1" = configure ]; then
    private /etc/alpaca-tunnel.d/secrets.txt 0600 go-rwx "$2"
    # not a key, but it names the group, which hides the packet headers
    private /etc/alpaca-tunnel.d/config.json 0640 o-rwx "$2"
    # /run/xtables.lock now, not only at the next boot: the units need it to take the lock
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create alpaca-tunnel.conf >/dev/null 2>&1 || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
        if [ -n "$2" ]; then
            # upgrade: running instances pick up the new code; stopped ones stay stopped
            systemctl try-restart alpaca-tunnel.service 'alpaca-tunnel@*.service' >/dev/null 2>&1 || true
        fi
    fi
fi
exit 0
EOF
cat > "$STAGE/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# alpaca-tunnel prerm: stop the daemon (it restores routes and NAT) before its files go.
set -e
case "$1" in
    remove|deconfigure)
        if [ -d /run/systemd/system ]; then
            systemctl stop alpaca-tunnel.service 'alpaca-tunnel@*.service' >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
EOF
cat > "$STAGE/DEBIAN/postrm" <<EOF
#!/bin/sh
# alpaca-tunnel postrm: remove leftovers of the venv; on purge also the configuration.
set -e
case "\$1" in
    remove|purge)
        rm -rf $PREFIX                          # bytecode written at run time, if any
        ;;
esac
if [ "\$1" = purge ]; then
    rm -rf /etc/alpaca-tunnel.d
    rm -f /etc/systemd/system/*.wants/alpaca-tunnel.service \\
          /etc/systemd/system/*.wants/alpaca-tunnel@*.service
    rm -rf /run/alpaca-tunnel
fi
if [ "\$1" = remove ] || [ "\$1" = purge ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
fi
exit 0
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles"

(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/md5sums"
# same timestamps on every build of the same commit
find "$STAGE" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

DEB=$OUTDIR/${PKG}_${DEB_VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
say "built $DEB ($(du -h "$DEB" | cut -f1), installed $((INSTALLED_SIZE / 1024)) MiB)"
say "Depends: $depends"
echo "$DEB"
