#!/usr/bin/env bash
# Installs the Debian packages the test suite uses, when missing and when root.
# Each package serves a test tier (tests/tiers.py). A package still missing
# afterwards (not root, or apt-get failed) is an error under
# HOMESCALE_REQUIRE_ALL=1 naming its tier; otherwise the tier's tests skip with
# the reason.
set -u
. "$(dirname "$0")/../tests/tiers.sh"
# package:command:tier
want=(
  iproute2:ip:realclient
  util-linux:unshare:realclient
  debootstrap:debootstrap:chroot-install
  lintian:lintian:packaging
  dpkg-dev:dpkg-deb:packaging
  binutils:objdump:packaging
  systemd:systemd-analyze:packaging
  nodejs:node:idp
  npm:npm:idp
  chromium:chromium:browser
  pebble:pebble:acme
)
missing_pkgs() {
  local pair pkg rest cmd
  for pair in "${want[@]}"; do
    pkg=${pair%%:*}; rest=${pair#*:}; cmd=${rest%%:*}
    command -v "$cmd" >/dev/null 2>&1 || echo "$pair"
  done
}
missing=$(missing_pkgs)
[ -z "$missing" ] && exit 0
pkgs=$(printf '%s\n' "$missing" | cut -d: -f1 | tr '\n' ' ')
if [ "$(id -u)" != 0 ]; then
  why="not root, cannot apt-get install"
else
  echo "sysdeps: installing $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  if apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; then
    why="installed, but the command is still not on PATH ($PATH)"
  else
    why="apt-get install failed"
  fi
  missing=$(missing_pkgs)
  [ -z "$missing" ] && exit 0
fi
# Each tier with something missing, with its packages (under
# HOMESCALE_REQUIRE_ALL=1 the first one ends the script with an error).
for tier in $(printf '%s\n' "$missing" | cut -d: -f3 | sort -u); do
  these=$(printf '%s\n' "$missing" | awk -F: -v t="$tier" '$3 == t {printf "%s%s (%s)", sep, $1, $2; sep=", "}')
  tier_unavailable "$tier" "Debian packages missing: $these; $why"
done
exit 0
