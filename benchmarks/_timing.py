"""One timed call, the same way in every benchmark: CUDA events on a CUDA device (the queue drained before
and after, so the time is the call's own), perf_counter elsewhere. Milliseconds."""
from __future__ import annotations

import time

import torch


def elapsed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
