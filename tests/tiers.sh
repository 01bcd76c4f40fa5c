# Sourced by the set-up scripts of the test tiers (tests/tiers.py names them):
# tests/in-netns.sh, tests/fetch-realclient.sh, packaging/sysdeps.sh,
# packaging/prepare-testroot.sh.
#
# tier_unavailable TIER REASON: a set-up step failed. Under HOMESCALE_REQUIRE_ALL=1
# (.ci/run sets it; the Makefile sets it when CI=true) that is an error naming the
# tier, and the script exits 1 so CI goes red; otherwise the script says which
# tests will skip and why, and goes on.
tier_unavailable() {
  local tier=$1 reason=$2 who
  who=$(basename "$0")
  if [ "${HOMESCALE_REQUIRE_ALL:-}" = 1 ]; then
    echo "$who: ERROR: tier $tier cannot be set up: $reason (HOMESCALE_REQUIRE_ALL=1: CI requires every tier)" >&2
    exit 1
  fi
  echo "$who: tier $tier unavailable: $reason; its tests will skip" >&2
}
