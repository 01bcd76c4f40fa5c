#!/usr/bin/env bash
# Installs the Debian packages the test suite uses, when missing and when root.
# Non-root: prints what is missing; the tests that need it skip with that reason.
set -u
want=(iproute2:ip util-linux:unshare curl:curl debootstrap:debootstrap lintian:lintian dpkg-dev:dpkg-deb binutils:objdump systemd:systemd-analyze)
missing=()
for pair in "${want[@]}"; do
  pkg=${pair%%:*}; cmd=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "sysdeps: not root; missing Debian packages: ${missing[*]} (tests needing them will skip)"
  exit 0
fi
echo "sysdeps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || echo "sysdeps: apt-get install failed for ${missing[*]}"
exit 0
