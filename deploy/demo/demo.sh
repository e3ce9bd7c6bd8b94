#!/usr/bin/env bash
# tunneler demo: three network-namespace "nodes", each with a real OpenSSH
# sshd on port 22 and small test servers, and one tunneler daemon in front.
#
#   sudo deploy/demo/demo.sh          # runs until Ctrl-C
#   sudo deploy/demo/demo.sh --once   # exits right after the demo
#   deploy/demo/demo.sh --check-deps  # lists missing tools, installs nothing
#
# On Debian or Ubuntu, a missing tool (sshd, ssh-keygen, ip, python3, curl)
# is installed with apt-get first, the same packages .ci/run installs;
# elsewhere the script names what to install and stops.
#
# Addresses (slot 240 of the test range 10.200.0.0/14):
#   nodes    10.200.240.11-13 on bridge tnlbrdemo (host side 10.200.240.1)
#   pods     10.201.240.16/28, .32/28, .48/28 (pod address .17, .33, .49)
#   services 10.202.240.0/24 (10.202.240.11-13, one per node)
# Set TUNNELER_BIN to use a built binary instead of `cargo build --release`.
# Everything is removed on exit; deploy/demo/down.sh cleans up leftovers.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

once=0
check_deps=0
for arg in "$@"; do
    case "$arg" in
        --once) once=1 ;;
        --check-deps) check_deps=1 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

mapfile -t missing < <(demo_missing_tools)
if [ "$check_deps" -eq 1 ]; then
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "demo.sh: every tool the demo needs is installed"
        exit 0
    fi
    echo "demo.sh: missing: ${missing[*]}"
    echo "demo.sh: a run as root would install: ${DEMO_APT_PACKAGES[*]}"
    exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh needs root: it creates network namespaces and runs sshd" >&2
    exit 1
fi
if [ "${#missing[@]}" -gt 0 ]; then
    apt=$(command -v apt-get || true)
    if [ -z "$apt" ] || [ ! -x "$apt" ]; then
        echo "demo.sh: missing: ${missing[*]}." >&2
        echo "This is not a Debian or Ubuntu system (no apt-get), so demo.sh cannot install" >&2
        echo "them itself: install them with your package manager (the Debian package" >&2
        echo "names are in parentheses), then run it again." >&2
        exit 1
    fi
    printf '\n==> installing what the demo needs: %s is missing\n' "${missing[*]}"
    echo "    apt-get update && apt-get install -y ${DEMO_APT_PACKAGES[*]}"
    echo "    (the packages .ci/run installs; already installed ones are left as they are)"
    had_sshd_pkg=0
    dpkg -s openssh-server >/dev/null 2>&1 && had_sshd_pkg=1
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y "${DEMO_APT_PACKAGES[@]}"
    mapfile -t missing < <(demo_missing_tools)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "demo.sh: still missing after apt-get install: ${missing[*]}" >&2
        exit 1
    fi
    if [ "$had_sshd_pkg" -eq 0 ]; then
        # The demo runs its own sshd per namespace; the package's service is
        # another matter, and the operator should know it is there.
        echo "note: installing openssh-server may have started this host's own ssh service;"
        echo "      the demo does not need it (systemctl disable --now ssh stops it)."
    fi
fi

step() { printf '\n==> %s\n' "$*"; }

if [ -n "${TUNNELER_BIN:-}" ]; then
    bin=$TUNNELER_BIN
else
    step "building tunneler (cargo build --release --locked)"
    if command -v cargo >/dev/null 2>&1; then
        (cd "$repo" && cargo build --release --locked)
    elif [ -n "${SUDO_USER:-}" ] &&
        sudo -u "$SUDO_USER" -H bash -lc 'command -v cargo' >/dev/null 2>&1; then
        # rustup puts cargo on the user's PATH, not on root's under sudo.
        echo "    (as $SUDO_USER, whose login shell has cargo)"
        sudo -u "$SUDO_USER" -H bash -lc "cd '$repo' && cargo build --release --locked"
    else
        echo "demo.sh: cargo not found (for root${SUDO_USER:+ or $SUDO_USER}). Install Rust" >&2
        echo "(https://rustup.rs), or build first and pass the binary:" >&2
        echo "  cargo build --release && sudo TUNNELER_BIN=target/release/tunneler deploy/demo/demo.sh" >&2
        exit 1
    fi
    bin=$repo/target/release/tunneler
fi

# A previous run that was killed hard may have left things behind.
demo_cleanup

tmp=$(mktemp -d /tmp/tunneler-demo.XXXXXX)
mkdir -p "$DEMO_STATE" /run/sshd
echo "$tmp" > "$DEMO_STATE/tmpdir"
on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    echo
    echo "==> cleaning up"
    demo_cleanup
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

net=10.200.$DEMO_SLOT
pods=10.201.$DEMO_SLOT
svcs=10.202.$DEMO_SLOT

step "keys: client key from 'tunneler keygen', host keys from ssh-keygen"
"$bin" keygen --out "$tmp/id_ed25519" > "$tmp/keygen.out"
grep 'ssh-ed25519' "$tmp/keygen.out" > "$tmp/authorized_keys"
cat "$tmp/authorized_keys"
cp "$here/node-servers.py" "$tmp/node-servers.py"

# PerSourcePenalties (OpenSSH >= 9.8) would slow down reconnects after a
# restart; turn it off where this sshd knows it.
ssh-keygen -q -t ed25519 -N '' -C probe -f "$tmp/probe_key"
printf 'HostKey %s\nPerSourcePenalties no\n' "$tmp/probe_key" > "$tmp/probe_config"
penalties=""
if /usr/sbin/sshd -t -f "$tmp/probe_config" 2>/dev/null; then penalties="PerSourcePenalties no"; fi

step "network: bridge $DEMO_BRIDGE ($net.1/24) and $DEMO_NODES node namespaces"
ip link add "$DEMO_BRIDGE" type bridge
ip addr add "$net.1/24" dev "$DEMO_BRIDGE"
ip link set "$DEMO_BRIDGE" up
: > "$tmp/known_hosts"
for i in $(seq "$DEMO_NODES"); do
    ns=$(demo_ns "$i"); vh=$(demo_veth_host "$i"); vn=$(demo_veth_node "$i")
    node_ip=$net.$((10 + i)); pod_ip=$pods.$((16 * i + 1)); svc_ip=$svcs.$((10 + i))
    dir=$tmp/node-$i
    mkdir -p "$dir"
    ip netns add "$ns"
    ip link add "$vh" type veth peer name "$vn" netns "$ns"
    ip link set "$vh" master "$DEMO_BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$node_ip/24" dev "$vn"
    ip -n "$ns" link set "$vn" up
    ip -n "$ns" addr add "$pod_ip/32" dev lo
    ip -n "$ns" addr add "$svc_ip/32" dev lo

    ssh-keygen -q -t ed25519 -N '' -C "host-node-$i" -f "$dir/ssh_host_ed25519_key"
    echo "$node_ip $(cut -d' ' -f1,2 "$dir/ssh_host_ed25519_key.pub")" >> "$tmp/known_hosts"
    cat > "$dir/sshd_config" <<CFG
ListenAddress $node_ip
Port 22
HostKey $dir/ssh_host_ed25519_key
AuthorizedKeysFile $tmp/authorized_keys
PidFile $dir/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
PermitRootLogin prohibit-password
MaxStartups 100
$penalties
CFG
    ip netns exec "$ns" /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
    ip netns exec "$ns" python3 -u "$tmp/node-servers.py" "node-$i" 7000 8080 \
        > "$dir/servers.out" 2> "$dir/servers.log" &
    disown   # cleanup kills them through the namespace; no job noise
    echo "  node-$i: ns $ns, ssh $node_ip:22, pod $pod_ip, service $svc_ip"
done
for i in $(seq "$DEMO_NODES"); do
    for _ in $(seq 100); do grep -q ready "$tmp/node-$i/servers.out" && break; sleep 0.1; done
    grep -q ready "$tmp/node-$i/servers.out" || { cat "$tmp/node-$i/servers.log" >&2; exit 1; }
done

step "config: $tmp/tunneler.toml"
cat > "$tmp/tunneler.toml" <<CFG
[ssh]
user = "root"
identity_file = "id_ed25519"
known_hosts_file = "known_hosts"
port = 22
connect_timeout = "2s"
keepalive_interval = "1s"
keepalive_max = 3

[reconnect]
initial_backoff = "100ms"
max_backoff = "2s"

[proxy]
listen = ["unix://$tmp/egress.sock", "tcp://127.0.0.1:0"]
service_cidrs = ["$svcs.0/24"]
dial_timeout = "2s"
# A node's own address allows only its kubelet port unless listed here; the
# demo's nodes serve HTTP on 8080 instead.
node_ports = [8080]
# The demo's pod address is the first host address of each pod CIDR (.17,
# .33, .49), which proxy.pod_host_offsets treats as the node's own by
# default (a CNI bridge); here it is a pod.
pod_host_offsets = [0]

[admin]
socket = "$tmp/admin.sock"
CFG
for i in $(seq "$DEMO_NODES"); do
    printf '\n[[node]]\nname = "node-%s"\naddress = "%s"\npod_cidrs = ["%s"]\n' \
        "$i" "$net.$((10 + i))" "$pods.$((16 * i))/28" >> "$tmp/tunneler.toml"
done
cat "$tmp/tunneler.toml"
"$bin" check-config --config "$tmp/tunneler.toml"

step "starting: tunneler run (log: $tmp/tunneler.log)"
RUST_LOG=${RUST_LOG:-info} "$bin" run --config "$tmp/tunneler.toml" 2> "$tmp/tunneler.log" &
echo $! > "$DEMO_STATE/daemon.pid"
healthy=0
for _ in $(seq 150); do
    if "$bin" status --socket "$tmp/admin.sock" > /dev/null 2>&1; then healthy=1; break; fi
    kill -0 "$(cat "$DEMO_STATE/daemon.pid")" 2>/dev/null || break
    sleep 0.2
done
if [ "$healthy" -ne 1 ]; then
    echo "nodes did not become healthy within 30s; daemon log:" >&2
    tail -n 40 "$tmp/tunneler.log" >&2
    exit 1
fi

step "tunneler status --socket $tmp/admin.sock"
"$bin" status --socket "$tmp/admin.sock"

port=$(curl -sS --unix-socket "$tmp/admin.sock" http://localhost/v1/status |
    python3 -c 'import json,sys; print(next(l for l in json.load(sys.stdin)["listeners"] if l.startswith("tcp://")).rsplit(":", 1)[1])')

step "curl -sS -p -x http://127.0.0.1:$port http://$net.11:8080/"
curl -sS --max-time 10 -p -x "http://127.0.0.1:$port" "http://$net.11:8080/"

pod=$pods.$((16 * 2 + 1))
step "raw CONNECT $pod:7000 over $tmp/egress.sock (as kube-apiserver sends it)"
python3 - "$tmp/egress.sock" "$pod:7000" <<'PY'
import socket, sys
sock, target = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sock)
s.sendall(("CONNECT %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target).encode())
head = b""
while not head.endswith(b"\r\n\r\n"):
    b = s.recv(1)
    if not b:
        break
    head += b
print("<", head.decode().splitlines()[0] if head else "(no answer)")
s.sendall(b"hello through the tunnel\n")
print("<", s.makefile().readline().strip())
PY

pod3=$pods.$((16 * 3 + 1))
step "a client that stops reading a download from $pod3:7001, and tunneler streams"
# The flood server writes without end; this client reads nothing, so its
# stream's buffer fills and its drain holds the SSH session (HELD).
python3 - "$tmp/egress.sock" "$pod3:7001" "$tmp/stalled.ready" <<'PY' &
import socket, sys, time
sock, target, ready = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(sock)
s.sendall(("CONNECT %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target).encode())
open(ready, "w").write("sent")
time.sleep(30)
PY
stalled=$!
for _ in $(seq 50); do
    if "$bin" streams --socket "$tmp/admin.sock" --json 2>/dev/null | grep -q '"holds_session": true'; then break; fi
    sleep 0.2
done
"$bin" streams --socket "$tmp/admin.sock" --sort buffered
kill "$stalled" 2>/dev/null || true
wait "$stalled" 2>/dev/null || true
sleep 0.5
step "tunneler streams once it ended"
"$bin" streams --socket "$tmp/admin.sock"

step "the access log: one record per dial (target tunneler::access in $tmp/tunneler.log)"
grep 'tunneler::access' "$tmp/tunneler.log" || true

step "GET /v1/status on the admin socket"
curl -sS --unix-socket "$tmp/admin.sock" http://localhost/v1/status | python3 -m json.tool

if [ "$once" -eq 1 ]; then
    exit 0
fi
echo
echo "The demo is running. Try:"
echo "  curl -sS -p -x http://127.0.0.1:$port http://node-3:8080/"
echo "  $bin status --socket $tmp/admin.sock"
echo "  # take node-1 down (every sshd in its namespace), then watch status:"
echo "  for p in \$(ip netns pids $(demo_ns 1)); do grep -qx sshd /proc/\$p/comm && kill \$p; done"
echo "  # and bring it back:"
echo "  ip netns exec $(demo_ns 1) /usr/sbin/sshd -f $tmp/node-1/sshd_config -E $tmp/node-1/sshd.log"
echo "Ctrl-C stops and cleans up."
wait "$(cat "$DEMO_STATE/daemon.pid")" || true
