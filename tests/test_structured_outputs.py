"""Structured outputs on the offline engine (SmolLM2, xgrammar), against references:
jsonschema validates every sampled JSON, `re.fullmatch` every regex output, the choice list
every choice; greedy decoding under a grammar that allows the unconstrained output gives the
same tokens; constrained and plain requests in one batch leave the plain ones unchanged."""
from __future__ import annotations

import json
import re

import jsonschema
import torch
import pytest

from raylm import LLM, SamplingParams
from raylm.sampling_params import StructuredOutputsParams as Structured
from tests.conftest import assert_all_free

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "city", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "Rome", "Oslo"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}
ASK = [{"role": "user",
        "content": "Describe a person as JSON with a name, an age, a city and tags."}]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", num_blocks=256, max_model_len=1024)


def _sample(llm, structured, n=24, max_tokens=80, chat=True, seed=0):
    params = SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens,
                            structured_outputs=structured)
    run = llm.chat(ASK, params, use_tqdm=False) if chat else llm.generate(["Code:"], params,
                                                                          use_tqdm=False)
    return run[0].outputs


def test_json_schema_outputs_always_validate(llm):
    outputs = _sample(llm, Structured(json=SCHEMA))
    for out in outputs:
        assert out.finish_reason == "stop", out.text  # the grammar completed, not max_tokens
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outputs}) > 1  # sampled, not one forced string
    for out in _sample(llm, Structured(json_object=True), n=8, max_tokens=200, seed=1):
        if out.finish_reason == "stop":  # an open-ended object may run past max_tokens
            assert isinstance(json.loads(out.text), dict)
    assert_all_free(llm)


@pytest.mark.parametrize("regex", [r"\d{3}-[a-z]{2,4}", r"(yes|no), because [a-z ]{1,20}\."])
def test_regex_outputs_always_match(llm, regex):
    for out in _sample(llm, Structured(regex=regex), chat=False, max_tokens=40):
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), out.text


def test_choice_and_grammar_outputs(llm):
    choices = ["red", "green", "blue \"sky\""]
    assert {o.text for o in _sample(llm, Structured(choice=choices))} <= set(choices)
    grammar = 'root ::= "(" digits ("," digits)? ("," digits)? ")"\ndigits ::= [0-9] | [1-9] [0-9]'
    for out in _sample(llm, Structured(grammar=grammar), chat=False, max_tokens=40):
        assert (out.finish_reason == "stop"
                and re.fullmatch(r"\((\d|[1-9]\d)(,(\d|[1-9]\d)){0,2}\)", out.text))


def test_min_tokens_yields_to_a_complete_grammar(llm):
    """min_tokens masks EOS, but a complete grammar allows nothing else: the grammar wins."""
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=25,
                            structured_outputs=Structured(choice=["yes", "no"]))
    out = llm.generate(["Is it?"], params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def _literal(text: str) -> str:
    """`text` as a regex matching only itself (xgrammar's regex syntax)."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in r".^$*+?()[]{}|\/-" else c
                   for c in text)


def test_greedy_output_unchanged_when_the_grammar_allows_it(llm):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    free = llm.chat(ASK, plain, use_tqdm=False)[0].outputs[0]
    # the mask does work: digits too
    allowing = Structured(regex=f"({_literal(free.text)}|[0-9]+)")
    constrained = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               structured_outputs=allowing),
                           use_tqdm=False)[0].outputs[0]
    assert constrained.token_ids[:len(free.token_ids)] == free.token_ids
    assert constrained.text == free.text


def test_constrained_and_plain_requests_batch_together(llm):
    prompts = ["The capital of France is", "One, two, three,", "Code:"]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts[:2], plain, use_tqdm=False)]
    regex = SamplingParams(temperature=0, max_tokens=12,
                           structured_outputs=Structured(regex=r"[A-Z]{4}"))
    mixed = llm.generate(prompts, [plain, plain, regex], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone
    assert re.fullmatch(r"[A-Z]{4}", mixed[2].outputs[0].text)
    assert_all_free(llm)


@pytest.mark.parametrize("spec, why", [
    (dict(regex="[a-", field="guided_regex"), "guided_regex: the regex does not compile"),
    (dict(json={"type": "object", "properties": 5}, field="response_format"),
     "response_format: the JSON schema"),
    (dict(grammar="root ::= undefined_rule", field="guided_grammar"),
     "guided_grammar: the grammar"),
    (dict(regex="a", choice=["b"]), "exactly one of"),
    (dict(choice=[]), "choice must be a non-empty list"),
])
def test_bad_constraints_are_value_errors_naming_the_field(llm, spec, why):
    with pytest.raises(ValueError) as err:
        llm.generate(["x"], SamplingParams(structured_outputs=Structured(**spec)), use_tqdm=False)
    assert why in str(err.value)
    assert_all_free(llm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [96, 100])  # whole words, and a last word cut by the vocabulary
def test_bitmask_kernel_equals_torch(gen, dtype, vocab):
    """The CPU mask kernel against the bits unpacked by torch: some rows masked, others not."""
    from raylm.kernels import cpu_ops
    from raylm.structured import apply_bitmask

    if not cpu_ops.available():
        pytest.skip("no C compiler: apply_bitmask runs the torch path, which is this test's "
                    "reference")
    logits = torch.randn(6, vocab, generator=gen).to(dtype)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32,
                            generator=gen)
    bitmask[1, 0] = -1  # a word of all-allowed tokens
    rows = [4, 0, 3]
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32))
            & 1).bool().flatten(1)[:, :vocab]
    expected = logits.clone()
    expected[rows] = expected[rows].masked_fill(~bits, float("-inf"))
    got = logits.clone()
    apply_bitmask(got, bitmask, rows)
    assert torch.equal(got, expected)
