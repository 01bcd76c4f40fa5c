#!/usr/bin/env bash
# Builds dist/homescale: the whole CLI frozen by PyInstaller into one linux
# executable that needs no Python on the target machine.
#
#   packaging/build-binary.sh            build unless dist/homescale is up to date
#   packaging/build-binary.sh --force    always build
#   packaging/build-binary.sh --check    exit 0 if up to date, 1 if not; build nothing
#
# HOMESCALE_DIST=DIR builds into DIR instead of dist/ (the reproducibility
# test builds a second copy there).
#
# Reproducible: two builds of one clean commit give the same bytes (checked by
# tests/packaging/test_binary.py).
# Writes dist/homescale, dist/homescale.version (the version string baked in)
# and dist/homescale.inputs (digest of everything the build read, for the
# up-to-date check).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
py=$venv/bin/python
pyinstaller=$venv/bin/pyinstaller
dist=${HOMESCALE_DIST:-$repo/dist}
# Per output directory, so a second build elsewhere does not share PyInstaller's
# work files with the first.
work=$repo/build/pyinstaller-$(printf '%s' "$dist" | sha256sum | cut -c1-8)

mode=build
case "${1:-}" in
  --force) mode=force ;;
  --check) mode=check ;;
  "") ;;
  *) echo "usage: $0 [--force|--check]" >&2; exit 2 ;;
esac

cd "$repo"
[ -x "$pyinstaller" ] || { echo "build-binary: $pyinstaller missing: run 'make' (pip install -e '.[build]')" >&2; exit 1; }

# The files the binary is made of. Untracked files count too: collect_submodules
# would bundle a new, not yet committed module.
sources=(appliance protocol netmap derp pyproject.toml packaging/entry.py
         packaging/homescale.spec packaging/build-binary.sh)

if git rev-parse --git-dir >/dev/null 2>&1; then
  commit=$(git rev-parse --short=12 HEAD)
  # The commit time, not the build time: every timestamp PyInstaller and the
  # zip/pyc writers honour then comes from the commit, so rebuilding it later
  # changes nothing.
  epoch=$(git log -1 --format=%ct HEAD)
  if [ -n "$(git status --porcelain -- "${sources[@]}")" ]; then dirty=.dirty; else dirty=; fi
else
  # A source tarball without .git: still buildable, just not traceable.
  commit=unknown; epoch=${SOURCE_DATE_EPOCH:-0}; dirty=
fi

upstream=$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' pyproject.toml)
# The build's full name (PEP 440 local version), recorded in
# dist/homescale.version; the .deb version is the part before "+".
version="$upstream+g$commit$dirty"

# Digest of the inputs: file contents, the commit (it is in the version) and
# the exact library versions in the venv (they are bundled).
inputs=$( {
  echo "version $version"
  # -c lists tracked files deleted in the work tree too: hash only what exists.
  git ls-files -z -co --exclude-standard -- "${sources[@]}" 2>/dev/null | sort -zu \
    | while IFS= read -r -d '' f; do if [ -f "$f" ]; then sha256sum "$f"; fi; done
  "$py" -m pip freeze --exclude-editable 2>/dev/null
} | sha256sum | cut -d' ' -f1)

# Several people (and their `make test`) may build in this tree at once:
# serialize builds per output directory; the second one then finds the first
# one's result up to date. (--check only reads.)
if [ "$mode" != check ]; then
  mkdir -p "$repo/build"
  exec 9>"$work.lock"
  flock 9
fi

uptodate=no
if [ -f "$dist/homescale" ] && [ "$(cat "$dist/homescale.inputs" 2>/dev/null)" = "$inputs" ]; then
  uptodate=yes
fi
if [ "$mode" = check ]; then
  [ "$uptodate" = yes ]; exit
fi
if [ "$mode" = build ] && [ "$uptodate" = yes ]; then
  echo "build-binary: $dist/homescale is up to date ($version)"
  exit 0
fi

# Two generated files, bundled but never written into the source tree (others
# may be editing it; a build must not dirty it):
# - appliance/_build.py, read by appliance/version.py: the release and the
#   commit, shown by `homescale version`;
# - a dist-info, so importlib.metadata knows "homescale" inside the binary
#   too. Written from pyproject.toml: the editable install's own dist-info
#   carries absolute build paths (direct_url.json) that would make the bytes
#   depend on where the tree is checked out.
rm -rf "$work"
mkdir -p "$work/meta" "$dist"
distinfo="$work/meta/homescale-$upstream.dist-info"
buildmod="$work/meta/_build.py"
mkdir -p "$distinfo"
"$py" - "$distinfo" "$buildmod" "$upstream" "${commit}${dirty:+-dirty}" <<'PY'
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

out, buildmod, version, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
lines = [
    "Metadata-Version: 2.1",
    f"Name: {project['name']}",
    f"Version: {version}",
    f"Summary: {project.get('description', '')}",
    f"Requires-Python: {project.get('requires-python', '')}",
]
(out / "METADATA").write_text("\n".join(lines) + "\n")
(out / "INSTALLER").write_text("pyinstaller\n")
buildmod.write_text(
    '"""Written by packaging/build-binary.sh into the frozen binary only."""\n'
    f"VERSION = {version!r}\nCOMMIT = {commit!r}\n"
)
PY

# Reproducibility, besides SOURCE_DATE_EPOCH:
# - PYTHONHASHSEED=0: module collection iterates sets; a random hash seed
#   reorders the archive.
# - umask 022 and a fixed TZ/locale: modes and any formatted date are the same
#   for every builder.
# - the bytecode is compiled here, not copied from __pycache__ (PyInstaller
#   compiles from source with its own timestamps).
export SOURCE_DATE_EPOCH=$epoch PYTHONHASHSEED=0 TZ=UTC LC_ALL=C.UTF-8
umask 022
export HOMESCALE_SRC=$repo HOMESCALE_DISTINFO=$distinfo HOMESCALE_BUILDMOD=$buildmod
# PyInstaller's cache (stripped copies of the libraries) defaults to
# ~/.cache/pyinstaller, shared by every build of every user of that HOME, and
# --clean empties it: a concurrent build elsewhere then loses files mid-build.
export PYINSTALLER_CONFIG_DIR=$work/pyinstaller-cache
# The hooks (collect_submodules) import our packages in a subprocess: make it
# see this tree, not whatever tree the venv's editable install points at.
export PYTHONPATH=$repo

echo "build-binary: building $dist/homescale $version"
start=$(date +%s)
"$pyinstaller" --noconfirm --clean --log-level WARN \
  --distpath "$work/out" --workpath "$work" packaging/homescale.spec
# PyInstaller stamps the file with the build time; give it the commit time so
# the .deb (which keeps mtimes) is reproducible too.
touch -d "@$epoch" "$work/out/homescale"
echo "$version" >"$work/out/homescale.version"
echo "$inputs" >"$work/out/homescale.inputs"
# Into place by rename: a test or a user running the old dist/homescale keeps
# its file; nobody sees a half-written one. The inputs digest goes last: it
# is what declares dist/ up to date.
for f in homescale homescale.version homescale.inputs; do
  cp -p "$work/out/$f" "$dist/.$f.new"
  mv -f "$dist/.$f.new" "$dist/$f"
done
echo "build-binary: $dist/homescale $(du -h "$dist/homescale" | cut -f1) in $(( $(date +%s) - start ))s ($version)"
