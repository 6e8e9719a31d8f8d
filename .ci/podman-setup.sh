#!/usr/bin/env bash
# CI: podman for the container tests (tests/test_container.py), as root on a fresh machine.
# On the CI machines podman works only with runc (crun fails on setrlimit and on "cgroups in
# hybrid mode"), the cgroupfs manager (no systemd session) and default ulimits below the host's
# hard limits (podman's defaults exceed them). That is this machine's setup, not Tether's: Tether
# passes the endpoint's `container.options` to podman as they are.
set -euo pipefail

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v podman >/dev/null 2>&1 || ! { command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ]; }; then
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc
fi

nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
limit() {  # at most 4096, and never above the host's hard limit
  local hard=$1
  if [ "$hard" = unlimited ] || [ "$hard" -gt 4096 ]; then echo 4096; else echo "$hard"; fi
}
$SUDO mkdir -p /etc/containers
conf=/etc/containers/containers.conf
if ! grep -q "tether-ci" "$conf" 2>/dev/null; then
  if [ -f "$conf" ]; then $SUDO cp "$conf" "$conf.before-tether-ci"; fi
  $SUDO tee "$conf" >/dev/null <<CONF
# written by tether's .ci/podman-setup.sh (tether-ci)
[containers]
default_ulimits = ["nofile=$(limit "$nofile"):$(limit "$nofile")", "nproc=$(limit "$nproc"):$(limit "$nproc")"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi

# a smoke test that says what is wrong here rather than in the middle of a test
$SUDO podman info >/dev/null
