#!/usr/bin/env bash
# Prepares, once, the clean Debian root the .deb test installs into
# (tests/packaging/test_deb.py). It needs the network, so the Makefile runs it
# *before* entering the test network namespace; the test itself only copies
# the cached root and installs the local .deb, offline.
#
# The root lives outside the repo (it is ~200 MB and root-owned) and is reused
# between runs. Delete the directory to rebuild it.
#
# Not root, no debootstrap, or debootstrap failed: an error under
# HOMESCALE_REQUIRE_ALL=1 (tier chroot-install, see tests/tiers.py); otherwise
# say why and exit 0 -- the test then skips with the reason, so `make test`
# still runs everything else.
set -euo pipefail
. "$(dirname "$0")/../tests/tiers.sh"

# Keep this default in step with tests/packaging/conftest.py (TESTROOT_DEFAULT).
root=${HOMESCALE_TESTROOT:-/var/cache/homescale-test/bookworm-root}
suite=bookworm
# The machine's own mirror (deb.debian.org unless overridden); the root only
# ever installs local files afterwards, so the mirror only matters here.
mirror=${HOMESCALE_TESTROOT_MIRROR:-http://deb.debian.org/debian}
# The marker is written last: a root without it is a half-finished debootstrap
# (interrupted run) and is thrown away rather than trusted.
marker="$root/.homescale-testroot-complete"

if [ -f "$marker" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  tier_unavailable chroot-install "not root (debootstrap and chroot need root)"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  tier_unavailable chroot-install "debootstrap missing (apt-get install debootstrap)"
  exit 0
fi

echo "prepare-testroot: debootstrap --variant=minbase $suite into $root (once; about a minute)"
tmp="$root.partial"
rm -rf "$tmp"
mkdir -p "$(dirname "$root")"
# minbase = Priority: required + apt. The .deb must install on exactly this, so
# nothing is added here: an undeclared dependency would then show up as a
# failed install in the test instead of hiding in a fatter root.
if ! debootstrap --variant=minbase "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1; then
  # Do not leave a root that later runs might mistake for a usable one.
  rm -rf "$tmp"
  tier_unavailable chroot-install "debootstrap $suite from $mirror failed (no network?); see $tmp.log"
  exit 0
fi
rm -f "$tmp.log"
# Make the root smaller to copy per test: downloaded .debs and package lists
# are not needed to install a local .deb with dpkg/apt.
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
rm -rf "$root"
mv "$tmp" "$root"
date -u +%FT%TZ >"$marker"
echo "prepare-testroot: ready: $root"
