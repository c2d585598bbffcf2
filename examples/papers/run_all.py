"""Run every paper reproduction in this folder (each script with a `main(quick)`), then print the total time.

    python examples/papers/run_all.py [--quick] [--only NAME ...]

Scripts are found by name: every *.py here except run_all.py and the _private helpers, in alphabetical
order, so a new reproduction is picked up by dropping it into the folder. Plots go to examples/papers/out/.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem != "run_all" and not p.stem.startswith("_"))


def main(quick: bool = False, only: list[str] | None = None, out=None) -> dict[str, float]:
    sys.path.insert(0, str(HERE))
    names = scripts()
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"unknown script(s) {unknown}; available: {names}")
        names = [n for n in names if n in only]
    times, failed = {}, []
    start = time.perf_counter()
    for name in names:
        print(f"\n{'=' * 100}\n{name}\n{'=' * 100}")
        t0 = time.perf_counter()
        try:
            importlib.import_module(name).main(quick=quick, out=out)
        except Exception:  # report every script, then fail at the end
            traceback.print_exc()
            failed.append(name)
        times[name] = time.perf_counter() - t0
    total = time.perf_counter() - start
    print(f"\n{'=' * 100}")
    for name, secs in times.items():
        print(f"{name:40s} {secs:7.1f} s{'   FAILED' if name in failed else ''}")
    print(f"{'total':40s} {total:7.1f} s")
    if failed:
        raise SystemExit(f"failed: {failed}")
    return times


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds per script)")
    parser.add_argument("--only", nargs="*", help="run only these scripts (file names without .py)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default examples/papers/out)")
    args = parser.parse_args()
    main(quick=args.quick, only=args.only, out=args.out)
