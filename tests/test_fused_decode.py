"""The CPU fused decode stack (raylm.models.fused_decode) against its reference, the per-op
path with the same C kernels: it runs the same kernels with the same roundings, so tokens
and logprobs must be equal exactly, not approximately. And huge-page buffers."""
import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.kernels import cpu_decode_stack, cpu_ops, hugepages
from raylm.models.fused_decode import why_not
from tests.conftest import assert_all_free, make_tiny_model, random_prompts

needs_stack = pytest.mark.skipif(not (cpu_decode_stack.available() and cpu_ops.gemv_available()),
                                 reason="the fused stack needs a C compiler and AVX512-BF16")


def _llm(path, fused: bool, **kw):
    llm = LLM(str(path), dtype="bfloat16", num_blocks=96, max_model_len=256, **kw)
    model = llm.engine.core.executor.worker.runner.model
    if fused:
        assert model.fused_decode is not None
    else:
        model.fused_decode = None
    return llm, model


def _run(llm, prompts, n=10):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@needs_stack
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: the q/k/v bias
@pytest.mark.parametrize("batch", [1, 3, 4, 6])  # 6: over GEMV_MAX_ROWS, oneDNN's GEMMs
def test_fused_stack_equals_the_per_op_path_exactly(tiny_root, monkeypatch, kind, batch):
    path = make_tiny_model(tiny_root, kind)
    prompts = random_prompts(batch, seed=batch, lo=5, hi=40)  # decodes cross block boundaries
    calls = {"stack": [], "batched": []}
    stack, attention = cpu_decode_stack.decode_stack, cpu_decode_stack.decode_attention
    monkeypatch.setattr(cpu_decode_stack, "decode_stack",
                        lambda *a: calls["stack"].append(a[2].shape[0]) or stack(*a))
    monkeypatch.setattr(cpu_decode_stack, "decode_attention",
                        lambda *a: calls["batched"].append(a[3].shape[0]) or attention(*a))
    fused, _ = _llm(path, fused=True)
    got = _run(fused, prompts)
    # every decode step holds all the requests (same lengths, EOS ignored)
    # the C stack, or oneDNN + C
    one_call = "stack" if batch <= cpu_ops.GEMV_MAX_ROWS else "batched"
    assert (calls[one_call] and set(calls[one_call])
            == {batch}), "the fast path did not run every step"
    assert not calls["batched" if one_call == "stack" else "stack"]
    per_op, _ = _llm(path, fused=False)
    assert got == _run(per_op, prompts)
    assert_all_free(fused)


@needs_stack
def test_smollm2_greedy_is_unchanged_by_the_fused_stack(smollm2_path):
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 20, 2521, 4744, 3155, 282, 1326, 335, 253]]
    prompts += random_prompts(6, seed=4, lo=5, hi=30, vocab=49152)  # 8 rows: the batched path too
    fused, _ = _llm(smollm2_path, fused=True)
    per_op, _ = _llm(smollm2_path, fused=False)
    assert _run(fused, prompts, 24) == _run(per_op, prompts, 24)


@pytest.mark.parametrize("kind,dtype,reason", [
    ("llama", "float32", "weights not bf16"), ("qwen3", "bfloat16", "q/k norms"),
    ("mixtral", "bfloat16", "not a dense Llama-family stack")])
def test_the_stack_stays_off_where_it_does_not_apply(tiny_root, kind, dtype, reason):
    llm = LLM(str(make_tiny_model(tiny_root, kind)), dtype=dtype, num_blocks=32, max_model_len=128)
    model = llm.engine.core.executor.worker.runner.model
    assert model.fused_decode is None
    layers = list(model.layers[model.start:model.end])
    if cpu_decode_stack.available() and cpu_ops.gemv_available():
        assert reason in why_not(layers, 1)
    assert why_not(layers, 2) is not None


def test_huge_page_buffers_are_zeroed_aligned_and_hold_copies():
    buf = hugepages.empty((3, 1000), torch.bfloat16)
    assert buf.shape == (3, 1000) and buf.data_ptr() % hugepages.HUGE_PAGE == 0
    assert not buf.any()
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=g).to(torch.bfloat16), torch.randn(33, generator=g),
               torch.randint(0, 9, (4, 3), generator=g)]
    packed = hugepages.pack(tensors)
    for t, p in zip(tensors, packed):
        assert (p.dtype == t.dtype and p.shape == t.shape and p.is_contiguous()
                and torch.equal(p, t))
        assert p.data_ptr() % 64 == 0
    tensors[0].zero_()
    assert packed[0].any(), "pack must copy, not alias"
    assert hugepages.empty((0, 4), torch.float32).shape == (0, 4)


@needs_stack
def test_a_later_pipeline_stage_takes_the_residual_it_is_given(tiny_root):
    """A PP stage after the first enters with (x, residual) from the previous stage: run the
    first layer per-op, then the rest through the stack and per-op, and compare exactly."""
    from raylm.attention import AttentionMetadata
    from raylm.kernels import ops
    from raylm.models.fused_decode import FusedDecodeStack

    llm, model = _llm(make_tiny_model(tiny_root, "llama"), fused=True)
    layers = list(model.layers[model.start:model.end])
    g = torch.Generator().manual_seed(5)
    rows, lens = 3, torch.tensor([5, 17, 33])
    tables = torch.arange(3 * 3).view(3, 3)  # three blocks each, disjoint
    slots = tables[torch.arange(rows), (lens - 1) // 16] * 16 + (lens - 1) % 16
    meta = AttentionMetadata(slots, rows, tables, lens)
    positions = lens - 1
    x = torch.randn(rows, layers[0].input_layernorm.weight.shape[0],
                    generator=g).to(torch.bfloat16)
    with ops.using("cpu"), torch.inference_mode():
        x1, res1 = layers[0](positions, x, None, meta)
        want = (x1, res1)
        for layer in layers[1:]:
            want = layer(positions, *want, meta)
        got = FusedDecodeStack(layers[1:])(positions, x1, res1, meta)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
