"""Entry point of the frozen `homescale` binary (PyInstaller runs this file).

It is the console script `homescale = appliance.cli:main`, as a file: PyInstaller
needs a script, not an entry-point name.
"""

from __future__ import annotations

import sys

from appliance.cli import main

if __name__ == "__main__":
    # main() may return an exit code or call sys.exit itself; both end here.
    sys.exit(main())
