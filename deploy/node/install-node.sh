#!/bin/sh
# Prepares one node for tunneler: creates the `tunneler` account, installs the
# authorized_keys line and the sshd drop-in, validates sshd's configuration and
# reloads sshd. Run as root on the node; safe to run again (it converges).
#
#   install-node.sh --pubkey id_ed25519.pub [--permit-open "HOST:PORT ..."]
#
#   --pubkey FILE       tunneler's public key (`tunneler keygen` writes FILE.pub).
#                       Replaces the account's authorized_keys with every key in
#                       FILE (two during a key rotation). A plain key gets
#                       restrict,port-forwarding,permitopen="..."(one per
#                       destination),command="/bin/false" in front; a line that
#                       already starts with options is kept as it is.
#   --permit-open LIST  the destinations, e.g. "127.0.0.1:10250 127.0.0.1:10248"
#                       (with node_local_via_loopback), "10.0.0.11:10250" or
#                       "any". Goes into the drop-in's PermitOpen line and into
#                       the keys' permitopen options (none for "any"). Default:
#                       the drop-in's PermitOpen line, "*:10250 127.0.0.1:10248".
#   --user NAME         account name (default tunneler; must match [ssh] user).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
user=tunneler
pubkey=
permit_open=
dropin_dir=/etc/ssh/sshd_config.d

die() { echo "install-node.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --pubkey) [ $# -ge 2 ] || die "--pubkey needs a file"; pubkey=$2; shift 2 ;;
        --permit-open) [ $# -ge 2 ] || die "--permit-open needs a list"; permit_open=$2; shift 2 ;;
        --user) [ $# -ge 2 ] || die "--user needs a name"; user=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -n "$pubkey" ] || die "--pubkey is required"
[ -r "$pubkey" ] || die "cannot read $pubkey"
sshd=$(command -v sshd || echo /usr/sbin/sshd)
[ -x "$sshd" ] || die "sshd not found; install openssh-server first"
grep -qE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d/\*\.conf' /etc/ssh/sshd_config ||
    die "/etc/ssh/sshd_config does not Include /etc/ssh/sshd_config.d/*.conf; add that line at its top"

# The destinations: --permit-open, else the drop-in's own PermitOpen line.
if [ -z "$permit_open" ]; then
    permit_open=$(sed -n 's/^    PermitOpen //p' "$here/sshd_config.d/tunneler.conf" | head -n 1)
    [ -n "$permit_open" ] || die "no PermitOpen line in $here/sshd_config.d/tunneler.conf"
fi
# The same list as authorized_keys options. sshd allows a channel only when
# both the key's permitopen options and the drop-in's PermitOpen allow it, so
# the key stays limited even if the drop-in is lost or overridden.
# "any" (full cluster: pod and service CIDRs) cannot be written as options.
key_opts='restrict,port-forwarding'
set -f  # `*:10250` is a destination, not a file name pattern
for dest in $permit_open; do
    case "$dest" in
        any) key_opts='restrict,port-forwarding'; break ;;
        none) die "--permit-open none would refuse every channel" ;;
        *:*) key_opts="$key_opts,permitopen=\"$dest\"" ;;
        *) die "--permit-open: $dest is not HOST:PORT or any" ;;
    esac
done
set +f
key_opts="$key_opts,command=\"/bin/false\""

# Every key line in FILE is installed (two during a key rotation, see
# keys/README.md). A plain key gets the restrictions put in front of it.
keys=$(grep -vE '^[[:space:]]*(#|$)' "$pubkey" | while IFS= read -r line; do
    case "$line" in
        *PRIVATE*) echo "install-node.sh: $pubkey looks like a private key; pass the .pub file" >&2; exit 1 ;;
        ssh-*|ecdsa-*|sk-*) printf '%s %s\n' "$key_opts" "$line" ;;
        *) printf '%s\n' "$line" ;;
    esac
done) || exit 1
[ -n "$keys" ] || die "no key in $pubkey"

# 1. The account: no password, no usable shell. The password field is set to
#    `*` rather than left locked (`!`): with `UsePAM no`, sshd refuses even
#    public-key logins to locked accounts.
nologin=$(command -v nologin || echo /usr/sbin/nologin)
if ! id "$user" >/dev/null 2>&1; then
    useradd --system --user-group --create-home --home-dir "/var/lib/$user" \
        --shell "$nologin" --comment "tunneler SSH tunnels" "$user"
fi
usermod -p '*' "$user"
home=$(getent passwd "$user" | cut -d: -f6)
[ -n "$home" ] && [ "$home" != / ] || die "$user has no usable home directory"
[ -d "$home" ] || install -d -o "$user" -g "$(id -g "$user")" -m 0755 "$home"

# 2. The key. root owns .ssh and authorized_keys so the account cannot change them.
install -d -o root -g root -m 0755 "$home/.ssh"
tmp=$(mktemp "$home/.ssh/authorized_keys.XXXXXX")
printf '%s\n' "$keys" >"$tmp"
chown root:root "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$home/.ssh/authorized_keys"

# 3. The sshd drop-in, with the account name and PermitOpen filled in.
install -d -m 0755 "$dropin_dir"
tmp=$(mktemp "$dropin_dir/.tunneler.conf.XXXXXX")
sed -e "s/^Match User tunneler\$/Match User $user/" "$here/sshd_config.d/tunneler.conf" >"$tmp"
sed -i -e "s/^    PermitOpen .*/    PermitOpen $permit_open/" "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$dropin_dir/tunneler.conf"

# 4. Validate before reloading: a broken sshd config must never reach a reload.
"$sshd" -t || die "sshd -t failed; fix $dropin_dir/tunneler.conf before reloading sshd"
effective=$("$sshd" -T -C "user=$user,host=tunneler-check,addr=127.0.0.1")
echo "$effective" | grep -qx 'forcecommand /bin/false' ||
    die "the drop-in is not in effect for $user (an earlier Match block may win); check: sshd -T -C user=$user,host=x,addr=127.0.0.1"
echo "$effective" | grep -E '^(allowtcpforwarding|permitopen|forcecommand) '

# 5. Reload (not restart): established sessions, including live tunnels, stay up.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet ssh 2>/dev/null; then
    systemctl reload ssh
elif command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet sshd 2>/dev/null; then
    systemctl reload sshd
else
    echo "install-node.sh: sshd is not running as ssh.service or sshd.service; reload it yourself (SIGHUP to the listener)" >&2
fi
echo "install-node.sh: $user is ready on $(hostname)"
