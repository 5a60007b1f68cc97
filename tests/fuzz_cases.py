"""JSON bodies for the HTTP fuzz (tests/fuzz_http.py): completions, chat, /tokenize, /detokenize.

Each value is drawn from a field's valid values or from ones surely wrong for it (wrong JSON type,
out of range, null where not allowed), so each Case knows its answer: all parts valid and every
prompt plus max_tokens/min_tokens within the context, "200"; a wrong part, "4xx" (an otherwise
valid unknown model, "404"); a text whose token count is only bounded, near the limits, "any".
The test tokenizer is word level over w0, w1, ... split on whitespace (tests/conftest.py): "w5 w6"
is two tokens, any text at most one per character. The test chat template renders a message as
"w1 <content> " and the generation prompt as "w2" (tests/openai_server.py); without it, chat:
"any".
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from hypothesis import strategies as st

from raylm.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                  TokenizeRequest)

OK, MAYBE, BAD = 0, 1, 2  # a part's verdict; a request's is its worst part's
MISSING = object()  # a field left out
NAN, INF = float("nan"), float("inf")  # sent as the JSON literals NaN and Infinity
WRONG = ["1", "", "true", [], {}, [1], {"a": 1}, NAN, INF, -INF]  # wrong for every number and bool
NOT_INT, NOT_FLOAT, NOT_BOOL = (WRONG + [1.5, 2.0, True], WRONG + [False, 10 ** 400],
                                WRONG + [1, 0, 1.0])
SNIPPETS = ["😀", "🏳️‍🌈", "\x00", "\x1b[31m", "\u200b", "\ufeff", "\u202e", "\r\n", "𝔘𝔫𝔦", "<s>",
            "</s>", "{{ messages }}", "'\"\\", "data: [DONE]\n\n", "\\u0000", "%00", "\u2028",
            "🤖" * 10]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=6), c, max_size=3), max_leaves=8)
KNOWN_FIELDS = {"completions": CompletionRequest.model_fields,
                "chat": ChatCompletionRequest.model_fields,
                "tokenize": TokenizeRequest.model_fields,
                "detokenize": DetokenizeRequest.model_fields}
UNKNOWN_FIELDS = sorted(set().union(*KNOWN_FIELDS.values())) + ["foo", "functions", "", "x" * 100,
                                                                "Model"]
floats = partial(st.floats, allow_subnormal=False)
BOOL = (st.booleans(), NOT_BOOL, False)
LOGPROBS = (st.sampled_from([0, 1, 2, 5, 20]), [21, -1] + NOT_INT, True)
MAX_TOKENS = (lambda d: d.randint(1, 8) if d.pct(95) else d.choice([9, 16, 127, 128, 10 ** 30]),
              [0] + NOT_INT, True)
STREAM_OPTIONS = (st.fixed_dictionaries({},
                                        optional={"include_usage": st.booleans() | st.none(),
                                                  "x": SCALARS}),
                  [{"include_usage": 1}, "yes", []], True)
MODEL = (lambda d: d.choice(list(d.env.model_names)) if d.pct(90) else  # else unknown: 404
         d.value(st.sampled_from(["gpt-9", "", " tiny", "TINY", "🤖"]) | st.text(max_size=12)),
         [[], 5, {}], True)
# max_tokens 0 scores a prompt: valid with echo only (completion_case)
COMPLETION_FIELDS = {"logprobs": (12, *LOGPROBS), "echo": (25, *BOOL),
                     "max_tokens": (92, lambda d: 0 if d.pct(4) else d.value(MAX_TOKENS[0]),
                                    NOT_INT, True)}
CHAT_FIELDS = {"logprobs": (12, *BOOL), "top_logprobs": (10, *LOGPROBS),
               "add_generation_prompt": (10, *BOOL)}
TOKENIZE_FIELDS = {"add_special_tokens": (15, *BOOL), "add_generation_prompt": (15, *BOOL),
                   "model": (40, *MODEL)}


def sampling_fields(v: int) -> Dict[str, tuple]:
    """name: (percent of bodies with it, valid values, wrong ones, null allowed[, percent wrong,
    else 8]), as in raylm/serve/protocol.py"""
    text = st.text(min_size=1, max_size=4)
    return {
        "n": (15, lambda d: d.randint(1, 4) if d.pct(90) else d.choice([5, 16, 128]),
              [0, 129] + NOT_INT, False),
        "temperature": (35, floats(0, 2) | st.sampled_from([1e-5, 1e308, 2 ** 70]),
                        [-1e-9, -1] + NOT_FLOAT, True),
        "top_p": (20, floats(0, 1, exclude_min=True), [0, 1.0000001, -0.5] + NOT_FLOAT, True),
        "top_k": (20, st.integers(-1, 600) | st.sampled_from([10 ** 30, 10 ** 400]),
                  [-2, -100] + NOT_INT, True),
        "min_p": (12, floats(0, 1), [-0.1, 1.5] + NOT_FLOAT, True),
        "presence_penalty": (12, floats(-2, 2), [-2.0001, 100] + NOT_FLOAT, True),
        "frequency_penalty": (12, floats(-2, 2), [-3, 2.0001] + NOT_FLOAT, True),
        "repetition_penalty": (12, floats(0, 2, exclude_min=True), [0, -1, 2.5] + NOT_FLOAT, True),
        "seed": (15,
                 st.integers() | st.sampled_from([2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 400]),
                 NOT_INT, True),
        "min_tokens": (20, lambda d: d.randint(0, 4) if d.pct(90) else d.choice([9, 200]),
                       [-1] + NOT_INT, False),
        "ignore_eos": (15, *BOOL), "skip_special_tokens": (8, *BOOL),
        "include_stop_str_in_output": (8, *BOOL), "stream": (35, *BOOL),
        "user": (6, st.text(max_size=20), [5, [], {}, True], True),
        "stop": (20,
                 lambda d: d.choice(SNIPPETS) if d.pct(30)
                 else d.value(text | st.lists(text, max_size=4)),
                 ["", [""], ["w5", ""], 5, [5], [None], {"a": "b"}, NAN], True),
        # in the vocabulary, else 400
        "stop_token_ids": (20, st.lists(st.integers(0, v - 1), max_size=4),
                           [[v], [v + 100, 0], [10 ** 30], [2 ** 64], [-1], [1.5], [None], [True],
                            "2"], True, 40),
        "logit_bias": (8,
                       st.dictionaries(st.integers(0, v - 1).map(str), floats(-100, 100),
                                       max_size=3),
                       [{"5": "x"}, 5, {"x": 1.0}, {"5": 100.5}, {"-1": 1.0}, {str(v): 1.0},
                        {"\u00b2": 1.0}, {"5": NAN}, {"5": True}], True),
        "prompt_logprobs": (6, st.integers(0, 20), [21, -1] + NOT_INT, True),  # not with stream
    }


@dataclass
class Env:  # what the generator knows of the server
    model_names: Sequence[str]
    max_model_len: int = 128
    vocab_size: int = 512
    max_body_bytes: int = 1 << 20
    chat_template: bool = True  # the test chat template is in place
    api_key: Optional[str] = None
    bad_auth: bool = False  # no key or a wrong one: every path but the open ones must get 401
    admin_api_key: Optional[str] = None  # the admin routes' key (None: they must answer 404)
    dp: int = 1  # the app's replica count: a scale to it is a no-op
    max_dp: int = 1  # the most replicas a scale may ask for


@dataclass
class Case:
    label: str
    method: str
    path: str
    body: Optional[bytes] = None
    headers: Dict[str, str] = field(default_factory=dict)
    expect: str = "any"  # "200", "4xx", one status ("404") or "any" (below 500)
    stream: bool = False  # a 200 must be an SSE stream, else JSON
    choices: Optional[int] = None  # a 200 must have this many choices
    chunked: bool = False


class Prompt(NamedTuple):
    value: Any
    lo: int  # the fewest tokens it may have
    hi: int  # the most
    verdict: int = OK


class Draw(random.Random):
    """One request in the making: its structure (which fields, which branch) from this seeded
    Random, so the mix follows the weights written here; its leaf values (text, numbers, JSON) from
    Hypothesis (`hyp` draws a strategy), which favours the nasty ones; its JSON body so far and the
    worst verdict of the body's parts."""

    def __init__(self, seed: int, hyp, env: Env) -> None:
        super().__init__(seed)
        self.hyp, self.env = hyp, env
        self.fields: Dict[str, Any] = {}
        self.verdict = OK

    def pct(self, percent: float) -> bool:
        return self.random() * 100 < percent

    def weighted(self, *options: Tuple[float, Any]) -> Any:
        weights, values = zip(*options)
        return self.value(self.choices(values, weights)[0])

    # a strategy drawn, a function called with this Draw, else as is
    def value(self, what: Any) -> Any:
        if isinstance(what, st.SearchStrategy):
            return self.hyp(what)
        return what(self) if callable(what) else what

    def put(self, name: str, value: Any, verdict: int = OK) -> None:
        if value is not MISSING:
            self.fields[name] = value
        self.note(verdict)

    def note(self, verdict: int) -> None:
        self.verdict = max(self.verdict, verdict)

    def expect(self) -> str:
        model = self.fields.get("model")
        if self.verdict != BAD and isinstance(model, str) and model not in self.env.model_names:
            # the model is looked up before the prompt is read
            return "404" if self.verdict == OK else "4xx"
        return {OK: "200", MAYBE: "any", BAD: "4xx"}[self.verdict]


def dump_json(obj: Any, ascii_only: bool = True) -> bytes:
    """NaN/Infinity as literals; raw UTF-8 unless ascii_only (a lone surrogate: invalid bytes)."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def fit(lo: int, hi: int, max_tokens: Optional[int], min_tokens: int, ctx: int) -> int:
    """Verdict of a prompt of lo..hi tokens asking for max_tokens (None: the rest of the
    context)."""
    if max_tokens is not None and min_tokens > max_tokens:
        return BAD
    need = max(1, min_tokens, max_tokens or 0)
    if hi == 0 or lo + need > ctx:
        return BAD
    return MAYBE if lo == 0 or hi + need > ctx else OK


def _words(d: Draw, k: int) -> Prompt:
    return Prompt(" ".join(f"w{d.randint(0, d.env.vocab_size - 4)}" for _ in range(k)), k, k)


def _text(s: str) -> Prompt:
    if not s.strip(" \t\r\n"):
        return Prompt(s, 0, 0)
    return Prompt(s, 1 if any(c.isascii() and c.isalnum() for c in s) else 0, len(s))


def text_prompt(d: Draw) -> Prompt:
    """Words, words and an odd snippet, arbitrary text, blank text, or a lone surrogate (400)."""
    ctx, snippet = d.env.max_model_len, SNIPPETS + [st.text(min_size=1, max_size=6)] * 9
    return d.weighted((55, lambda d: _words(d, d.randint(1, 12))),
                      (5, lambda d: _words(d, d.randint(ctx - 12, ctx + 3))),
                      (15,
                       lambda d: _text(f"{_words(d, d.randint(1, 4)).value} "
                                       f"{d.value(d.choice(snippet))}")),
                      (12, lambda d: _text(d.value(st.text()))),
                      (4, lambda d: _text(d.choice(["", " \n"]))),
                      (3,
                       lambda d: Prompt(d.choice(["\ud800", "w5 \udc00", "\ud83d w6"]), 0, 9,
                                        BAD)))


def token_ids(d: Draw) -> Prompt:
    v, ctx = d.env.vocab_size, d.env.max_model_len
    bad = [v, -1, -(10 ** 30), 2 ** 63, 2 ** 64]
    ids = d.weighted((67, lambda d: [d.randint(0, v - 1) for _ in range(d.randint(1, 20))]),
                     (8, lambda d: [7] * d.randint(ctx - 8, ctx + 2)),
                     (25,
                      lambda d: [d.choice([d.randint(0, v - 1), d.choice(bad)])
                                 for _ in range(d.randint(1, 6))]))
    return Prompt(ids, len(ids), len(ids), BAD if any(not 0 <= t < v for t in ids) else OK)


def completion_prompt(d: Draw) -> List[Prompt]:
    """Puts a text, token ids, a batch of either, or a bad prompt; returns its prompts."""
    kind = d.weighted((45, "text"), (22, "ids"), (24, "batch"), (9, "bad"))
    if kind == "bad":
        d.put("prompt",
              d.choice([[], [""], [[]], ["w5", ""], [[5], []], 5, True, None, {}, [1, "w5"],
                        [[1], "w5"], [True], [1.5], [[1.5]], [None], [["w5"]], [[[1]]], NAN,
                        MISSING]), BAD)
        return []
    make = (d.choice([text_prompt, token_ids]) if kind == "batch" else text_prompt if kind
            == "text" else token_ids)
    prompts = [make(d) for _ in range(d.randint(1, 4) if kind == "batch" else 1)]
    d.put("prompt", [p.value for p in prompts] if kind == "batch" else prompts[0].value,
          max(p.verdict for p in prompts))
    return prompts


def chat_content(d: Draw) -> Prompt:
    kind = d.weighted((76, "text"), (8, "null"), (10, "part"), (6, "bad"))
    if kind in ("text", "part"):
        text = text_prompt(d)
        return text if kind == "text" else text._replace(value=[{"type": "text",
                                                                 "text": text.value}])
    return Prompt(None, 0, 0) if kind == "null" else Prompt(d.choice([
        [{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text"}],
        [{"type": "text", "text": 5}], ["w5"], [None], 5, True, {"text": "w5"}, NAN]), 0, 0, BAD)


def chat_messages(d: Draw) -> Tuple[int, int]:
    """Puts messages; returns the fewest and most tokens they render to, the generation prompt
    aside."""
    if d.pct(5):
        d.put("messages",
              d.choice([[], "w5", {}, [None], ["w5"], [{"role": "wizard", "content": "w5"}],
                        [{"content": "w5"}], [{"role": "User"}], [{"role": 5}]]), BAD)
        return 0, 0
    contents = [chat_content(d)
                for _ in range(d.weighted((60, 1), (25, 2), (15, lambda d: d.randint(3, 5))))]
    roles = ["user"] * 4 + ["assistant", "system", "developer", "tool"]
    d.put("messages", [{"role": d.choice(roles), "content": c.value} for c in contents],
          max(c.verdict for c in contents))
    return sum(1 + c.lo for c in contents), sum(1 + c.hi for c in contents)


def put_fields(d: Draw, specs: Dict[str, tuple]) -> None:
    for name, (percent, valid, wrong, nullable, *bad) in specs.items():
        if not d.pct(percent):
            continue
        if d.pct(bad[0] if bad else 8):
            d.put(name, d.choice(wrong if nullable else wrong + [None]), BAD)
        else:
            d.put(name, None if nullable and d.pct(2) else d.value(valid))


def put_common(d: Draw, specs: Dict[str, tuple]) -> None:
    """The sampling fields, model, `specs` and stream_options (only with stream, null aside)."""
    put_fields(d, {**sampling_fields(d.env.vocab_size), "model": (80, *MODEL), **specs})
    stream = d.fields.get("stream") is True
    put_fields(d, {"stream_options": (40 if stream else 3, *STREAM_OPTIONS)})
    d.note(BAD if d.fields.get("stream_options") is not None and not stream else OK)
    d.note(BAD if d.fields.get("prompt_logprobs") is not None and stream else OK)


def post(d: Draw, label: str, path: str, prompts: Optional[int] = None) -> Case:
    """Unknown fields added, sent as \\u-escaped JSON or raw UTF-8; a 200 has n x prompts
    choices."""
    stream = d.fields.get("stream") is True  # (an unknown field named "stream" means nothing)
    choices = None if prompts is None or d.verdict == BAD else d.fields.get("n", 1) * prompts
    for _ in range(d.randint(1, 3) if d.pct(20) else 0):
        name = d.choice(UNKNOWN_FIELDS) if d.pct(80) else d.value(st.text(max_size=8))
        if name not in KNOWN_FIELDS[label] and name not in d.fields:
            d.put(name, d.value(JSON_VALUES))
    return Case(label, "POST", path, dump_json(d.fields, ascii_only=d.pct(85)),
                {"content-type": "application/json"}, d.expect(), stream=stream, choices=choices)


def completion_case(d: Draw) -> Case:
    prompts = completion_prompt(d)
    put_common(d, COMPLETION_FIELDS)
    f = d.fields
    scoring = f.get("max_tokens") == 0
    if scoring and f.get("echo") is not True:
        d.note(BAD)  # max_tokens 0 only scores an echoed prompt
    for p in prompts if d.verdict != BAD else []:  # scoring samples one token (left out)
        d.note(fit(p.lo, p.hi, 1 if scoring else f.get("max_tokens", 16), f.get("min_tokens", 0),
                   d.env.max_model_len))
    return post(d, "completions", "/v1/completions", len(prompts))


def chat_case(d: Draw) -> Case:
    lo, hi = chat_messages(d)
    limits = d.weighted((55, ["max_tokens"]), (30, ["max_completion_tokens"]),
                        # neither (or null): the rest
                        (13, ["max_tokens", "max_completion_tokens"]), (2, []))
    put_common(d, {**CHAT_FIELDS, **{name: (100, *MAX_TOKENS) for name in limits}})
    f = d.fields
    if f.get("top_logprobs") is not None and f.get("logprobs") is not True:
        d.note(BAD)  # top_logprobs needs logprobs
    max_tokens = (f["max_completion_tokens"] if f.get("max_completion_tokens") is not None
                  else f.get("max_tokens"))
    gen = 0 if f.get("add_generation_prompt") is False else 1
    if not d.env.chat_template:
        d.note(MAYBE)
    elif d.verdict != BAD:
        d.note(fit(lo + gen, hi + gen, max_tokens, f.get("min_tokens", 0), d.env.max_model_len))
    return post(d, "chat", "/v1/chat/completions", 1)


def tokenize_case(d: Draw) -> Case:
    what = d.weighted((50, ["prompt"]), (35, ["messages"]), (8, ["prompt", "messages"]), (7, []))
    d.note(OK if len(what) == 1 else BAD)  # exactly one of prompt and messages
    if "prompt" in what:
        prompt = text_prompt(d) if d.pct(90) else Prompt(d.choice([5, ["w5"], [5], True, {}]), 0,
                                                         0, BAD)
        d.put("prompt", prompt.value, prompt.verdict)
    if "messages" in what:
        chat_messages(d)
        d.note(OK if d.env.chat_template else MAYBE)
    put_fields(d, TOKENIZE_FIELDS)
    return post(d, "tokenize", "/tokenize")


def detokenize_case(d: Draw) -> Case:
    tokens = token_ids(d) if d.pct(85) else Prompt(d.choice([MISSING, None, "w5", [1.5], [True],
                                                             [[1]]]), 0, 0, BAD)
    d.put("tokens", tokens.value, tokens.verdict)
    put_fields(d, {"model": (40, *MODEL)})
    return post(d, "detokenize", "/detokenize")
