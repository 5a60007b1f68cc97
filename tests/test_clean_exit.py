"""The product's processes exit cleanly: a user script that builds an engine, generates and
shuts it down must exit 0, with no crash while the interpreter finalizes (threads of the
engine, Ray's, torch's OpenMP pool and the ctypes kernel all alive until then). Each case
runs in a fresh interpreter under -X faulthandler, so a crash would print its stack."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

CASES = {
    # in-process engine: the C decode kernel, the AsyncEngine loop and its watchdog thread
    "uniproc": """
        import asyncio
        from raylm import LLM, SamplingParams
        from raylm.config import CacheConfig, EngineConfig, ModelConfig
        from raylm.engine.async_engine import AsyncEngine
        llm = LLM(PATH, dtype="float32", max_model_len=128, num_blocks=32)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
        print(out[0].outputs[0].token_ids)
        llm.shutdown()
        model = ModelConfig(model=PATH, dtype="float32", max_model_len=128)
        engine = AsyncEngine(EngineConfig(model=model, cache=CacheConfig(num_blocks=32)))
        async def main():
            return [o async for o in engine.generate({"prompt_token_ids": [5, 6]},
                                                     SamplingParams(max_tokens=3), "r")][-1]
        print(asyncio.run(main()).outputs[0].token_ids)
        engine.shutdown()
    """,
    # TP=2 on Ray worker actors (shared-memory communicator), Ray left for atexit to stop
    "ray_tp2": """
        import ray
        from raylm import LLM, SamplingParams
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        llm = LLM(PATH, dtype="float32", tensor_parallel_size=2, worker_num_cpus=1,
                  max_model_len=128, num_blocks=32)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
        print(out[0].outputs[0].token_ids)
        llm.shutdown()
    """,
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_script_that_shuts_the_engine_down_exits_cleanly(case, tiny_llama):
    script = f"PATH = {str(tiny_llama)!r}\n" + textwrap.dedent(CASES[case])
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True,
                         text=True, timeout=240, env=_env())
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stderr[-4000:]}"
    assert "Fatal Python error" not in run.stderr, run.stderr[-4000:]
    assert len(run.stdout.strip().splitlines()) >= 1  # it did generate


def _env():
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return env
