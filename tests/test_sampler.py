"""Sampler against references written here in plain numpy/torch: penalised argmax,
min_tokens masking, min-p / top-k / top-p supports and renormalised distributions,
temperature, seeded reproducibility, and logprobs from the raw logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raylm.executor.sampler import Sampler, SamplingInput
from raylm.kernels import cpu_ops
from raylm.sampling_params import SamplingParams

sampler = Sampler()


def run(logits, rows):
    """The sampler may work in place; references always use the caller's copy."""
    return sampler(torch.as_tensor(np.asarray(logits), dtype=torch.float32).clone(), rows)


def row(params=None, prompt=(), output=(), **kw):
    return SamplingInput(params or SamplingParams(**kw), list(prompt), list(output))


def softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def draw_many(logits, params, n, seed=0):
    """n draws with the same params, all rows in one batch; returns counts over the vocab."""
    torch.manual_seed(seed)
    logits = torch.as_tensor(logits, dtype=torch.float32)
    out = sampler(logits.expand(n, -1).clone(), [row(params) for _ in range(n)])
    return np.bincount(out.token_ids, minlength=logits.shape[-1])


def total_variation(counts, probs):
    return 0.5 * np.abs(counts / counts.sum() - probs).sum()


def assert_close(counts, probs):
    """Empirical frequencies match `probs`: total variation below twice its expected value
    under correct sampling (sum of E|binomial error| / 2) plus a little slack."""
    n = counts.sum()
    expected_tv = 0.5 * np.sum(np.sqrt(2 * probs * (1 - probs) / (np.pi * n)))
    tv = total_variation(counts, probs)
    assert tv < 2 * expected_tv + 0.01, (tv, expected_tv)


# --------------------------------------------------------------------------- greedy

def test_greedy_is_argmax_for_random_batches():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 100, generator=g)
    expected = [int(np.argmax(r)) for r in logits.numpy()]
    assert run(logits, [row(temperature=0.0) for _ in range(32)]).token_ids == expected
    # Slow path (logprobs requested) and mixed with sampled rows: greedy rows stay argmax.
    rows = [row(temperature=0.0, logprobs=2) if i % 2 == 0 else row(temperature=1.0)
            for i in range(32)]
    got = run(logits, rows).token_ids
    assert [got[i] for i in range(0, 32, 2)] == expected[0::2]


def penalised_reference(logits, prompt, output, rep=1.0, freq=0.0, pres=0.0):
    """vLLM's penalties, written independently: repetition over prompt+output (divide positive
    logits, multiply negative ones), frequency*count + presence*(count>0) over the output only."""
    x = np.array(logits, dtype=np.float64)
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        c = list(output).count(t)
        x[t] -= freq * c + pres
    return x


# Each case: logits, prompt, output, penalties, the argmax the penalty must produce.
BASE = [2.0, 1.8, 1.0, 0.5, -0.2, -1.0, 0.3, 0.1, -2.0, 0.0]
PENALTY_CASES = {
    # 2.0/1.5 = 1.33 < 1.8: the prompt token loses its lead.
    "repetition_prompt": (BASE, [0, 7], [], dict(rep=1.5), 1),
    # Repetition also covers output tokens.
    "repetition_output": (BASE, [5], [0], dict(rep=1.5), 1),
    # Negative logits are multiplied: -1.0*1.5 = -1.5 < -1.2.
    "repetition_negative": ([-1.0, -1.2, -3.0, -2.0, -5.0, -4.0, -6.0, -7.0], [0], [],
                            dict(rep=1.5), 1),
    # rep < 1 rewards repeats: 1.8/0.5 = 3.6 > 2.0.
    "repetition_reward": (BASE, [1], [], dict(rep=0.5), 1),
    # 2.0 - 0.3*3 = 1.1 < 1.8.
    "frequency": (BASE, [], [0, 0, 0, 4], dict(freq=0.3), 1),
    # Frequency scales with the count: token 1 once (1.8-0.5) vs token 0 twice (2.0-1.0).
    "frequency_counts": (BASE, [], [0, 0, 1], dict(freq=0.5), 1),
    # 2.0 - 0.5 = 1.5 < 1.8.
    "presence": (BASE, [], [0], dict(pres=0.5), 1),
    # Presence does not scale with the count: 2.0 - 0.15 = 1.85 > 1.8 (x6 it would be 1.1).
    "presence_count_independent": (BASE, [], [0, 0, 0, 0, 0, 0], dict(pres=0.15), 0),
    # Negative presence rewards: 1.0 + 1.5 = 2.5 > 2.0.
    "presence_negative": (BASE, [], [2], dict(pres=-1.5), 2),
    # Presence/frequency ignore the prompt (OpenAI definition).
    "presence_ignores_prompt": (BASE, [0, 0, 0], [], dict(pres=2.0, freq=2.0), 0),
    # Combined: token 0 (prompt+output x2): 2.0/1.2 - 2*0.2 - 0.1 = 1.1667;
    # token 1 (output x1): 1.8/1.2 - 0.2 - 0.1 = 1.2; token 2 (prompt): 1.0/1.2 = 0.833.
    "combined": (BASE, [0, 2], [0, 1, 0], dict(rep=1.2, freq=0.2, pres=0.1), 1),
}


@pytest.mark.parametrize("case", list(PENALTY_CASES))
def test_penalties_flip_greedy_choice(case):
    logits, prompt, output, pen, expected = PENALTY_CASES[case]
    ref = penalised_reference(logits, prompt, output, **pen)
    assert int(np.argmax(ref)) == expected  # the hand-made case is what it claims
    params = SamplingParams(temperature=0.0, repetition_penalty=pen.get("rep", 1.0),
                            frequency_penalty=pen.get("freq", 0.0),
                            presence_penalty=pen.get("pres", 0.0))
    assert run([logits], [row(params, prompt, output)]).token_ids == [expected]


def test_penalties_random_battery_matches_reference():
    rng = np.random.default_rng(5)
    flips = 0
    rows, logits, expected = [], [], []
    for _ in range(200):
        v = int(rng.integers(8, 17))
        x = rng.normal(0, 1.5, size=16)
        x[v:] = -50.0  # shorter vocab inside a 16-wide batch
        prompt = rng.integers(0, v, size=int(rng.integers(0, 6))).tolist()
        output = rng.integers(0, v, size=int(rng.integers(0, 8))).tolist()
        pen = dict(rep=float(rng.uniform(0.5, 2.0)), freq=float(rng.uniform(-2, 2)),
                   pres=float(rng.uniform(-2, 2)))
        ref = penalised_reference(x, prompt, output, **pen)
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] < 1e-3:
            continue  # near-tie: float32 vs float64 could legitimately differ
        flips += int(np.argmax(ref) != np.argmax(x))
        logits.append(x)
        expected.append(int(np.argmax(ref)))
        rows.append(row(SamplingParams(temperature=0.0, repetition_penalty=pen["rep"],
                                       frequency_penalty=pen["freq"],
                                       presence_penalty=pen["pres"]), prompt, output))
    assert flips > 30  # the battery really exercises the penalties
    assert run(np.stack(logits), rows).token_ids == expected


def test_penalties_shape_the_sampled_distribution():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 0.2, 0.8, -1.0, 0.3])
    prompt, output = [1, 2], [0, 0, 5]
    params = SamplingParams(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.4,
                            presence_penalty=0.3)
    n = 4000
    torch.manual_seed(11)
    out = run(np.tile(logits, (n, 1)), [row(params, prompt, output) for _ in range(n)])
    counts = np.bincount(out.token_ids, minlength=8)
    expected = softmax64(penalised_reference(logits, prompt, output, 1.3, 0.4, 0.3) / 0.8)
    assert_close(counts, expected)
    assert total_variation(counts, softmax64(logits / 0.8)) > 0.1  # the penalties mattered


# ----------------------------------------------------------------------- min_tokens

def test_min_tokens_masks_stop_ids_until_reached():
    logits = [0.0, 1.0, 5.0, 4.0, 3.0, 0.5]  # stop ids 2 and 3 lead
    params = SamplingParams(temperature=0.0, min_tokens=3)
    params.all_stop_token_ids = {2, 3}
    for n_out, expected in [(0, 4), (1, 4), (2, 4), (3, 2), (7, 2)]:
        assert run([logits], [row(params, [1], [1] * n_out)]).token_ids == [expected], n_out
    # Without stop ids nothing is masked.
    plain = SamplingParams(temperature=0.0, min_tokens=3)
    assert run([logits], [row(plain, [], [])]).token_ids == [2]


def test_min_tokens_masks_stop_ids_when_sampling():
    logits = np.array([0.0, 1.0, 5.0, 4.0, 3.0, 0.5])
    params = SamplingParams(temperature=1.0, min_tokens=2)
    params.all_stop_token_ids = {2, 3}
    n = 2000
    torch.manual_seed(3)
    masked = run(np.tile(logits, (n, 1)), [row(params, [], [7]) for _ in range(n)]).token_ids
    counts = np.bincount(masked, minlength=6)
    assert counts[2] == 0 and counts[3] == 0
    ref = softmax64(np.where(np.isin(np.arange(6), [2, 3]), -np.inf, logits))
    assert_close(counts, ref)
    reached = run(np.tile(logits, (n, 1)), [row(params, [], [7, 8]) for _ in range(n)]).token_ids
    assert np.bincount(reached, minlength=6)[2] > n * 0.5  # p(2) = 0.66 once min_tokens is reached


# ---------------------------------------------------------------- min-p / top-k / top-p

def reference_filter(probs, min_p=0.0, top_k=0, top_p=1.0):
    """Independent support + renormalised probabilities: min-p, then top-k, then top-p
    (smallest prefix of the sorted survivors whose mass reaches top_p, crossing token kept)."""
    p = np.array(probs, dtype=np.float64)
    keep = np.ones(len(p), dtype=bool)
    if min_p > 0:
        keep &= p >= min_p * p.max()
    if top_k > 0:
        order = [i for i in np.argsort(-p, kind="stable") if keep[i]]
        keep[:] = False
        keep[order[:top_k]] = True
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        cum, kept = 0.0, np.zeros(len(p), dtype=bool)
        for i in np.argsort(-q, kind="stable"):
            if cum >= top_p or q[i] == 0:
                break
            kept[i] = True
            cum += q[i]
        keep = kept
    q = np.where(keep, p, 0.0)
    return keep, q / q.sum()


def _random_logits(seed, v=50):
    return np.random.default_rng(seed).normal(0, 1.5, size=v)


# (filters, seed of the random logits). The two-filter cases are chosen so that each filter
# alone would keep more tokens than both together (both really act).
FILTERS = [
    (dict(top_k=5), 100),
    (dict(top_k=1), 101),
    (dict(top_p=0.5), 103),
    (dict(top_p=0.9), 103),
    (dict(min_p=0.1), 104),
    (dict(min_p=0.3), 105),
    (dict(top_k=10, top_p=0.8), 100),
    (dict(min_p=0.1, top_p=0.7), 100),
    (dict(min_p=0.05, top_k=8, top_p=0.8), 107),
    (dict(temperature=0.5, top_p=0.7), 108),
    (dict(temperature=1.7, min_p=0.2, top_k=12), 109),
]


@pytest.mark.parametrize("index", range(len(FILTERS)), ids=[str(f) for f, _ in FILTERS])
def test_filters_support_and_distribution(index):
    spec, seed = dict(FILTERS[index][0]), FILTERS[index][1]
    temp = spec.pop("temperature", 1.0)
    logits = _random_logits(seed)
    probs = softmax64(logits / temp)
    keep, expected = reference_filter(probs, **spec)
    if "top_p" in spec:  # keep well away from a cumulative-mass boundary (float32 vs float64)
        q = np.sort(np.where(reference_filter(probs, **{**spec, "top_p": 1.0})[0], probs, 0))[::-1]
        assert np.min(np.abs(np.cumsum(q / q.sum()) - spec["top_p"])) > 1e-3
    if len(spec) == 2 and "top_p" in spec:
        for name in spec:
            assert reference_filter(probs,
                                    **{k: v for k, v in spec.items() if k
                                       != name})[0].sum() > keep.sum()
    assert 1 <= keep.sum() < len(logits)
    counts = draw_many(logits, SamplingParams(temperature=temp, **spec), 3000, seed=index)
    assert set(np.nonzero(counts)[0]) <= set(np.nonzero(keep)[0])
    assert_close(counts, expected)


def test_top_p_keeps_the_crossing_token():
    # probs 0.5, 0.3, 0.2: top_p=0.6 needs {0, 1}; top_p=0.5 is reached by {0} alone.
    logits = np.log([0.5, 0.3, 0.2])
    counts = draw_many(logits, SamplingParams(top_p=0.6), 2000, seed=1)
    assert counts[2] == 0 and counts[1] > 0.3 * 2000
    counts = draw_many(logits, SamplingParams(top_p=0.45), 500, seed=2)
    assert counts[0] == 500


def test_top_k_larger_than_vocab_is_a_no_op():
    logits = _random_logits(7, v=6)
    counts = draw_many(logits, SamplingParams(top_k=100), 3000, seed=4)
    assert_close(counts, softmax64(logits))


@pytest.mark.parametrize("temp", [0.3, 1.0, 2.5])
def test_temperature_scales_the_distribution(temp):
    logits = _random_logits(9, v=12)
    counts = draw_many(logits, SamplingParams(temperature=temp), 4000, seed=int(temp * 10))
    assert_close(counts, softmax64(logits / temp))
    other = 2.5 if temp != 2.5 else 0.3
    assert total_variation(counts, softmax64(logits / other)) > 0.1


def test_mixed_batch_rows_use_their_own_params():
    logits = _random_logits(13, v=20)
    n = 1500
    torch.manual_seed(5)
    rows = [row(temperature=0.4, top_k=3) if i % 2 == 0 else row(temperature=2.0, min_p=0.1)
            for i in range(2 * n)]
    toks = np.array(run(np.tile(logits, (2 * n, 1)), rows).token_ids)
    a, b = np.bincount(toks[0::2], minlength=20), np.bincount(toks[1::2], minlength=20)
    assert_close(a, reference_filter(softmax64(logits / 0.4), top_k=3)[1])
    assert_close(b, reference_filter(softmax64(logits / 2.0), min_p=0.1)[1])


# ------------------------------------------------------------------------------ seeds

def _seeded_draws(seed, positions, batch_extra=0, v=50, global_seed=0):
    """Draw the seeded row at each output position, optionally inside a batch with
    `batch_extra` unseeded rows with other params placed before and after it."""
    torch.manual_seed(global_seed)
    logits = torch.as_tensor(np.tile(_random_logits(21, v=v), (1, 1)), dtype=torch.float32)
    out = []
    for pos in positions:
        mine = row(SamplingParams(temperature=1.0, seed=seed), [1, 2, 3], [4] * pos)
        others = [row(temperature=0.9 + 0.1 * k, top_k=k + 3, seed=None)
                  for k in range(batch_extra)]
        rows = others[: batch_extra // 2] + [mine] + others[batch_extra // 2:]
        noise = torch.randn(len(rows), v) * 0.5
        batch = logits.expand(len(rows), -1) + noise
        batch[batch_extra // 2] = logits[0]
        out.append(sampler(batch.clone(), rows).token_ids[batch_extra // 2])
    return out


def test_seeded_rows_reproduce_across_calls_and_batches():
    positions = list(range(25))
    alone = _seeded_draws(1234, positions, batch_extra=0, global_seed=0)
    assert alone == _seeded_draws(1234, positions, batch_extra=0, global_seed=99)
    assert alone == _seeded_draws(1234, positions, batch_extra=4, global_seed=7)
    assert len(set(alone)) > 5  # the position matters: not the same token every step


def test_different_seeds_differ():
    positions = list(range(25))
    a = _seeded_draws(1, positions)
    b = _seeded_draws(2, positions)
    assert sum(x != y for x, y in zip(a, b)) > 10


def test_seeded_draws_follow_the_distribution():
    logits = _random_logits(31, v=10)
    n = 3000
    params = [SamplingParams(temperature=0.7, seed=s, top_k=6) for s in range(n)]
    out = run(np.tile(logits, (n, 1)), [row(p, [], [0, 0]) for p in params]).token_ids
    counts = np.bincount(out, minlength=10)
    keep, expected = reference_filter(softmax64(logits / 0.7), top_k=6)
    assert set(np.nonzero(counts)[0]) <= set(np.nonzero(keep)[0])
    assert_close(counts, expected)


def test_unseeded_rows_are_random():
    logits = _random_logits(41, v=50)
    torch.manual_seed(0)
    a = [run([logits], [row(temperature=1.0)]).token_ids[0] for _ in range(20)]
    assert len(set(a)) > 3


# --------------------------------------------------------------------------- logprobs

def _reference_logprobs(raw):
    lp = torch.log_softmax(torch.as_tensor(raw, dtype=torch.float64), -1).numpy()
    ranks = {int(t): int((lp > lp[t]).sum()) + 1 for t in range(len(lp))}
    return lp, ranks


@pytest.mark.parametrize("top_n", [0, 1, 5, 20])
def test_logprobs_match_log_softmax_of_raw_logits(top_n):
    g = torch.Generator().manual_seed(top_n)
    raw = torch.randn(6, 64, generator=g) * 2
    rows = [row(SamplingParams(temperature=t, logprobs=top_n), [1, 2], [3])
            for t in (0.0, 0.5, 1.0, 1.5, 0.0, 2.0)]
    out = run(raw, rows)
    for i, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        lp, ranks = _reference_logprobs(raw[i])
        assert next(iter(lps)) == tok  # sampled token first
        top = [int(t) for t in np.argsort(-lp, kind="stable")[:top_n]]
        assert set(lps) == set(top) | {tok}
        for t, entry in lps.items():
            assert entry.logprob == pytest.approx(lp[t], abs=1e-5)
            assert entry.rank == ranks[t]
        assert [lps[t].rank for t in top] == list(range(1, top_n + 1))


def test_logprobs_include_sampled_token_outside_top_n():
    raw = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    params = SamplingParams(temperature=0.0, logprobs=2, min_tokens=1)
    params.all_stop_token_ids = {0, 1, 2}  # forces the choice of token 3 (rank 4)
    out = run([raw], [row(params, [], [])])
    assert out.token_ids == [3]
    lps = out.logprobs[0]
    lp, _ = _reference_logprobs(raw)
    assert list(lps) == [3, 0, 1]
    assert [lps[t].rank for t in (3, 0, 1)] == [4, 1, 2]
    assert lps[3].logprob == pytest.approx(lp[3], abs=1e-5)


def test_penalties_and_temperature_do_not_change_logprobs():
    raw = _random_logits(51, v=16)
    prompt, output = [0, 1, 2], [0, 3, 3, 5]
    lp, ranks = _reference_logprobs(raw)
    plain = run([raw],
                [row(SamplingParams(temperature=0.0, logprobs=16), prompt, output)]).logprobs[0]
    pen = SamplingParams(temperature=0.3, logprobs=16, repetition_penalty=1.9,
                         frequency_penalty=1.5, presence_penalty=1.0, top_k=2)
    penalised = run([raw], [row(pen, prompt, output)]).logprobs[0]
    for lps in (plain, penalised):
        assert set(lps) == set(range(16))
        for t in range(16):
            assert lps[t].logprob == pytest.approx(lp[t], abs=1e-5)
            assert lps[t].rank == ranks[t]


def test_no_logprobs_unless_requested():
    raw = _random_logits(61, v=8)
    out = run(np.stack([raw, raw]), [row(temperature=0.0), row(temperature=1.0, logprobs=None)])
    assert out.logprobs == [None, None]


# ------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_match_cpu():
    """The model runner hands the sampler logits on its own device: penalties, seeds, filters
    and logprobs must work there, and a seeded row must give the same token as on the CPU."""
    raw = torch.as_tensor(np.stack([_random_logits(70 + i, v=64) for i in range(4)]),
                          dtype=torch.float32)
    rows = [row(SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5,
                               logprobs=3), [1, 2], [3]),
            row(SamplingParams(temperature=0.8, seed=42, top_k=10, top_p=0.9, min_p=0.01), [1],
                [5, 6]),
            row(SamplingParams(temperature=1.0, presence_penalty=1.0), [], [7]),
            row(SamplingParams(temperature=0.0, min_tokens=2), [], [])]
    rows[3].params.all_stop_token_ids = {int(raw[3].argmax())}
    cpu = sampler(raw.clone(), rows)
    gpu = sampler(raw.clone().cuda(), rows)
    assert gpu.token_ids[0] == cpu.token_ids[0] and gpu.token_ids[3] == cpu.token_ids[3]
    assert gpu.token_ids[1] == cpu.token_ids[1]  # seeded: same noise on any device
    for t, lp in cpu.logprobs[0].items():
        assert gpu.logprobs[0][t].rank == lp.rank
        assert gpu.logprobs[0][t].logprob == pytest.approx(lp.logprob, abs=1e-4)


# ---- the C draw (cpu_ops.sample_rows), which plain CPU rows take -----------------------

needs_c = pytest.mark.skipif(not cpu_ops.available(), reason="the C sampler needs a C compiler")


def _allowed_picks(logits, temps, u, rel=1e-5):
    """Per row, the tokens an exact (float64) inverse-CDF draw could pick given fp32 sums:
    the token whose CDF interval holds u * total, and a neighbour when u * total lies
    within `rel` of the boundary between them (fp32 sums of 50k terms in another order
    move boundaries by ~1e-6). The window holds 2e-5 of the probability mass (a few
    low-weight tokens at most): a draw off by more fails. Argmax at T=0."""
    allowed = []
    for l, t, uu in zip(logits.double(), temps.tolist(), u.tolist()):
        if t == 0:
            allowed.append({int(l.argmax())})
            continue
        cdf = (l / t - (l / t).max()).exp().cumsum(-1)
        target, slack = uu * float(cdf[-1]), rel * float(cdf[-1])
        lo = int(torch.searchsorted(cdf, torch.tensor([target - slack], dtype=torch.float64),
                                    right=True))
        hi = int(torch.searchsorted(cdf, torch.tensor([target + slack], dtype=torch.float64),
                                    right=True))
        allowed.append(set(range(lo, min(hi, len(cdf) - 1) + 1)))
    return allowed


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 16, 1000, 49152])  # under, at and over a 16-token chunk
def test_c_draw_is_the_inverse_cdf_draw_of_its_uniforms(gen, dtype, vocab):
    g = gen
    rows = 24
    logits = (torch.randn(rows, vocab + 5, generator=g) * 3).to(dtype)[:, :vocab]  # a strided view
    temps = torch.tensor([0.0, 0.5, 1.0, 1.7] * (rows // 4), dtype=torch.float32)
    u = torch.rand(rows, generator=g)
    picks = cpu_ops.sample_rows(logits, temps, u).tolist()
    allowed = _allowed_picks(logits, temps, u)
    assert all(p in a for p, a in zip(picks, allowed)), [(p, a) for p, a in zip(picks, allowed)
                                                         if p not in a]


@needs_c
def test_c_draw_never_picks_a_zero_weight_token():
    logits = torch.full((4, 100), -1e4)
    logits[:, [3, 40, 41, 97]] = torch.tensor([0.0, 1.0, -2.0, 0.5])  # exp(-1e4 - max) == 0
    temps = torch.ones(4)
    u = torch.tensor([0.0, 1e-9, 0.999999, 1.0 - 2 ** -24])
    picks = cpu_ops.sample_rows(logits, temps, u).tolist()
    assert picks[0] == picks[1] == 3 and picks[2] == picks[3] == 97


@needs_c
def test_plain_rows_take_the_c_draw_and_others_do_not(monkeypatch):
    calls = []
    real = cpu_ops.sample_rows
    monkeypatch.setattr(cpu_ops, "sample_rows", lambda *a: calls.append(1) or real(*a))
    logits = torch.randn(3, 50)
    plain = [row(temperature=0.8, seed=1), row(temperature=0), row(temperature=1.0)]
    sampler(logits.clone(), plain)
    assert calls == [1]
    for special in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(logprobs=1),
                    dict(repetition_penalty=1.2), dict(min_tokens=2, stop_token_ids=[1])):
        sampler(logits[:1].clone(), [row(temperature=1.0, **special)])
    assert calls == [1]


@needs_c
def test_seeded_rows_draw_the_same_tokens_on_the_c_and_torch_paths(monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 300, generator=g) * 2  # short rows: fp32 sums agree to ~1e-7
    rows = [row(temperature=0.7 + 0.01 * i, seed=i, output=[0] * (i % 5)) for i in range(64)]
    c_path = sampler(logits.clone(), rows).token_ids
    monkeypatch.setattr(Sampler, "_c_path", classmethod(lambda cls, logits, rows: False))
    assert sampler(logits.clone(), rows).token_ids == c_path
