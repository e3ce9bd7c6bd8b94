# Shared by demo.sh and down.sh: names and the cleanup routine.
# shellcheck shell=bash

DEMO_NODES=3
# shellcheck disable=SC2034 # used by demo.sh
DEMO_SLOT=240
DEMO_BRIDGE=tnlbrdemo
DEMO_STATE=/run/tunneler-demo

# What the demo runs, and the Debian/Ubuntu package that provides it.
DEMO_TOOLS=(
    "ip:iproute2"
    "/usr/sbin/sshd:openssh-server"
    "ssh-keygen:openssh-client"
    "python3:python3"
    "curl:curl"
)
# Installed when any tool is missing: the list .ci/run installs for the
# tests (tests/docs.rs keeps the two equal), so a machine that ran the demo
# can run the test suite too.
# shellcheck disable=SC2034 # used by demo.sh
DEMO_APT_PACKAGES=(openssh-server openssh-client iproute2 socat curl python3 procps openssl util-linux)

# Prints "TOOL (PACKAGE)" for every tool the demo needs and cannot find.
demo_missing_tools() {
    local pair tool
    for pair in "${DEMO_TOOLS[@]}"; do
        tool=${pair%%:*}
        if [ "${tool#/}" != "$tool" ]; then
            [ -x "$tool" ] && [ -f "$tool" ] && continue
        else
            command -v "$tool" >/dev/null 2>&1 && continue
        fi
        echo "$tool (${pair#*:})"
    done
}

demo_ns() { echo "tnldemo-$1"; }
demo_veth_host() { echo "tvdemoh$1"; }
demo_veth_node() { echo "tvdemon$1"; }

# Removes everything the demo may have created. Safe to run repeatedly and
# when nothing is there.
demo_cleanup() {
    local i ns pid tmp
    if [ -f "$DEMO_STATE/daemon.pid" ]; then
        pid=$(cat "$DEMO_STATE/daemon.pid")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    for i in $(seq "$DEMO_NODES"); do
        ns=$(demo_ns "$i")
        if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns"; then
            # sshd (listener and children) and the python servers.
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                kill -KILL "$pid" 2>/dev/null || true
            done
            ip netns del "$ns" 2>/dev/null || true
        fi
        ip link del "$(demo_veth_host "$i")" 2>/dev/null || true
    done
    ip link del "$DEMO_BRIDGE" 2>/dev/null || true
    if [ -f "$DEMO_STATE/tmpdir" ]; then
        tmp=$(cat "$DEMO_STATE/tmpdir")
        case "$tmp" in
            /tmp/tunneler-demo.*) rm -rf "$tmp" ;;
        esac
    fi
    rm -rf "$DEMO_STATE"
}
