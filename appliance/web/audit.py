"""The console's audit log: who did what, when, and whether it worked.

One JSON object a line in `audit.jsonl` next to the database (it outlives restarts
and sessions; `tail` and `jq` read it), and the newest entries in memory for the
audit view. Each line is written before the answer goes back to the browser.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

KEEP = 500  # entries the audit view shows (the file keeps everything)
MAX_FILE = 64 << 20  # past this the file is rotated once to audit.jsonl.1


class AuditLog:
    def __init__(self, path: Path | None, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.recent: deque[dict[str, Any]] = deque(maxlen=KEEP)
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            with path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a torn last line from a crash: the rest still shows
                    if isinstance(entry, dict):
                        self.recent.append(entry)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warning("audit log %s cannot be read: %s", path, e)

    def record(self, who: str, action: str, target: str = "", outcome: str = "ok") -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "who": who,
            "action": action,
            "target": target,
            "outcome": outcome,
        }
        self.recent.append(entry)
        self.log.info("audit: %s %s %s: %s", who, action, target, outcome)
        if self.path is None:
            return
        try:
            if self.path.exists() and self.path.stat().st_size > MAX_FILE:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:  # the action happened; say that its record did not persist
            self.log.warning("audit log %s: %s (entry kept in memory only)", self.path, e)

    def entries(self) -> list[dict[str, Any]]:
        """Newest first."""
        return list(reversed(self.recent))
