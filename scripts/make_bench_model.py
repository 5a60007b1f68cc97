"""Write a random-weight checkpoint plus SmolLM2's tokenizer, for parallelism benchmarks.

Default: a Llama with SmolLM2-135M's shape, but 8 attention heads and 4 KV heads
(SmolLM2's 9/3 do not split over 2 TP ranks): `raylm bench latency --model DIR --tp 2`.
--moe: a Qwen3-MoE of similar size per token (12 layers, 8 experts, top 2), for the
expert-parallel lockstep benchmark (scripts/bench_lockstep.sh).
Usage: python scripts/make_bench_model.py OUT_DIR [--moe]"""
import sys

import torch
import transformers as tf

from raylm.models.loader import resolve_model_path

out = sys.argv[1]
common = dict(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, num_attention_heads=8, num_key_value_heads=4)
if "--moe" in sys.argv[2:]:
    config = tf.Qwen3MoeConfig(hidden_size=512, intermediate_size=1536, moe_intermediate_size=768,
                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                               num_hidden_layers=12, head_dim=64, **common)
else:
    config = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            head_dim=72, **common)
torch.manual_seed(0)
model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(out)
tf.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(out)
print(out)
