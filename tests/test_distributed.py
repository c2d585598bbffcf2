"""LoRALinear, the optimizers and spectral_init under torch.distributed: 2 CPU processes on gloo.

One spawn (module fixture) runs every scenario and saves what each rank ends with; the tests compare that with
single-process runs on the same global batch. The model is a tiny residual MLP in float64, so that the only
difference between the runs is the order of floating-point sums (per-rank means averaged by the all-reduce vs
one mean over the global batch): about 1e-16 relative per gradient. Adam's update m / sqrt(v) is invariant to
the gradient's scale, so a relative perturbation of the gradients moves the update by the same relative
amount (the gradients here are ~1e-2, far above eps = 1e-8, so eps does not amplify it) and the adapters
after STEPS steps agree to ~1e-15; TOL = 1e-10 leaves five orders of margin while catching any real error (a
missing average, a rank that skips a step, a wrongly sharded preconditioner: all >= 1e-3).
"""
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lorakern as lk
from conftest import rel_err

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
TOL = 1e-10
LR = 1e-2


class Block(nn.Module):
    def __init__(self, d=16, h=24):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))  # out of place: FSDP2's hooks need the fresh tensor


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(zero_b: bool = False) -> TinyNet:
    """The same model on every process. Non-zero B (unless zero_b), so both factors train from step 1."""
    torch.manual_seed(0)
    model = TinyNet().double()
    lk.apply_lora(model, r=4, alpha=8, exclude=())
    if not zero_b:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for m in lk.lora_modules(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64) * 0.1)
    return model


def global_batches(n=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=g, dtype=torch.float64),
             torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64)) for _ in range(n)]


def rank_share(batch, rank):
    per = GLOBAL_BATCH // WORLD
    return tuple(t[rank * per:(rank + 1) * per] for t in batch)


def loss_fn(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def make_optimizer(model, name):
    if name == "padamw":
        return lk.optim.PreconditionedAdamW(model, lr=LR)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def train(model, opt, batches, after_backward=None):
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        if after_backward is not None:
            after_backward()
        opt.step()


def full(t):
    """The whole tensor of a parameter (FSDP2 holds DTensor shards)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def adapters(model):
    return {n.removeprefix("module."): (full(m.lora_A), full(m.lora_B)) for n, m in lk.lora_modules(model).items()}


# -- the scenarios, run on every rank ---------------------------------------------------------------------------
def run_ddp(rank, opt_name):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(make_model())
    opt = make_optimizer(model, opt_name)  # the wrapper itself: its LoRALinear pairs are found through it
    train(model, opt, [rank_share(b, rank) for b in global_batches()])
    return adapters(model)


def _fsdp2(model, ignored=None):
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def run_fsdp2(rank, opt_name):
    model = _fsdp2(make_model())
    opt = make_optimizer(model, opt_name)
    train(model, opt, [rank_share(b, rank) for b in global_batches()])
    return adapters(model)


def run_fsdp2_replicated_adapters(rank, opt_name):
    """FSDP2 shards the frozen base only; the adapters stay whole on every rank (ignored_params) and their
    gradients are averaged by hand, as DDP would: the preconditioner then sees plain tensors."""
    model = make_model()
    factors = [p for m in lk.lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    _fsdp2(model, ignored=set(factors))
    opt = make_optimizer(model, opt_name)

    def average_adapter_grads():
        for p in factors:
            dist.all_reduce(p.grad)
            p.grad.div_(WORLD)

    train(model, opt, [rank_share(b, rank) for b in global_batches()], after_backward=average_adapter_grads)
    return adapters(model)


def run_spectral_init_ddp(rank, _):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(make_model(zero_b=True))
    lk.spectral_init(model, [rank_share(b, rank) for b in global_batches(4)], loss_fn, progress=False)
    return adapters(model)


def run_spectral_init_onepass_ddp(rank, _):
    model = make_model(zero_b=True)
    res = lk.spectral_init(model, [rank_share(b, rank) for b in global_batches(4)], loss_fn, mode="onepass",
                           sketch_size=6, progress=False, error_tol=float("inf"))
    return adapters(model), res.errors


def run_layout_mismatch(rank, case):
    """Rank 1 holds another LoRA layout; every rank must raise (none may hang in a collective)."""
    model = make_model(zero_b=True)
    if case == "no_layers" and rank == 1:
        lk.remove_lora(model, merge=False)
    elif case == "merged" and rank == 1:
        lk.merge_lora(model)
    batches = [rank_share(global_batches(1)[0], rank)]
    try:
        if case == "capture_gradients":
            if rank == 1:  # another rank r on one layer
                model.head = lk.LoRALinear.from_linear(model.head.to_linear(), r=2)
            lk.capture_gradients(model, batches, loss_fn)
        else:
            lk.spectral_init(model, batches, loss_fn, mode="exact", progress=False)
    except ValueError as exc:
        return str(exc)
    return "no error"


class _ShufflingOnRank1:
    """Re-iterable batches that come in another order on each pass, on rank 1 only."""

    def __init__(self, batches, rank):
        self.batches, self.rank, self.passes = batches, rank, 0

    def __iter__(self):
        self.passes += 1
        order = self.batches[::-1] if self.rank == 1 and self.passes % 2 == 0 else self.batches
        return iter(order)


def run_data_differs_on_one_rank(rank, _):
    """The sketch's passes see other data on rank 1 only: every rank must raise, not only rank 1 (the others
    would wait in the next pass's all-reduce)."""
    model = make_model(zero_b=True)
    batches = _ShufflingOnRank1([rank_share(b, rank) for b in global_batches(3)], rank)
    try:
        lk.spectral_init(model, batches, loss_fn, mode="sketch", progress=False)
    except ValueError as exc:
        return str(exc)
    return "no error"


SCENARIOS = [(run_ddp, "padamw"), (run_ddp, "adamw"), (run_fsdp2, "adamw"), (run_fsdp2, "padamw"),
             (run_fsdp2_replicated_adapters, "padamw"), (run_spectral_init_ddp, ""),
             (run_spectral_init_onepass_ddp, ""),
             (run_layout_mismatch, "no_layers"), (run_layout_mismatch, "merged"),
             (run_layout_mismatch, "capture_gradients"), (run_data_differs_on_one_rank, "")]


def _key(fn, arg):
    return f"{fn.__name__}:{arg}"


def _worker(rank, init_file, out_dir):
    # a collective that waits more than this raises instead of hanging the test run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)  # two processes on a small CPU
    results = {}
    try:
        for fn, arg in SCENARIOS:
            try:
                results[_key(fn, arg)] = {"value": fn(rank, arg)}
            except Exception as exc:  # recorded for the tests; every rank raises alike in these scenarios
                results[_key(fn, arg)] = {"error": f"{type(exc).__name__}: {exc}",
                                          "traceback": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def single_process(opt_name):
    model = make_model()
    train(model, make_optimizer(model, opt_name), global_batches())
    return adapters(model)


def value(ranks, fn, arg):
    out = []
    for rank, results in enumerate(ranks):
        res = results[_key(fn, arg)]
        assert "error" not in res, f"rank {rank}: {res['error']}\n{res.get('traceback', '')}"
        out.append(res["value"])
    return out


def assert_matches_single_process(per_rank, reference):
    for name, (A_ref, B_ref) in reference.items():
        for rank, got in enumerate(per_rank):
            A, B = got[name]
            assert rel_err(A, A_ref) < TOL and rel_err(B, B_ref) < TOL, (rank, name, rel_err(A, A_ref))
        assert all(torch.equal(per_rank[0][name][i], got[name][i]) for got in per_rank for i in (0, 1)), name


@pytest.mark.parametrize("opt_name", ["padamw", "adamw"])
def test_ddp_training_equals_single_process_on_the_global_batch(ranks, opt_name):
    reference = single_process(opt_name)
    assert_matches_single_process(value(ranks, run_ddp, opt_name), reference)
    start = make_model()
    assert all(rel_err(reference[n][1], m.lora_B) > 1e-3 for n, m in lk.lora_modules(start).items())  # it trained


def test_fsdp2_training_with_adamw_equals_single_process(ranks):
    assert_matches_single_process(value(ranks, run_fsdp2, "adamw"), single_process("adamw"))


def test_fsdp2_training_with_preconditioned_adamw_equals_single_process(ranks):
    """Sharded (DTensor) factors: the optimizer gathers each whole factor for its Grams and writes shards back."""
    assert_matches_single_process(value(ranks, run_fsdp2, "padamw"), single_process("padamw"))


def test_fsdp2_sharded_base_with_replicated_adapters_and_preconditioned_adamw(ranks):
    assert_matches_single_process(value(ranks, run_fsdp2_replicated_adapters, "padamw"), single_process("padamw"))


def test_spectral_init_under_ddp_gives_every_rank_the_same_adapters(ranks):
    per_rank = value(ranks, run_spectral_init_ddp, "")
    single = make_model(zero_b=True)
    lk.spectral_init(single, global_batches(4), loss_fn, progress=False)
    for name, m in lk.lora_modules(single).items():
        (A0, B0), (A1, B1) = per_rank[0][name], per_rank[1][name]
        assert torch.equal(A0, A1) and torch.equal(B0, B1), name  # DDP never re-syncs parameters
        assert B0.abs().max() > 0
        # same probes on every rank; per-rank sums all-reduced vs one sum: float64 rounding only
        assert rel_err(B0 @ A0, m.lora_B @ m.lora_A) < 1e-8, name


def test_onepass_sketch_distributed_equals_single_process(ranks):
    """The one-pass sketches are sums over the batch: per-rank sums all-reduced, the same probes on every rank
    (seeded by layer position), so every rank gets the single process's init, error estimates included."""
    per_rank = value(ranks, run_spectral_init_onepass_ddp, "")
    single = make_model(zero_b=True)
    res = lk.spectral_init(single, global_batches(4), loss_fn, mode="onepass", sketch_size=6, progress=False,
                           error_tol=float("inf"))
    assert set(res.modes.values()) == {"onepass"}
    for name, m in lk.lora_modules(single).items():
        (A0, B0), (A1, B1) = per_rank[0][0][name], per_rank[1][0][name]
        assert torch.equal(A0, A1) and torch.equal(B0, B1), name
        assert rel_err(B0 @ A0, m.lora_B @ m.lora_A) < 1e-8, name
        assert per_rank[0][1][name] == pytest.approx(res.errors[name], rel=1e-6)


@pytest.mark.parametrize("case", ["no_layers", "merged", "capture_gradients"])
def test_ranks_disagreeing_on_the_lora_layout_fail_on_every_rank(ranks, case):
    messages = value(ranks, run_layout_mismatch, case)
    for rank, msg in enumerate(messages):
        assert "ranks disagree" in msg and "first difference" in msg, (rank, msg)


def test_data_differing_on_one_rank_fails_on_every_rank(ranks):
    messages = value(ranks, run_data_differs_on_one_rank, "")
    for rank, msg in enumerate(messages):
        assert "did not see the same data on 1 rank(s)" in msg, (rank, msg)
