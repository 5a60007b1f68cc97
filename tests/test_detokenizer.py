"""IncrementalDetokenizer with the real SmolLM2 tokenizer. References come from
tokenizer.decode on the full id list and from str.find on that text, never from the
detokenizer itself."""
from __future__ import annotations

import pytest

from raylm.engine.detokenizer import IncrementalDetokenizer
from raylm.sampling_params import SamplingParams

TEXTS = [
    "Hello, world! How are you today?",
    " naïve café — résumé, Ærøskøbing, straße",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Emoji: 🎉👍🏽🧑‍💻 🇫🇷 done",
    "def f(x):\n    return x ** 2  # ünïcode comment\n\tif x:\n\t\tpass\n",
    "  leading spaces\n\n\ttabs and  double  spaces  ",
    'JSON {"key": [1, 2.5e-3, null], "ключ": "значение"}',
    "math: ∑_{i=1}^{n} i² = n(n+1)/2 ≤ ∞ ✓",
]

PROMPTS = [
    "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n",
    "End of the prompt with emoji 🎉👍🏽",  # the priming tail starts inside a multi-byte char
    "日本語",
    "",
]


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def feed(tok, prompt_ids, ids, params, chunk=1):
    """Feed ids `chunk` at a time; returns the detokenizer and the text after each call."""
    d = IncrementalDetokenizer(tok, prompt_ids, params)
    texts = []
    for i in range(0, len(ids), chunk):
        hit = d.update(ids[i:i + chunk])
        texts.append(d.text)
        if hit:
            break
    return d, texts


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_text_equals_full_decode(smollm2_tokenizer, prompt, text):
    tok = smollm2_tokenizer
    ids = encode(tok, text)
    ref = tok.decode(ids, skip_special_tokens=True)
    assert ref == text  # the reference itself round-trips
    d, texts = feed(tok, encode(tok, prompt), ids, SamplingParams())
    assert d.text == ref
    for t in texts:  # growing text is always a prefix of the final one, never a broken char
        assert ref.startswith(t)
        assert "\ufffd" not in t
    assert d.visible_text(finished=True) == ref
    assert d.stop_reason is None


@pytest.mark.parametrize("chunk", [2, 5, 1000])
def test_chunked_updates_give_the_same_text(smollm2_tokenizer, chunk):
    tok = smollm2_tokenizer
    ids = encode(tok, " ".join(TEXTS))
    d, _ = feed(tok, encode(tok, PROMPTS[0]), ids, SamplingParams(), chunk=chunk)
    assert d.text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(smollm2_tokenizer, skip):
    tok = smollm2_tokenizer
    ids = encode(tok, "Sure, here it is.<|im_end|>\n<|im_start|>more")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    d, _ = feed(tok, encode(tok, PROMPTS[0]), ids, SamplingParams(skip_special_tokens=skip))
    ref = tok.decode(ids, skip_special_tokens=skip)
    assert d.text == ref
    assert ("<|im_end|>" in d.text) is (not skip)


class _NoBackend:
    """A tokenizer without a Rust backend: exercises the decode-everything slow path."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
def test_slow_path_text_equals_full_decode(smollm2_tokenizer, text):
    tok = smollm2_tokenizer
    ids = encode(tok, text)
    d, texts = feed(_NoBackend(tok), encode(tok, PROMPTS[0]), ids, SamplingParams())
    assert d.text == tok.decode(ids, skip_special_tokens=True)
    assert all(d.text.startswith(t) for t in texts)


# ----------------------------------------------------------------------- stop strings

STOP_TEXT = "The answer is 42. STOP and then some more text STOP again."


def _first_hit(tok, ids, stop):
    """Reference: the fewest leading tokens whose decoded text contains `stop`."""
    return next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_exactly(smollm2_tokenizer, include):
    tok = smollm2_tokenizer
    ids = encode(tok, STOP_TEXT)
    full = tok.decode(ids)
    cut = full.find("STOP")
    expected = full[:cut + 4] if include else full[:cut]
    assert expected in ("The answer is 42. STOP", "The answer is 42. ")
    d = IncrementalDetokenizer(tok, [],
                               SamplingParams(stop=["STOP"], include_stop_str_in_output=include))
    hits = [d.update([t]) for t in ids[:_first_hit(tok, ids, "STOP")]]
    assert hits[-1] is True and not any(hits[:-1])  # True exactly at the completing token
    assert d.text == expected
    assert d.visible_text(finished=True) == expected
    assert d.stop_reason == "STOP"


def test_stop_string_in_one_batch_update(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = encode(tok, STOP_TEXT)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["then", "STOP"]))
    assert d.update(ids) is True
    assert d.text == "The answer is 42. " and d.stop_reason == "STOP"


def test_stop_string_spanning_two_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Hello, world! How are you today?"
    ids = encode(tok, text)
    pieces = [tok.decode([t]) for t in ids]
    # Last two chars of one token + first two chars of the next.
    k = next(i for i in range(len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    assert not any(stop in p for p in pieces)  # no single token holds the stop string
    start = text.find(stop)
    assert start == len("".join(pieces[:k])) + len(pieces[k]) - 2
    d = IncrementalDetokenizer(tok, encode(tok, PROMPTS[0]), SamplingParams(stop=[stop]))
    hits = [d.update([t]) for t in ids[:k + 2]]
    assert hits == [False] * (k + 1) + [True]
    assert d.text == text[:start]


def test_earliest_completed_stop_wins(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = encode(tok, "Hello world")
    assert tok.decode(ids[-1:]) == " world"  # both stops arrive in the same token
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["ld", "or"]))
    assert d.update(ids) is True
    assert d.text == "Hello w" and d.stop_reason == "or"  # "Hello wor" would contain a stop


def test_stop_not_honoured_before_min_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = encode(tok, "a. b. c. d. e")
    full = tok.decode(ids)
    dots = [i + 1 for i, t in enumerate(ids) if tok.decode([t]) == "."]  # 1-based token counts
    assert len(dots) == 4
    occurrences = [i for i, ch in enumerate(full) if ch == "."]
    for which in range(4):
        # min_tokens on the `which`-th dot: the earlier dots are ignored, that one is honoured.
        params = SamplingParams(stop=["."], min_tokens=dots[which], max_tokens=100)
        d = IncrementalDetokenizer(tok, [], params)
        hits = [d.update([t]) for t in ids[:dots[which]]]
        assert hits == [False] * (dots[which] - 1) + [True]
        assert d.text == full[:occurrences[which]]
    # Past the last stop: never honoured, the whole text stays.
    d = IncrementalDetokenizer(tok, [],
                               SamplingParams(stop=["."], min_tokens=dots[-1] + 1, max_tokens=100))
    assert not any(d.update([t]) for t in ids)
    assert d.text == full and d.stop_reason is None


# ------------------------------------------------------------------------------ holdback

def test_holdback_hides_partial_stop_while_running(smollm2_tokenizer):
    tok = smollm2_tokenizer
    stop = "</answer>"
    text = "Reasoning: six times seven is 42 </answer> trailing words"
    ids = encode(tok, text)
    expected = text[:text.find(stop)]
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=[stop, "zzz"]))
    shown = []
    for t in ids:
        if d.update([t]):
            break
        visible = d.visible_text(finished=False)
        assert visible == d.text[:max(0, len(d.text) - (len(stop) - 1))]
        shown.append(visible)
    final = d.visible_text(finished=True)
    assert final == expected
    assert all(final.startswith(s) for s in shown)  # a stream never shows text it later cuts
    # Tokens: ... "4", "2", " </", "answer", ">": before ">" the text is "... 42 </answer" and
    # exactly the 8 held characters "</answer" are hidden, so the stream is already complete.
    assert shown[-1] == expected


def test_holdback_released_when_finished_without_stop(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Partial tag at the end </ans"
    ids = encode(tok, text)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["</answer>"]))
    assert not d.update(ids)
    assert d.visible_text(finished=False) == text[:len(text) - 8]
    assert d.visible_text(finished=True) == text


def test_no_stop_strings_means_no_holdback(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = encode(tok, TEXTS[0])
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    for t in ids:
        d.update([t])
        assert d.visible_text(finished=False) == d.text
    assert d.text == TEXTS[0]


def test_prompt_priming_keeps_the_leading_space():
    """A Metaspace (sentencepiece-style) decoder drops the leading space of the first token it
    sees; primed with the prompt's tail, the output's first word keeps its space, as in
    decode(prompt + output) minus decode(prompt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁Hi", "▁there", "▁friend", "▁how"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    prompt, out = encode(tok, "Hi"), encode(tok, "there friend how")
    ref = tok.decode(prompt + out)[len(tok.decode(prompt)):]
    assert ref == " there friend how"
    d, _ = feed(tok, prompt, out, SamplingParams())
    assert d.text == ref
    d, _ = feed(tok, [], out, SamplingParams())  # no prompt: nothing to keep a space for
    assert d.text == tok.decode(out) == "there friend how"
