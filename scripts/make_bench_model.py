"""Write a random-weight Llama checkpoint with SmolLM2-135M's shape, but 8 attention heads
and 4 KV heads (SmolLM2's 9/3 do not split over 2 TP ranks), plus SmolLM2's tokenizer.
For TP/PP latency benchmarks: `raylm bench latency --model DIR --tp 2`.
Usage: python scripts/make_bench_model.py OUT_DIR"""
import sys

import torch
import transformers as tf

from raylm.models.loader import resolve_model_path

out = sys.argv[1]
config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=72, max_position_embeddings=2048,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(out)
tf.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(out)
print(out)
