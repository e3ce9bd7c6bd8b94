#!/usr/bin/env bash
# Checks a built tunneler .deb on this machine: its contents, then installs
# it (dpkg -i), runs what an operator would, and purges it. Exits 1 on the
# first thing missing or wrong. Run as root, on a machine where the package
# may be installed and removed (CI).
#
# Usage: deploy/debian/check-deb.sh target/debian/tunneler_*.deb
set -euo pipefail

deb=${1:?usage: check-deb.sh PACKAGE.deb}
fail() {
    echo "check-deb: $*" >&2
    exit 1
}

# What the package must hold, before anything is installed: the binary, both
# units, the man page, the example config, the completions.
contents=$(dpkg-deb --contents "$deb" | awk '{print $NF}')
for f in \
    ./usr/bin/tunneler \
    ./usr/lib/systemd/system/tunneler.service \
    ./usr/lib/systemd/system/tunneler.socket \
    ./usr/share/man/man1/tunneler.1.gz \
    ./usr/share/man/man1/tunneler-streams.1.gz \
    ./usr/share/doc/tunneler/examples/tunneler.example.toml \
    ./usr/share/doc/tunneler/copyright \
    ./usr/share/bash-completion/completions/tunneler \
    ./usr/share/zsh/vendor-completions/_tunneler \
    ./usr/share/fish/vendor_completions.d/tunneler.fish; do
    grep -qxF "$f" <<<"$contents" || fail "$deb lacks $f"
done
dpkg-deb --info "$deb" postinst >/dev/null 2>&1 || fail "$deb has no postinst"

# A leftover install from an earlier, failed run would hide a broken one.
dpkg --purge tunneler >/dev/null 2>&1 || true
dpkg -i "$deb"
trap 'dpkg --purge tunneler >/dev/null 2>&1 || true' EXIT

want="tunneler $(dpkg-deb --field "$deb" Version | sed 's/-[^-]*$//')"
got=$(/usr/bin/tunneler --version)
[ "$got" = "$want" ] || fail "tunneler --version says '$got', want '$want'"
getent passwd tunneler >/dev/null || fail "postinst did not create the tunneler account"
[ -d /etc/tunneler/keys ] || fail "postinst did not create /etc/tunneler/keys"
[ "$(stat -c %U:%G:%a /etc/tunneler)" = "root:tunneler:750" ] ||
    fail "/etc/tunneler is $(stat -c %U:%G:%a /etc/tunneler), want root:tunneler:750"

units=/usr/lib/systemd/system
for u in tunneler.service tunneler.socket; do
    [ -f "$units/$u" ] || fail "$units/$u is not installed"
done
grep -qx 'ExecStart=/usr/bin/tunneler run --config /etc/tunneler/tunneler.toml' "$units/tunneler.service" ||
    fail "$units/tunneler.service does not run /usr/bin/tunneler"
# systemd-analyze verify reads unit files without a running systemd (PID 1
# here is not systemd, and it works). Where it cannot work at all, a
# trivial unit fails too: then it is skipped, saying so. Otherwise any
# complaint about ours fails, warnings included (it exits 0 on some).
probe=$(mktemp -d)
printf '[Service]\nType=oneshot\nExecStart=/bin/true\n' >"$probe/probe.service"
if systemd-analyze verify "$probe/probe.service" >/dev/null 2>&1; then
    verdict=$(systemd-analyze verify "$units/tunneler.socket" "$units/tunneler.service" 2>&1) ||
        fail "systemd-analyze verify refused the units: $verdict"
    [ -z "$verdict" ] || fail "systemd-analyze verify: $verdict"
else
    echo "check-deb: systemd-analyze verify does not work on this machine; units checked for presence and ExecStart only"
fi
rm -rf "$probe"

# Every man page renders without a warning (mandoc's lint), and man finds
# the main one. One warning is clap_mangen's and harmless: its lists of
# possible values put a .br next to a .sp, which mandoc drops ("skipping
# paragraph macro"); the page renders the same.
for page in /usr/share/man/man1/tunneler*.1.gz; do
    lint=$(mandoc -T lint -W warning "$page" 2>&1 |
        grep -Ev 'WARNING: skipping paragraph macro: br (before|after) sp$' || true)
    [ -z "$lint" ] || fail "mandoc -T lint: $lint"
done
man -l /usr/share/man/man1/tunneler.1.gz 2>/dev/null | grep -q 'tunneler' ||
    fail "man -l cannot render tunneler.1.gz"
MANPATH=/usr/share/man man -w tunneler >/dev/null || fail "man cannot find tunneler(1)"

/usr/bin/tunneler check-config --config /usr/share/doc/tunneler/examples/tunneler.example.toml ||
    fail "the installed example config does not validate"

dpkg --purge tunneler
trap - EXIT
[ ! -e /usr/bin/tunneler ] || fail "dpkg --purge left /usr/bin/tunneler"
[ ! -e "$units/tunneler.service" ] || fail "dpkg --purge left $units/tunneler.service"
echo "check-deb: $deb OK"
