#!/usr/bin/env bash
# Runs a command inside a fresh network namespace of its own: loopback plus one
# dead-end veth (Tailscale clients treat a loopback-only host as offline and
# never dial; the default route leads to 10.203.0.2, where nothing answers).
# Nothing inside can reach any address off this machine. Tests that start real
# clients require HOMESCALE_TEST_NETNS=1, which only this script sets.
#
# No namespace (not root, or unshare refused): an error under
# HOMESCALE_REQUIRE_ALL=1 (tier realclient); otherwise the command runs without
# one and the real-client tests skip with the reason.
set -euo pipefail
. "$(dirname "$0")/tiers.sh"
if [ "$(id -u)" != 0 ]; then
  why="not root (unshare -n needs root)"
elif ! err=$(unshare -n true 2>&1); then
  why="unshare -n failed: ${err:-no message}"
else
  exec unshare -n bash -c '
    set -e
    ip link set lo up
    ip link add hs0 type veth peer name hs1
    ip addr add 10.203.0.1/24 dev hs0
    ip link set hs0 up; ip link set hs1 up
    ip route add default via 10.203.0.2 dev hs0
    export HOMESCALE_TEST_NETNS=1
    exec "$@"' bash "$@"
fi
tier_unavailable realclient "cannot create a network namespace: $why"
exec "$@"
