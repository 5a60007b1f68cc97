"""Where a CPU decode step's forward goes, by op: wraps the C kernels, oneDNN's GEMMs and the
fused decode paths with timers and runs `raylm bench step`'s loop (the C kernels are
invisible to torch's profiler). Figures include each call's Python wrapper.

Usage: python scripts/profile_decode_ops.py BATCH [CONTEXT]   (default context 256)
"""
import collections
import sys
import time

from raylm import LLM
from raylm.bench.step import _fill, time_steps
from raylm.kernels import cpu_decode_stack, cpu_ops, cpu_paged_attention
from raylm.models import fused_decode, layers

totals, calls = collections.Counter(), collections.Counter()


def timed(module, name):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
            calls[name] += 1
    setattr(module, name, wrapper)


for name in ("rms_norm", "rotary", "silu_and_mul", "store_kv", "sample_rows"):
    timed(cpu_ops, name)
timed(cpu_paged_attention, "paged_decode")
timed(cpu_decode_stack, "decode_stack")
timed(cpu_decode_stack, "decode_attention")
timed(layers, "packed_linear")
fused_decode.packed_linear = layers.packed_linear  # the batched path's GEMMs, timed too

batch, context = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 256
llm = LLM(max_model_len=context + 400, num_blocks=batch * (context // 16 + 30) + 64)
_fill(llm, batch, context, 400, 1.0, 0)
time_steps(llm, 5)
totals.clear()
calls.clear()
steps = 20
phases = time_steps(llm, steps)
print(f"batch {batch}, context {context}: "
      + ", ".join(f"{k} {v:.2f} ms" for k, v in phases.items()))
# time_steps runs steps + 5 warm-up steps
for name in sorted(totals, key=totals.get, reverse=True):
    print(f"  {name:17s} {totals[name] / (steps + 5) * 1e3:7.2f} ms/step  "
          f"{calls[name] / (steps + 5):5.0f} calls")
