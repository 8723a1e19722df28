"""Where `vhost-user check` scores go for the README's table: ours (tests/kernel) and the
real peers' (tests/interop) merged into one JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCORES = Path(os.environ.get("VHOSTUSER_CHECK_SCORES", "/tmp/vhost-user-check-scores.json"))


def record_score(name: str, command: str, doc: dict[str, Any]) -> None:
    """Merge one run's score (``vhost-user check --json`` output) into :data:`SCORES`."""
    try:
        scores = json.loads(SCORES.read_text())
    except (OSError, ValueError):
        scores = {}
    scores[name] = {
        "command": command,
        "device": doc["device"],
        "summary": doc["summary"],
        "failed": {r["id"]: r["reason"] for r in doc["results"] if r["outcome"] == "FAIL"},
        "skipped": {r["id"]: r["reason"] for r in doc["results"] if r["outcome"] == "SKIP"},
    }
    SCORES.write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
