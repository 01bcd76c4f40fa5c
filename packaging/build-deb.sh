#!/usr/bin/env bash
# Builds dist/homescale_<version>_amd64.deb around dist/homescale with plain
# dpkg-deb (no debhelper, no network). Prints the path of the .deb last.
#
# Environment:
#   DEB_VERSION     override the package version (default: pyproject version
#                   + "-1"); the upgrade test builds a second, newer package.
#   DEB_MAINTAINER  the Maintainer field.
#   DEB_OUTDIR      where to write the .deb (default: dist/).
#   DEB_USE_BUILT_BINARY=1  package dist/homescale without checking it is up to date.
# Layout of the package:
#   /usr/bin/homescale                       the frozen binary
#   /lib/systemd/system/homescale.service    systemd/homescale.service
#   /etc/homescale/config.yaml               conffile: the example with package paths
#   /usr/share/doc/homescale/                copyright, changelog.Debian.gz, README.md
#   /usr/share/man/man1/homescale.1.gz       debian/homescale.1
#   /usr/share/lintian/overrides/homescale   debian/lintian-overrides
#   DEBIAN/ control conffiles md5sums postinst prerm postrm  (from debian/)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
py=$venv/bin/python
cd "$repo"

# Reuses dist/homescale when it is up to date with the tree. DEB_USE_BUILT_BINARY=1
# packages dist/homescale as it is: the tests build the binary once per run and
# package that one, even if the shared tree moved on meanwhile.
if [ "${DEB_USE_BUILT_BINARY:-0}" = 1 ] && [ -f dist/homescale.version ]; then
  echo "build-deb: packaging dist/homescale $(cat dist/homescale.version) as built" >&2
else
  packaging/build-binary.sh >&2
fi

upstream=$(cut -d+ -f1 dist/homescale.version)
version=${DEB_VERSION:-$upstream-1}
maintainer=${DEB_MAINTAINER:-homescale maintainers <homescale@example.org>}
# One timestamp for every file and for dpkg-deb's archive members: the commit
# time build-binary.sh stamped on the binary. Same commit, same .deb bytes.
epoch=$(stat -c %Y dist/homescale)
export SOURCE_DATE_EPOCH=$epoch TZ=UTC LC_ALL=C.UTF-8
umask 022

# A private staging tree: two builds at once (make deb, the test's upgrade
# package) must not share it.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root/DEBIAN"
# mktemp made it 0700; it becomes "./" in the package.
chmod 0755 "$stage" "$root"

install -D -m 0755 dist/homescale "$root/usr/bin/homescale"
install -D -m 0644 systemd/homescale.service "$root/lib/systemd/system/homescale.service"

# The example config: wherever the project keeps it (package data first).
example=
for c in appliance/config-example.yaml config-example.yaml; do
  if [ -f "$c" ]; then example=$c; break; fi
done
[ -n "$example" ] || { echo "build-deb: no config-example.yaml found" >&2; exit 1; }
install -d -m 0750 "$root/etc/homescale"
"$py" packaging/deb-config.py "$example" "$root/etc/homescale/config.yaml" >&2
# Readable by the service's group (postinst sets it), not by everyone: admins
# add secrets here (OIDC client secret).
chmod 0640 "$root/etc/homescale/config.yaml"

doc=$root/usr/share/doc/homescale
install -d -m 0755 "$doc"
install -m 0644 debian/copyright "$doc/copyright"
install -m 0644 packaging/README-install.md "$doc/README.md"
changelog=$(cat debian/changelog)
top=$(sed -n '1s/^homescale (\([^)]*\)).*/\1/p' debian/changelog)
if [ "$top" != "$version" ]; then
  # A build whose version debian/changelog does not name (a development or
  # test build): a generated entry on top keeps the changelog and the package
  # version in agreement, as dpkg and lintian expect.
  commit=$(cut -d+ -f2 dist/homescale.version)
  changelog="homescale ($version) unstable; urgency=medium

  * Build of ${commit#g}.

 -- $maintainer  $(date -u -R -d "@$epoch")

$changelog"
fi
# -n: no name or time inside the gzip header (reproducible).
printf '%s\n' "$changelog" | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"

install -d -m 0755 "$root/usr/share/man/man1" "$root/usr/share/lintian/overrides"
gzip -9n <debian/homescale.1 >"$root/usr/share/man/man1/homescale.1.gz"
chmod 0644 "$root/usr/share/man/man1/homescale.1.gz"
# Warnings kept on purpose, each with its reason in the file.
install -m 0644 debian/lintian-overrides "$root/usr/share/lintian/overrides/homescale"

for s in postinst prerm postrm; do
  install -m 0755 "debian/$s" "$root/DEBIAN/$s"
done
install -m 0644 debian/conffiles "$root/DEBIAN/conffiles"

# Depends: the binary bundles every library except glibc and the zlib its
# bootloader links; the glibc version is the newest symbol version any bundled
# ELF file asks for (the build host's glibc may be newer than needed).
deps=$("$py" packaging/elf-deps.py dist/homescale)
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$installed_size/" \
    -e "s/@DEPENDS@/$deps/" -e "s/^Maintainer: .*/Maintainer: $maintainer/" \
    debian/control.in >"$root/DEBIAN/control"
chmod 0644 "$root/DEBIAN/control"

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
  | xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/md5sums"

# Every file and directory gets the commit time (dpkg-deb also clamps member
# times to SOURCE_DATE_EPOCH; this makes the installed mtimes stable too).
find "$root" -exec touch -h -d "@$epoch" {} +

outdir=${DEB_OUTDIR:-$repo/dist}
mkdir -p "$outdir"
deb=$outdir/homescale_${version}_amd64.deb
# --root-owner-group: files belong to root:root in the package whoever builds
# it. gzip, not dpkg's default xz: the binary is already compressed inside
# (xz saved 2% and took 12 s); named so a new default does not change bytes.
dpkg-deb --root-owner-group -Zgzip -z9 --build "$root" "$stage/out.deb" >&2
# Into place by rename: a concurrent build or install never reads half a file.
cp "$stage/out.deb" "$deb.new.$$"
mv -f "$deb.new.$$" "$deb"
echo "build-deb: wrote $deb"
