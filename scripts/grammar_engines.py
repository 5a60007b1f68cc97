"""Which grammar engine fills a step's bitmask fastest here (issue 20's choice): xgrammar and
llguidance (pip install llguidance; not a raylm dependency), SmolLM2's tokenizer and
vocabulary, 32 matchers of one JSON schema advanced token by token through a valid JSON
text, the bitmask of all 32 filled before each token. Prints the median and max ms per step.
Usage: python scripts/grammar_engines.py"""
import json
import statistics
import time

from transformers import AutoTokenizer

from raylm.models.loader import resolve_model_path

SCHEMA = {"type": "object", "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
TEXT = '{"name": "Bob Stone", "age": 42, "tags": ["pilot", "father", "runner"]}'
BATCH = 32


def xgrammar_case(tok, vocab):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    bitmask = xgr.allocate_token_bitmask(BATCH, vocab)
    return (lambda: [m.fill_next_token_bitmask(bitmask, i) for i, m in enumerate(matchers)],
            lambda t: all(m.accept_token(t) for m in matchers))


def llguidance_case(tok, vocab):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matchers = [llguidance.LLMatcher(lt, grammar) for _ in range(BATCH)]
    bitmask = llguidance.torch.allocate_token_bitmask(BATCH, vocab)
    return (lambda: [llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
                     for i, m in enumerate(matchers)],
            lambda t: all(m.consume_token(t) for m in matchers))


def main() -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    ids = tok.encode(TEXT)
    for name, case in (("xgrammar", xgrammar_case), ("llguidance", llguidance_case)):
        try:
            fill, accept = case(tok, 49152)
        except ImportError:
            print(f"{name}: not installed")
            continue
        times = []
        for t in ids:
            start = time.perf_counter()
            fill()
            times.append(time.perf_counter() - start)
            assert accept(t), f"{name} refused token {t}"
        print(f"{name}: bitmask fill for {BATCH} matchers, {len(ids)} steps: median "
              f"{statistics.median(times) * 1e3:.3f} ms, max {max(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
