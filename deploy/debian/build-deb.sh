#!/usr/bin/env bash
# Builds the Debian package: target/debian/tunneler_<version>-1_<arch>.deb.
#
# The files cargo-deb packs that are not in the repository are made here
# first, from the release binary itself, so they never drift from it: the
# man pages (`tunneler manpages`, from the clap definitions), the shell
# completions (`tunneler completions`) and the systemd unit with the
# packaged binary's path. Then `cargo deb --no-build` packs them with the
# binary, the units, the example config and the maintainer scripts
# ([package.metadata.deb] in Cargo.toml). Needs cargo-deb
# (`cargo install cargo-deb --locked`).
set -euo pipefail

cd "$(dirname "$0")/../.."

cargo build --release --locked
bin=target/release/tunneler
out=target/deb-assets
rm -rf "$out"
mkdir -p "$out/man" "$out/completions" "$out/systemd"

# The man pages' date: the last commit's, so a rebuild gives the same pages.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)} \
    "$bin" manpages --out-dir "$out/man" >/dev/null
gzip -9n "$out"/man/*.1
"$bin" completions bash >"$out/completions/tunneler"
"$bin" completions zsh >"$out/completions/_tunneler"
"$bin" completions fish >"$out/completions/tunneler.fish"
# The repository's unit runs /usr/local/bin/tunneler (a hand install); the
# package's binary is /usr/bin/tunneler.
sed 's|/usr/local/bin/tunneler|/usr/bin/tunneler|g' deploy/systemd/tunneler.service >"$out/systemd/tunneler.service"
cp deploy/systemd/tunneler.socket "$out/systemd/tunneler.socket"
if grep -q /usr/local/bin "$out/systemd/tunneler.service"; then
    echo "build-deb: the packaged unit still names /usr/local/bin" >&2
    exit 1
fi

# One package in target/debian, this one (.ci/run installs what it finds).
rm -f target/debian/tunneler_*.deb
# The release profile keeps line tables (debug = 1) for profiling; the
# package ships the binary stripped.
cargo deb --no-build --locked --strip "$@"
