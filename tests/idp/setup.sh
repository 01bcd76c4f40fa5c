#!/usr/bin/env bash
# Installs the test OpenID provider (npm's oidc-provider, pinned by
# package-lock.json) into tests/idp/node_modules; node and npm come from Debian
# (packaging/sysdeps.sh installs them).
# Prints nothing when already installed. Tier idp (tests/tiers.py): a failure is
# an error under HOMESCALE_REQUIRE_ALL=1, otherwise the OIDC tests skip.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../tiers.sh"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  tier_unavailable idp "node/npm missing (apt-get install nodejs npm; make sysdeps does)"
  exit 0
fi
stamp=$here/node_modules/.homescale-installed
[ -f "$stamp" ] && [ "$stamp" -nt "$here/package-lock.json" ] && exit 0
if ! (cd "$here" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
  tier_unavailable idp "npm ci in tests/idp failed"
  exit 0
fi
touch "$stamp"
