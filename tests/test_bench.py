"""Benchmark workload A: exact token counts, lengths within the clips, the documented
medians, seeded reproducibility; and one tiny end-to-end `raylm bench throughput`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from raylm.bench.report import format_table, write_json
from raylm.bench.workload import (WorkloadSpec, build_workload, sample_lengths, single_token_words,
                                  warmup_requests)

SMALL = dict(input_median=20, input_sigma=0.9, input_min=8, input_max=40,
             output_median=8, output_sigma=0.8, output_min=4, output_max=12)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _check_exact(requests, tokenizer, spec):
    texts = tokenizer([r.prompt for r in requests], add_special_tokens=False)["input_ids"]
    for req, ids in zip(requests, texts):
        assert list(ids) == req.prompt_token_ids  # the text is exactly these tokens
        assert spec.input_min <= req.prompt_len <= spec.input_max
        assert spec.output_min <= req.output_len <= spec.output_max


def test_workload_a_exact_on_bpe_tokenizer(smollm2_tokenizer):
    """SmolLM2's byte-level BPE: prompts of single-token words re-encode to the drawn ids."""
    spec = WorkloadSpec(num_prompts=24, seed=3)
    requests = build_workload(spec, smollm2_tokenizer, verify=False)
    _check_exact(requests, smollm2_tokenizer, spec)
    # a real vocabulary, not one word
    assert len({t for r in requests for t in r.prompt_token_ids}) > 500


def test_single_token_words_are_single_tokens(tiny_tokenizer):
    words = single_token_words(tiny_tokenizer)
    specials = set(tiny_tokenizer.all_special_ids)
    assert len(words) == len(tiny_tokenizer) - len(specials)  # every w<i> of the tiny vocab
    for tid, word in words[:50]:
        assert tiny_tokenizer.encode(" " + word, add_special_tokens=False) == [tid]
        assert tid not in specials


def test_lengths_follow_workload_a():
    """Medians of the clipped lognormals match the spec (150 / 100 tokens) and clips hold."""
    spec = WorkloadSpec()
    rng = np.random.default_rng(0)
    ins = sample_lengths(rng, 4000, spec.input_median, spec.input_sigma, spec.input_min,
                         spec.input_max)
    outs = sample_lengths(rng, 4000, spec.output_median, spec.output_sigma, spec.output_min,
                          spec.output_max)
    assert ins.min() >= 16 and ins.max() <= 512 and outs.min() >= 16 and outs.max() <= 256
    assert abs(np.median(ins) - 150) < 8 and abs(np.median(outs) - 100) < 5
    # sigma 0.9 from a 150 median: P(len > 512) = P(z > ln(512/150)/0.9 = 1.36) ~ 8.6%
    assert 0.06 < np.mean(ins == 512) < 0.115
    assert np.mean(ins == 16) < 0.01  # P(z < -2.49) ~ 0.6%


def test_workload_seeded(tiny_tokenizer):
    spec = WorkloadSpec(num_prompts=16, seed=7, **SMALL)
    a, b = build_workload(spec, tiny_tokenizer), build_workload(spec, tiny_tokenizer)
    assert [(r.prompt_token_ids, r.output_len) for r in a] == [(r.prompt_token_ids, r.output_len)
                                                               for r in b]
    c = build_workload(WorkloadSpec(num_prompts=16, seed=8, **SMALL), tiny_tokenizer)
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    _check_exact(a, tiny_tokenizer, spec)


def test_fixed_lengths(tiny_tokenizer):
    spec = WorkloadSpec(num_prompts=5, fixed_input_len=33, fixed_output_len=7)
    requests = build_workload(spec, tiny_tokenizer)
    assert [r.prompt_len for r in requests] == [33] * 5 and [r.output_len
                                                             for r in requests] == [7] * 5


def test_warmup_shares_no_prefix(tiny_tokenizer):
    """Warm-up prompts must not seed the prefix cache with the timed prompts' first block."""
    requests = build_workload(WorkloadSpec(num_prompts=6, seed=1, **SMALL), tiny_tokenizer)
    warm = warmup_requests(requests)
    assert len(warm) == 4
    for w, r in zip(warm, requests):
        assert w.prompt_token_ids[:16] != r.prompt_token_ids[:16] and w.output_len == 4


def test_report_helpers(tmp_path):
    table = format_table([{"name": "a", "x": 1.23456, "n": 7},
                          {"name": "bbb", "x": None, "n": 12}],
                         ["name", ("x", "x val", ".1f"), "n"])
    assert table.splitlines() == ["name  x val   n", "----  -----  --", "a       1.2   7",
                                  "bbb       -  12"]
    path = tmp_path / "sub" / "r.json"
    write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left behind


def test_throughput_end_to_end(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    from raylm.cli import main

    out = tmp_path / "t.json"
    small = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    argv = ["bench", "throughput", "--model", str(tiny_llama), "--backend", "both",
            "--num-prompts", "4", "--dtype", "float32", "--kv-cache-memory", "4MiB",
            "--max-model-len", "256", "--seed", "5", "--hf-batch-size", "3", "--disable-tqdm",
            "--output-json", str(out), *small]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    expected = build_workload(WorkloadSpec(num_prompts=4, seed=5, **SMALL), tiny_tokenizer)
    for name in ("raylm", "hf"):
        r = report["results"][name]
        assert r["requests"] == 4 and r["length_mismatches"] == 0
        assert r["output_tokens"] == sum(q.output_len for q in expected)
        assert r["prompt_tokens"] == sum(q.prompt_len for q in expected)
        assert r["elapsed_s"] > 0
    assert report["results"]["hf"]["num_batches"] == 2
    assert 0 < report["results"]["raylm"]["cpu_s"]  # the process's CPU over the timed run
    ratio = report["results"]["raylm"]["output_tok_s"] / report["results"]["hf"]["output_tok_s"]
    assert report["ratio_output_tok_s"] == pytest.approx(ratio)
    assert report["workload"]["num_prompts"] == 4 and report["machine"]["cpu_count"] >= 1
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and "raylm / hf" in printed


def test_bench_latency_on_tiny_model(tiny_llama, tmp_path):
    """Single-request latency: TTFT within E2E, E2E = TTFT + (n-1) * TPOT, JSON written."""
    import json

    from raylm.cli import main

    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", str(tiny_llama), "--dtype", "float32", "--input-len",
               "20", "--output-len", "8", "--iters", "3", "--warmup", "1", "--num-blocks", "64",
               "--output-json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 3
    for r in data["runs"]:
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert abs(r["ttft_ms"] + 7 * r["tpot_ms"] - r["e2e_ms"]) < 1e-6 * r["e2e_ms"] + 1e-6


def test_bench_kernels_reports_every_op_against_the_limits(tmp_path, capsys):
    """`raylm bench kernels` on this device: every op has a row, the byte and FLOP counts are
    the hand-computed ones, and the fractions are of limits measured in the same run."""
    from raylm.cli import main

    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--device", "cpu", "--repeats", "1", "--output-json",
                 str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["op"], r["shape"].split()[0]): r for r in report["results"]}
    assert {op for op, _ in rows} >= {"add_rms_norm", "rotary", "silu_and_mul", "fused_moe",
                                      "attention"}
    limits = report["limits"]
    assert limits["bandwidth_gb_s"] > 0 and limits["gemm_tflop_s"] > 0
    norm = rows[("add_rms_norm", "decode")]  # 32 x 576 fp32: read x, residual, weight; write two
    assert norm["gb_s"] * norm["impl_us"] * 1e3 == pytest.approx((4 * 32 * 576 + 576) * 4,
                                                                 rel=1e-6)
    # 32 seqs x 512 keys x 9 heads x 64: 4 FLOPs per (q, k, dim)
    attn = rows[("attention", "decode")]
    assert attn["tflop_s"] * attn["impl_us"] * 1e6 == pytest.approx(4 * 32 * 512 * 9 * 64,
                                                                    rel=1e-6)
    assert all(0 < r["pct_of_limit"] for r in report["results"])
    assert "% of limit" in capsys.readouterr().out
