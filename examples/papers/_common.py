"""Helpers shared by the paper reproductions: result tables, the output folder, optional matplotlib plots."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"


def out_dir(override: str | os.PathLike | None = None) -> Path:
    """Where the plots go: `override`, $LORAKERN_PAPERS_OUT, or examples/papers/out (gitignored)."""
    path = Path(override or os.environ.get("LORAKERN_PAPERS_OUT") or OUT_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fmt(value) -> str:
    """A compact cell: ints as they are, floats with 4 significant digits, other things via str."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    """A plain-text table: the measured numbers next to the paper's claim."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("\n(plot skipped: matplotlib is not installed; `pip install matplotlib` to get the PNG)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, name: str, out: str | os.PathLike | None = None) -> Path:
    path = out_dir(out) / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nplot: {path}")
    return path


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with `n` intra-op threads, restoring the previous count afterwards.

    The synthetic reproductions multiply r x d matrices (r <= 20) thousands of times: with more than one
    thread the OpenMP fork/join costs more than the product, and on a busy machine a 2-thread barrier can
    stall a 10-microsecond GEMM for tens of milliseconds (measured: 8 x 100 @ 100 x 100 took 24 ms with 2
    threads while another process held a core, 8 us with 1)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(main, doc: str) -> None:
    """The command line every reproduction script shares: --quick and --out, then main(quick, out)."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    parser.add_argument("--out", default=None, help="folder for the PNG (default examples/papers/out)")
    args = parser.parse_args()
    main(quick=args.quick, out=args.out)


def begin(title: str, quick: bool) -> float:
    """The start of every script's main: its title printed; returns the start time for finish()."""
    print(title + (" [quick]" if quick else ""))
    return time.perf_counter()


def finish(res: dict, plot_path, start: float, name: str) -> dict:
    """The end of every script's main: the figure's path and the wall time go into the results, printed."""
    res["plot"] = plot_path
    res["seconds"] = time.perf_counter() - start
    print(f"\n{name}: {res['seconds']:.1f} s")
    return res
