"""Trace replay and the prefix-sharing workload of `raylm bench serve`: rows, offsets and
lengths against a hand-written trace, prompts that re-encode to their exact token ids, and
a replay through the in-process backend."""
import asyncio

import pytest

from raylm.bench import serve
from raylm.bench.traces import (load_trace, prefix_sharing_requests, replay_workload,
                                trace_offsets, trace_requests)

TRACE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,39,109
2023-11-16 18:15:51.2224670,18,5
2023-11-16 18:16:01.2224670,7,3
"""


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_rows_offsets_and_lengths_by_hand(trace):
    rows = load_trace(trace, start=1, limit=2)
    assert [(r.prompt_len, r.output_len) for r in rows] == [(39, 109), (18, 5)]
    assert trace_offsets(rows, 1.0).tolist() == pytest.approx([0.0, 0.227298])
    assert trace_offsets(load_trace(trace), 2.0).tolist() == pytest.approx([0.0, 2.157290,
                                                                            2.270938, 7.270938])
    with pytest.raises(ValueError, match="no rows from 9"):
        load_trace(trace, start=9)
    with pytest.raises(ValueError, match="time scale must be > 0"):
        trace_offsets(rows, 0)


def test_a_trace_without_its_columns_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError,
                       match="must have columns TIMESTAMP, ContextTokens, GeneratedTokens"):
        load_trace(str(bad))


def test_trace_prompts_have_the_rows_lengths(trace, tokenizer):
    reqs = trace_requests(load_trace(trace), tokenizer, seed=1, max_prompt=100, max_output=50)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(100, 44), (39, 50), (18, 5), (7, 3)]
    assert [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in reqs] == \
        [r.prompt_token_ids for r in reqs]


def test_prefix_sharing_requests_start_with_one_of_the_shared_prompts(tokenizer):
    reqs = prefix_sharing_requests(20, tokenizer, num_prefixes=3, prefix_len=40, suffix_len=5,
                                   seed=2)
    heads = {tuple(r.prompt_token_ids[:40]) for r in reqs}
    assert len(heads) == 3 and all(r.prompt_len == 45 for r in reqs)
    assert len({tuple(r.prompt_token_ids[40:]) for r in reqs}) == 20  # every question its own
    assert [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in reqs] == \
        [r.prompt_token_ids for r in reqs]


def test_trace_and_prefix_sharing_are_separate_workloads(trace, tokenizer):
    from raylm.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--trace", trace, "--prefix-sharing"])
    with pytest.raises(ValueError, match="pick one"):
        replay_workload(args, tokenizer)


def test_a_trace_replays_through_the_inprocess_backend(trace, tiny_llama):
    """Rows 1..3 at 100x: every request completes with the row's output length; the report
    keeps the trace's attribution."""
    from raylm.cli import build_parser

    args = build_parser().parse_args([
        "bench", "serve", "--backend", "inprocess", "--model", str(tiny_llama), "--dtype",
        "float32", "--max-model-len", "128", "--kv-cache-memory", "4MiB", "--disable-tqdm",
        "--trace", trace, "--trace-start", "1", "--num-prompts", "3", "--trace-time-scale", "100",
        "--max-output-len", "20"])
    report = asyncio.run(serve.benchmark(args))
    assert report["results"]["completed"] == 3 and report["results"]["failed"] == 0
    assert report["requests"]["output_lens"] == [20, 5, 3]
    assert report["requests"]["prompt_lens"] == [39, 18, 7]
    assert "CC-BY 4.0" in report["workload"]["attribution"]
