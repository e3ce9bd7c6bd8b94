#!/usr/bin/env bash
# Removes whatever a demo run left behind: daemon, sshd and servers in the
# demo namespaces, the namespaces, veths, bridge and temp directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
if [ "$(id -u)" -ne 0 ]; then
    echo "down.sh needs root (it deletes network namespaces)" >&2
    exit 1
fi
demo_cleanup
echo "demo cleaned up"
