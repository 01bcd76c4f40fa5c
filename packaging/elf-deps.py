"""Prints the Debian Depends of the one-file binary: libc6 and zlib1g, versioned.

Usage: elf-deps.py dist/homescale

The binary carries its libraries inside (PyInstaller leaves out only glibc);
its bootloader links the system zlib. This opens the embedded archive, reads
every ELF file's needs with objdump, and fails if anything else outside the
bundle is needed -- that would be a missing Depends, caught at build time
instead of on a user's machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PyInstaller.archive.readers import CArchiveReader

# Sonames of glibc (package libc6) and of zlib (zlib1g).
GLIBC = re.compile(r"^(libc|libm|libdl|libpthread|librt|libutil|libresolv|ld-linux-x86-64)\.so")
ZLIB = "libz.so.1"
# zlib1g's version of the first zlib 1.2 ABI (the bootloader's inflate calls).
ZLIB_DEP = "zlib1g (>= 1:1.2.0)"


def needs(path: Path) -> tuple[set[str], set[tuple[int, ...]]]:
    out = subprocess.run(
        ["objdump", "-p", str(path)], capture_output=True, text=True, check=True
    ).stdout
    sonames = set(re.findall(r"NEEDED\s+(\S+)", out))
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_([0-9.]+)", out)}
    return sonames, versions


def main(argv: list[str]) -> int:
    binary = Path(argv[1])
    reader = CArchiveReader(str(binary))
    # The bootloader runs before anything is unpacked: all it links comes from
    # the system, bundled copies or not.
    boot_needed, glibc = needs(binary)
    needed: set[str] = set()
    bundled: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(reader.toc):
            data = reader.extract(name)
            if not isinstance(data, bytes) or not data.startswith(b"\x7fELF"):
                continue
            bundled.add(Path(name).name)
            f = Path(tmp) / str(i)
            f.write_bytes(data)
            sonames, versions = needs(f)
            needed |= sonames
            glibc |= versions
    outside = {s for s in (needed - bundled) | boot_needed if not GLIBC.match(s) and s != ZLIB}
    if outside:
        print(
            f"elf-deps: {binary} needs libraries neither bundled nor in Depends: "
            f"{', '.join(sorted(outside))}",
            file=sys.stderr,
        )
        return 1
    deps = [f"libc6 (>= {'.'.join(map(str, max(glibc)))})"]
    if ZLIB in boot_needed or (ZLIB in needed and ZLIB not in bundled):
        deps.append(ZLIB_DEP)
    print(", ".join(deps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
