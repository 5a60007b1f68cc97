"""dtype="auto": the per-machine choice of weights and GEMM dtypes (raylm.kernels.machine),
the fp32-GEMM path for bf16 weights against a torch reference, and what the engine resolves."""
import logging

import pytest
import torch
import torch.nn.functional as F

from raylm.config import ModelConfig
from raylm.kernels import machine
from raylm.kernels.machine import GemmRates, choose_cuda_dtype, choose_dtypes
from raylm.models.layers import onednn_available, pack_weight, packed_linear

CPU = torch.device("cpu")
NATIVE, PLAIN = frozenset({"avx512f", "avx512_bf16"}), frozenset({"avx512f"})


def _rates(bf16, f32):
    return lambda: GemmRates(bf16=bf16, f32=f32, threads=2)


def _never():
    raise AssertionError("the GEMM rates were measured when the choice did not need them")


@pytest.mark.parametrize("rates,gemm", [
    ((768, 182), torch.bfloat16),  # the AMD EPYC instance's rates (issue 16)
    ((163, 309), torch.float32),   # the Intel Xeon instance's
    ((300, 330), torch.bfloat16),  # fp32 faster but within the margin: not worth 2x memory
])
def test_auto_on_a_bf16_cpu_keeps_bf16_weights_and_the_faster_gemm(rates, gemm):
    choice = choose_dtypes("auto", CPU, torch.float32, flags=NATIVE, rates_fn=_rates(*rates))
    assert (choice.weights, choice.gemm) == (torch.bfloat16, gemm)
    assert f"{rates[0]} GFLOP/s bf16, {rates[1]} fp32" in choice.reason


def test_auto_without_native_bf16_is_fp32_throughout():
    choice = choose_dtypes("auto", CPU, torch.bfloat16, flags=PLAIN, rates_fn=_never)
    assert (choice.weights, choice.gemm) == (torch.float32, torch.float32)
    assert "no native bf16" in choice.reason


def test_explicit_dtypes_are_kept_and_measure_only_when_needed():
    assert choose_dtypes("float32", CPU, flags=NATIVE, rates_fn=_never).gemm == torch.float32
    forced = choose_dtypes("bfloat16", CPU, flags=PLAIN, cpu_gemm="float32", rates_fn=_never)
    assert (forced.weights, forced.gemm) == (torch.bfloat16, torch.float32)
    measured = choose_dtypes("bfloat16", CPU, flags=PLAIN, rates_fn=_rates(100, 400))
    assert measured.gemm == torch.float32


@pytest.mark.parametrize("checkpoint,bf16_ok,want", [
    (torch.float32, True, torch.bfloat16), (torch.float32, False, torch.float16),
    (torch.float16, True, torch.float16), (torch.bfloat16, False, torch.float16),
    (None, True, torch.bfloat16),
])
def test_cuda_auto_follows_the_checkpoint_half_dtype(checkpoint, bf16_ok, want):
    assert choose_cuda_dtype(checkpoint, bf16_ok) == want


def test_config_keeps_auto_and_names_a_bad_dtype():
    assert ModelConfig().dtype == "auto"
    assert ModelConfig(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        ModelConfig(dtype="int4")


def test_gemm_rates_are_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(machine, "measure_gemm_rates",
                        lambda: calls.append(1) or GemmRates(5.0, 7.0, 2))
    assert machine.gemm_rates() == machine.gemm_rates() == GemmRates(5.0, 7.0, 2)
    assert len(calls) == 1
    (path,) = (tmp_path / "machine").iterdir()
    path.write_text("{not json")  # a torn or stale file is measured again, not trusted
    assert machine.gemm_rates() == GemmRates(5.0, 7.0, 2) and len(calls) == 2


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN")
def test_measured_rates_are_positive_gflops():
    rates = machine.measure_gemm_rates(shape=(32, 128, 128), repeats=1)
    assert rates.bf16 > 0 and rates.f32 > 0 and rates.threads == torch.get_num_threads()


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN")
@pytest.mark.parametrize("rows", [5, 64])
def test_fp32_gemm_for_bf16_weights_matches_the_fp32_reference(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 160, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 160, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    packed = pack_weight(w, 32, torch.float32)
    assert packed.dtype == torch.float32
    out = packed_linear(x, packed, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=8e-3, atol=1e-2)  # one bf16 rounding
    bf16_out = packed_linear(x, pack_weight(w, 32, None), b)  # bf16 GEMM: bf16 partial rounding
    assert (out.float() - want).abs().max() <= (bf16_out.float() - want).abs().max() + 1e-2


def test_the_engine_resolves_auto_and_logs_why(tiny_llama, caplog):
    from raylm import LLM

    with caplog.at_level(logging.INFO, logger="raylm.executor.model_runner"):
        llm = LLM(model=str(tiny_llama), num_blocks=32, max_model_len=128,
                  cpu_gemm_dtype="float32")
    runner = llm.engine.core.executor.worker.runner
    want = choose_dtypes("auto", CPU, torch.float32, "float32")
    assert (runner.dtypes.weights, runner.dtypes.gemm) == (want.weights, want.gemm)
    assert any(want.reason in r.getMessage() for r in caplog.records)
    packed = [m.packed for m in runner.model.modules() if getattr(m, "packed", None) is not None]
    assert packed and all(p.dtype == want.gemm for p in packed)
