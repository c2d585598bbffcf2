"""What every benchmark script ends with: a fixed-width table on stdout and the same rows as JSON."""
from __future__ import annotations

import json


def cell(value, fmt: str, width: int) -> str:
    """value formatted with `fmt` in `width` columns; None (not measured) is blank, not "nan"."""
    return " " * width if value is None else format(value, f">{width}{fmt}")


def print_table(rows: list[dict], columns: list[tuple[str, str, str, int]]) -> None:
    """columns: (header, key, format spec, width); each row a dict holding the keys (missing = None)."""
    print(" ".join(format(header, f">{width}") for header, _, _, width in columns))
    for row in rows:
        print(" ".join(cell(row.get(key), fmt, width) for _, key, fmt, width in columns))


def save_json(path: str | None, payload: dict) -> dict:
    """Writes payload to `path` when one is given (the --json option); returns it."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
    return payload
