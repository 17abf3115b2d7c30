"""The figures of every benchmark, gathered in benchmarks/results.json (one entry per benchmark)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results.json")


def record(name: str, figures: dict[str, Any]) -> None:
    """Stores `figures` under `name`, keeping the other benchmarks' entries, and prints them."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[name] = figures
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


def recorded(name: str) -> dict[str, Any]:
    """The figures last stored under `name` ({} if none): a benchmark that reruns some of its parts
    keeps the others."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    return results.get(name, {})
