#!/usr/bin/env bash
# Installs the real components the tests run against (OpenSSH sshd, rsync, Slurm, munge, the
# XRootD server and clients, gfal2 with its file/xrootd/http plugins and Python binding) from
# Debian when running as root and they are missing. Not root: says what is missing and goes on;
# the tests that need them skip loudly (and fail under CI=true).
set -euo pipefail
need=()
command -v /usr/sbin/sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || need+=(munge)
command -v logrotate >/dev/null 2>&1 || need+=(logrotate)
# grid storage (docs/grid.rst): two private XRootD servers, xrdcp/xrdfs, and gfal2 for the gfal method
command -v xrootd >/dev/null 2>&1 || need+=(xrootd-server)
command -v xrdcp >/dev/null 2>&1 && command -v xrdfs >/dev/null 2>&1 || need+=(xrootd-client)
command -v setfacl >/dev/null 2>&1 || need+=(acl)  # the XRootD fixture lets the xrootd user write the test trees
for pkg in gfal2 gfal2-plugin-file gfal2-plugin-xrootd gfal2-plugin-http python3-gfal2; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: not root; missing ${need[*]} (tests needing them will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get; install ${need[*]} by hand" >&2
    exit 0
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
