"""End-to-end features of the offline LLM, each against an independent reference:
logprobs vs HF's log-softmax, stop strings vs the unstopped text, KV sizing vs arithmetic,
chat vs HF on the chat-templated prompt."""
from __future__ import annotations

import pytest
import torch

from raylm import LLM, SamplingParams
from tests.conftest import assert_all_free, hf_greedy


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_blocks=64, max_model_len=256)


def test_logprobs_equal_hf_log_softmax(llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    prompt = [7, 8, 9, 10, 11]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                      ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    # position i predicts token i+1
    ref = torch.log_softmax(logits[len(prompt) - 1:-1].double(), -1)
    assert len(out.logprobs) == 6
    cumulative = 0.0
    for pos, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top = torch.topk(ref[pos], 3)
        assert list(entry)[0] == token  # sampled token first
        assert set(top.indices.tolist()) <= set(entry)
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[pos, tid]), abs=1e-4)
            assert lp.rank == int((ref[pos] > ref[pos, tid]).sum()) + 1
            assert lp.decoded_token == llm.get_tokenizer().decode([tid])
        cumulative += float(ref[pos, token])
    assert out.cumulative_logprob == pytest.approx(cumulative, abs=1e-3)


def test_stop_string_cuts_exactly(llm):
    prompt = {"prompt_token_ids": [20, 21, 22, 23]}
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    words = full.split()
    stop = words[len(words) // 2]  # a word from the middle of the unstopped text
    cut = full[:full.index(stop)]
    out = llm.generate(prompt,
                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == cut and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(prompt,
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                       include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == cut + stop
    assert_all_free(llm)


def test_stop_token_ids_and_min_tokens(llm, tiny_llama):
    prompt = [30, 31, 32]
    ref = hf_greedy(tiny_llama, [prompt], 10)[0]
    stop_id = ref[3]
    first = ref.index(stop_id)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                      stop_token_ids=[stop_id]),
                       use_tqdm=False)
    c = out[0].outputs[0]
    assert (c.token_ids == ref[:first + 1] and c.finish_reason == "stop" and c.stop_reason
            == stop_id)


def test_kv_cache_sized_from_memory_budget(tiny_llama):
    # tiny llama: 2 layers, 2 kv heads, head_dim 16, fp32 -> 2*2*16*2*16*4 bytes per 16-token block
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="1MiB", max_model_len=256)
    assert llm.stats().num_blocks == (1 << 20) // per_block
    bf16 = LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory=1 << 20, max_model_len=256)
    assert bf16.stats().num_blocks == (1 << 20) // (per_block // 2)


@pytest.mark.slow
def test_smollm2_chat_equals_hf(smollm2_path, smollm2_tokenizer):
    """Chat through the model's template: same prompt ids as HF's template, same greedy
    answer as HF generate (both end with the EOS token)."""
    from transformers import AutoModelForCausalLM

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = list(smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        x = torch.tensor([ids])
        eos = smollm2_tokenizer.eos_token_id
        expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                               do_sample=False, eos_token_id=eos,
                               pad_token_id=eos)[0, len(ids):].tolist()
    llm = LLM("smollm2-135m-instruct", dtype="float32", num_blocks=128, max_model_len=512)
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == expected and expected[-1] == eos
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"


@pytest.mark.slow
def test_smollm2_eos_min_tokens_ignore_eos_equal_hf(smollm2_path, smollm2_tokenizer):
    """The chat answer ends with EOS after a few tokens. min_tokens must suppress it like HF's
    min_new_tokens; ignore_eos must run through it like HF with no eos_token_id."""
    from transformers import AutoModelForCausalLM

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = list(smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    eos = smollm2_tokenizer.eos_token_id

    def hf_gen(**kw):
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                            pad_token_id=eos, **kw)
        return y[0, len(ids):].tolist()

    llm = LLM("smollm2-135m-instruct", dtype="float32", num_blocks=128, max_model_len=512)
    run = lambda **kw: llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, **kw),
                                    use_tqdm=False)[0].outputs[0]
    plain = run(max_tokens=40)
    assert (plain.finish_reason == "stop"
            and len(plain.token_ids) < 20), "needs an early EOS to test anything"
    # both end with the EOS token
    assert plain.token_ids == hf_gen(max_new_tokens=40, eos_token_id=eos)
    longer = run(max_tokens=40, min_tokens=20)
    assert longer.token_ids == hf_gen(max_new_tokens=40, min_new_tokens=20, eos_token_id=eos)
    assert len(longer.token_ids) > 20
    through = run(max_tokens=24, ignore_eos=True)
    with torch.inference_mode():  # plain greedy loop: EOS is just another token
        seq = list(ids)
        for _ in range(24):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert through.token_ids == seq[len(ids):]
    assert through.finish_reason == "length" and eos in through.token_ids
    assert_all_free(llm)
