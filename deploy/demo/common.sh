# Shared by demo.sh and down.sh: names and the cleanup routine.
# shellcheck shell=bash

DEMO_NODES=3
DEMO_SLOT=240
DEMO_BRIDGE=tnlbrdemo
DEMO_STATE=/run/tunneler-demo

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
