"""Measured dispatch (lorakern.ops.dispatch): a pure choice from measurements, and tables that are never
trusted blindly."""
import json
import warnings

import pytest
import torch

import lorakern as lk
from lorakern.ops import dispatch


def _case(x="bf16", ad="bf16", m=8192, k=4096, n=4096, r=16, drop=False, arch="sm_90"):
    return dispatch.Case(arch, x, ad, m, k, n, r, drop)


def _entry(**ms):
    return {"ms": ms}


def test_no_measurement_takes_the_cublas_path():
    assert dispatch.choose(_case(), {}) == "cublas"
    other = {_case(k=2048).key(): _entry(fused=0.5, cublas=1.0)}
    assert dispatch.choose(_case(), other) == "cublas"


@pytest.mark.parametrize("best", ["cublas", "hybrid", "fused"])
def test_a_measurement_picks_the_fastest_design(best):
    ms = {"cublas": 1.0, "hybrid": 1.0, "fused": 1.0}
    ms[best] = 0.8
    assert dispatch.choose(_case(), {_case().key(): _entry(**ms)}) == best


def test_exact_fp32_never_takes_the_triton_gemm():
    entries = {_case(x="fp32", ad="fp32").key(): _entry(fused=0.1, hybrid=0.9, cublas=1.0),
               _case(x="tf32", ad="fp32").key(): _entry(fused=0.1, hybrid=0.9, cublas=1.0)}
    assert dispatch.choose(_case(x="fp32", ad="fp32"), entries) == "hybrid"
    assert dispatch.choose(_case(x="tf32", ad="fp32"), entries) == "fused"
    only_fused = {_case(x="fp32", ad="fp32").key(): _entry(fused=0.1)}
    assert dispatch.choose(_case(x="fp32", ad="fp32"), only_fused) == "cublas"


def test_make_case_names_tf32_and_buckets():
    case = dispatch.make_case("sm_90", torch.float32, torch.float32, 5000, 4096, 1024, 12, True, tf32=True)
    assert case == dispatch.Case("sm_90", "tf32", "fp32", 8192, 4096, 1024, 16, True)
    exact = dispatch.make_case("sm_90", torch.float32, torch.float32, 5000, 4096, 1024, 12, True, tf32=False)
    assert exact.x_dtype == "fp32"
    assert dispatch.Case.from_key(case.key()) == case


def test_nearest_tokens_bucket_within_4x():
    entries = {_case(m=8192).key(): _entry(fused=0.5, cublas=1.0)}
    assert dispatch.choose(_case(m=4096), entries) == "fused"
    assert dispatch.choose(_case(m=32768), entries) == "fused"
    assert dispatch.choose(_case(m=1024), entries) == "cublas"  # 8x away: not a measurement of this case
    closer = dict(entries, **{_case(m=2048).key(): _entry(cublas=0.5, fused=1.0)})
    assert dispatch.choose(_case(m=2048), closer) == "cublas"
    assert dispatch.choose(_case(m=4096), closer) == "cublas"  # equidistant: the smaller bucket's measurement


def test_dropout_and_dtypes_are_part_of_the_case():
    entries = {_case().key(): _entry(fused=0.5, cublas=1.0)}
    assert dispatch.choose(_case(drop=True), entries) == "cublas"
    assert dispatch.choose(_case(ad="fp32"), entries) == "cublas"
    assert dispatch.choose(_case(arch="sm_80"), entries) == "cublas"


XA_CFG = {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


@pytest.mark.parametrize("kernel, config, ok", [
    ("xa", XA_CFG, True),
    ("xa", dict(XA_CFG, BLOCK_R=16), False),          # a derived value: the launcher's, never a table's
    ("xa", {k: v for k, v in XA_CFG.items() if k != "BLOCK_M"}, False),
    ("xa", dict(XA_CFG, BLOCK_K=96), False),          # not a power of two
    ("xa", dict(XA_CFG, BLOCK_K=8), False),           # below tl.dot's 16
    ("xa", dict(XA_CFG, num_warps=True), False),
    ("dy", {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, True),
    ("gemm_bwd", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
     True),
    ("gemm_fwd", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}, False),
    ("reduce", XA_CFG, False),
])
def test_config_schema(kernel, config, ok):
    assert dispatch.valid_config(kernel, config) is ok


def test_the_kernels_own_configs_pass_the_schema():
    from lorakern.ops import lora_linear_triton as kt
    for dtype in (torch.bfloat16, torch.float32):
        for kernel, cfg in kt.default_configs(dtype).items():
            assert dispatch.valid_config(kernel, cfg), (kernel, cfg)
            assert all(dispatch.valid_config(kernel, c) for c in kt.candidates(dtype, kernel))


def test_concurrent_writers_keep_each_others_entries(tmp_path):
    import threading
    path = tmp_path / "dispatch.json"
    keys = [_case(k=16 * (i + 1)).key() for i in range(8)]
    threads = [threading.Thread(target=dispatch.write_entries, args=("sm_90", {k: _entry(cublas=1.0)}, path))
               for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = json.loads(path.read_text())
    assert set(data["tables"]["sm_90"]["entries"]) == set(keys)
    dispatch.reload()


# ---- files -------------------------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(tmp_path))
    dispatch.reload()
    yield tmp_path / "dispatch.json"
    dispatch.reload()


def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def _table(arch="sm_90", triton=None, entries=None):
    triton = triton or dispatch._triton_release()
    return {"format": 1, "tables": {arch: {"triton": triton, "entries": entries or {}}}}


def test_write_then_read_round_trip(cache):
    key = _case().key()
    path = dispatch.write_entries("sm_90", {key: {"ms": {"cublas": 1.0, "fused": 0.7},
                                                  "configs": {"fused": {"xa": XA_CFG}}}})
    assert path == cache
    assert dispatch.entries("sm_90")[key]["ms"]["fused"] == 0.7
    dispatch.write_entries("sm_90", {_case(k=1024).key(): {"ms": {"cublas": 1.0}}})  # merged, not replaced
    assert set(dispatch.entries("sm_90")) == {key, _case(k=1024).key()}
    assert dispatch.configs_for(_case(), dispatch.entries("sm_90"), "fused") == {"xa": XA_CFG}
    assert dispatch.configs_for(_case(), dispatch.entries("sm_90"), "hybrid") is None


@pytest.mark.parametrize("content, match", [
    ("{not json", "not readable JSON"),
    (json.dumps({"format": 99, "tables": {}}), "not format 1"),
    (json.dumps([1, 2]), "not format 1"),
])
def test_corrupt_cache_is_ignored_with_a_warning(cache, content, match):
    _write(cache, content)
    with pytest.warns(UserWarning, match=match):
        assert dispatch.entries("sm_90") == {}


def test_foreign_architecture_is_ignored_with_a_warning(cache):
    _write(cache, _table(arch="sm_80", entries={_case(arch="sm_80").key(): _entry(fused=0.1, cublas=1.0)}))
    with pytest.warns(UserWarning, match=r"\['sm_80'\] only, not this GPU \(sm_90\)"):
        assert dispatch.entries("sm_90") == {}


def test_other_triton_release_is_ignored_with_a_warning(cache):
    _write(cache, _table(triton="2.0", entries={_case().key(): _entry(fused=0.1, cublas=1.0)}))
    with pytest.warns(UserWarning, match="made with Triton 2.0"):
        assert dispatch.entries("sm_90") == {}


def test_malformed_entries_are_dropped_with_a_warning(cache):
    good = _case().key()
    _write(cache, _table(entries={good: _entry(fused=0.5, cublas=1.0),
                                  "sm_90|bf16|bf16|m8192|4096x4096|r16": _entry(fused=0.5),   # short key
                                  _case(k=64).key(): _entry(fused=float("nan")),
                                  _case(k=128).key(): _entry(warp_specialized=0.1),
                                  _case(k=256).key(): {"ms": {"fused": 1.0}, "configs": {"fused": {"xa": {"BLOCK_M": -1}}}},
                                  _case(arch="sm_80").key(): _entry(fused=0.5)}))        # under the wrong arch
    with pytest.warns(UserWarning, match="ignoring 5 malformed entries"):
        assert set(dispatch.entries("sm_90")) == {good}


def test_missing_cache_is_silent(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.entries("sm_90") == {}


def test_the_shipped_table_is_valid():
    data = json.loads(dispatch.PACKAGE_TABLE.read_text())
    assert data["format"] == dispatch.FORMAT and isinstance(data["tables"], dict)
    for arch, table in data["tables"].items():
        for key, entry in table["entries"].items():
            assert key.startswith(arch + "|") and dispatch._valid_entry(key, entry)


def test_design_for_caches_and_honours_failures(cache, monkeypatch):
    key = _case(m=128, k=64, n=32, r=16).key()
    dispatch.write_entries("sm_90", {key: {"ms": {"cublas": 1.0, "fused": 0.5}}})
    monkeypatch.setattr(dispatch, "_failed", set())
    case, design, _ = dispatch.design_for("sm_90", torch.bfloat16, torch.bfloat16, 100, 64, 32, 8, False, True)
    assert design == "fused" and case.key() == key
    dispatch.mark_failed(case)
    assert dispatch.design_for("sm_90", torch.bfloat16, torch.bfloat16, 100, 64, 32, 8, False, True)[1] == "cublas"


def test_set_design_validates():
    with pytest.raises(ValueError, match="design must be one of"):
        lk.set_design("fastest")
    lk.set_design("hybrid")
    assert lk.get_design() == "hybrid"
