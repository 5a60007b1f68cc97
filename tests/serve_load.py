"""HTTP helpers for the serving tests: one greedy completion, the text HF's tokens render
to, and a steady load that records every answer."""
from __future__ import annotations

import asyncio
import contextlib

import httpx


@contextlib.contextmanager
def served_app(tiny_root, **app_args):
    """A tiny-Llama app on a fresh Serve (on the session's Ray); yields (model path, base URL)."""
    from ray import serve

    from raylm.deployments.openai import run_app
    from raylm.distributed.communicator import free_port
    from tests.conftest import make_tiny_model

    path = make_tiny_model(tiny_root, "llama")
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        run_app({"model": str(path), "served_model_name": "tiny", "dtype": "float32",
                 "max_model_len": 512, "num_blocks": 128, "num_cpus_per_replica": 0.5, "dp": 1,
                 **app_args})
        yield path, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


async def complete(client: httpx.AsyncClient, url: str, prompt, max_tokens: int,
                   rank=None) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    headers = {} if rank is None else {"X-data-parallel-rank": str(rank)}
    return await client.post(url + "/v1/completions", json=body, headers=headers)


def continuation(path, prompt, output) -> str:
    """The text `output` adds after `prompt` (how an incremental detokenizer renders it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok.decode(prompt + output,
                      skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]


ADMIN_KEY = "sk-admin-test-7e6d5c4b"  # apps under test take it as admin_api_key
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def scale(client: httpx.AsyncClient, url: str, n: int, drain_timeout: float = 120,
                **fields) -> httpx.Response:
    body = {"new_data_parallel_size": n, "drain_timeout": drain_timeout, **fields}
    return await client.post(url + "/scale_elastic_ep", json=body, headers=ADMIN)


@contextlib.contextmanager
def cluster_full(leave_cpus: float = 0.25):
    """Hold all but `leave_cpus` of the cluster's free CPUs in a placement group (another
    tenant, say) while inside: a replica needing more cannot be placed."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    free = ray.available_resources().get("CPU", 0.0) - leave_cpus
    pg = placement_group([{"CPU": free}])
    ray.get(pg.ready(), timeout=60)
    try:
        yield free
    finally:
        remove_placement_group(pg)


async def is_scaling(client: httpx.AsyncClient, url: str) -> dict:
    return (await client.post(url + "/is_scaling_elastic_ep", headers=ADMIN)).json()


class SteadyLoad:
    """`clients` loops sending short greedy requests back to back until `stop` is set. Each
    answer is recorded as (status, text == expected for 200s else the body, Retry-After)."""

    def __init__(self, url, prompts, expected, max_tokens: int, clients: int = 2) -> None:
        self.url, self.prompts, self.expected, self.max_tokens = url, prompts, expected, max_tokens
        self.clients = clients
        self.results = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=180) as client:
            await asyncio.gather(*[self._client(client, i) for i in range(self.clients)])

    async def _client(self, client, offset: int) -> None:
        i = offset
        while not self.stop.is_set():
            k = i % len(self.prompts)
            r = await complete(client, self.url, self.prompts[k], self.max_tokens)
            ok = r.status_code == 200
            self.results.append((r.status_code,
                                 r.json()["choices"][0]["text"] == self.expected[k] if ok
                                 else r.text, r.headers.get("retry-after")))
            i += self.clients
            if not ok:
                await asyncio.sleep(0.2)

    async def served_more(self, n: int, what: str, timeout_s: float = 120) -> None:
        """Wait until `n` more requests have been answered 200 (fail naming `what`)."""
        from tests.waiting import async_wait_for

        ok = lambda: sum(r[0] == 200 for r in self.results)  # noqa: E731
        target = ok() + n
        await async_wait_for(lambda: ok() >= target, timeout_s, what)

    def lost(self):
        """Answers that are neither correct 200s nor 503s with Retry-After (scaling)."""
        return [r for r in self.results if not (r[0] == 200 and r[1] is True)
                and not (r[0] == 503 and r[2])]
