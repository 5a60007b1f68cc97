"""Prompt logprobs and logit_bias on the offline engine, against references: HF transformers'
fp32 log-softmax of the prompt positions (whole prefill, chunked prefill, and a prompt whose
blocks are already in the prefix cache), and the greedy token with and without a bias."""
from __future__ import annotations

import pytest
import torch

from raylm import LLM, SamplingParams
from tests.conftest import TINY_VOCAB, assert_all_free, random_prompts

PROMPT = random_prompts(1, seed=11, lo=45, hi=46)[0]  # 45 tokens: two full blocks of 16 and a part


@pytest.fixture(scope="module")
def hf_ref(tiny_llama):
    """log-softmax over the vocabulary at every prompt position (fp64 from fp32 logits)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].double(), -1)


def _check(out, hf_ref, tokenizer, top_n: int) -> None:
    lps = out.prompt_logprobs
    assert len(lps) == len(PROMPT) and lps[0] is None  # nothing predicts the first token
    for i in range(1, len(PROMPT)):
        ref, entry = hf_ref[i - 1], lps[i]  # position i-1 predicts prompt token i
        token = PROMPT[i]
        assert token in entry
        assert set(torch.topk(ref, top_n).indices.tolist()) <= set(entry)
        assert len(entry) <= top_n + 1
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[tid]), abs=1e-4)
            assert lp.rank == int((ref > ref[tid]).sum()) + 1
            assert lp.decoded_token == tokenizer.decode([tid])


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_hf(tiny_llama, hf_ref, chunk):
    kwargs = {"max_num_batched_tokens": chunk,
              "long_prefill_token_threshold": chunk} if chunk else {}
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=64, max_model_len=128, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    _check(out, hf_ref, llm.get_tokenizer(), 2)
    assert out.outputs[0].logprobs is None  # prompt logprobs alone do not ask for sampled ones
    assert_all_free(llm)


def test_prompt_logprobs_after_a_prefix_hit(tiny_llama, hf_ref):
    """The prompt's blocks are cached by an earlier request: a prompt_logprobs request
    computes them again (its logprobs come from those positions), others still hit."""
    # prefix caching on
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=64, max_model_len=128)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": PROMPT}, plain, use_tqdm=False)[0]
    hit = llm.generate({"prompt_token_ids": PROMPT}, plain, use_tqdm=False)[0]
    # the cache holds the prefix
    assert first.num_cached_tokens == 0 and hit.num_cached_tokens == 32
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    scored = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    _check(scored, hf_ref, llm.get_tokenizer(), 0)
    assert scored.outputs[0].token_ids == hit.outputs[0].token_ids
    assert_all_free(llm)


def test_prompt_logprobs_for_every_sample(tiny_llama, hf_ref):
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=64, max_model_len=128)
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4, prompt_logprobs=1,
                            ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    assert len(out.outputs) == 2
    _check(out, hf_ref, llm.get_tokenizer(), 1)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_blocks=64, max_model_len=128)


def _greedy(llm, bias=None, max_tokens=1):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logit_bias=bias, ignore_eos=True)
    return llm.generate({"prompt_token_ids": PROMPT[:10]}, params,
                        use_tqdm=False)[0].outputs[0].token_ids


def test_logit_bias_moves_the_greedy_token(llm):
    top = _greedy(llm)[0]
    assert _greedy(llm, {top: -100})[0] != top
    forced = (top + 7) % TINY_VOCAB
    assert _greedy(llm, {forced: 100}, max_tokens=5) == [forced] * 5
    assert _greedy(llm, {forced: 0.0}) == [top]  # a zero bias changes nothing


@pytest.mark.parametrize("bias, why",
                         [({10**6: 5.0}, "out of vocabulary"), ({3: 101.0}, "[-100, 100]"),
                          ({-1: 1.0}, "token ids"), ({"3": 1.0}, "token ids")])
def test_logit_bias_refused_with_the_field_named(llm, bias, why):
    with pytest.raises(ValueError, match="logit_bias") as err:
        llm.generate({"prompt_token_ids": PROMPT[:5]}, SamplingParams(logit_bias=bias),
                     use_tqdm=False)
    assert why in str(err.value)
    assert_all_free(llm)


def test_prompt_logprobs_cross_a_delta_stream_once():
    """Serve replicas send deltas: the prompt logprobs go out with the first delta that has
    them, never again, and folding the deltas back keeps them."""
    from raylm.outputs import (CompletionOutput, DeltaState, Logprob, RequestOutput, delta_output,
                               merge_delta)

    lps = [None, {5: Logprob(-1.0, 1)}]
    state, acc, sent = DeltaState(), None, []
    for step in range(1, 4):
        out = RequestOutput("r", None, [4, 5], [CompletionOutput(0, "x" * step, [7] * step)],
                            step == 3, prompt_logprobs=lps)
        delta = delta_output(out, state)
        sent.append(delta.prompt_logprobs)
        acc = merge_delta(acc, delta)
    assert sent == [lps, None, None]
    assert acc.prompt_logprobs == lps and acc.outputs[0].token_ids == [7, 7, 7]
