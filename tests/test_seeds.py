"""Seeds: each prompt's sample is a function of the seed and the prompt's index in the input.

The engine picks every token by inverse CDF at a counter-based uniform keyed on (seed, row id,
output position), so a prompt's sample does not depend on the batch size, its neighbours or
the draft. Checked here: the uniform generator itself, the inverse-CDF sampler, and the engine
and API end to end on tiny float64 models.
"""

import math

import pytest
import torch

from glide import api
from glide.draft import GlideDraft
from glide.speculative.drafts import ModelDraft, PromptLookupDraft
from glide.speculative.engine import generate_ids
from glide.speculative.verify import counter_uniforms, sample, stream_keys
from glide_helpers import tiny_draft, tiny_target

# ---------------------------------------------------------------- the uniform generator
MASK = (1 << 64) - 1


def _splitmix64(seed: int, n: int) -> int:
    """Output number ``n`` of splitmix64 from ``seed``, in Python ints (the reference)."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_uniforms_are_splitmix64_in_int64_ops():
    assert _splitmix64(0, 0) == 0xE220A8397B1DCDAF  # the published first output for seed 0
    keys = [0, 1, -1, 2 ** 62 + 12345, -(2 ** 63), 0x0123456789ABCDEF]
    counters = [0, 1, 2, 1000, 2 ** 40 + 7]
    got = counter_uniforms(torch.tensor(keys)[:, None], torch.tensor(counters)[None, :])
    want = torch.tensor([[(_splitmix64(k & MASK, n) >> 11) * 2.0 ** -53 for n in counters] for k in keys],
                        dtype=torch.float64)
    assert got.dtype == torch.float64
    assert torch.equal(got, want), (got - want).abs().max()


def test_uniforms_are_in_range_distinct_and_uniform():
    keys = stream_keys(11, range(64))
    u = counter_uniforms(keys[:, None], torch.arange(1024)[None, :])  # (64, 1024)
    flat = u.flatten()
    n = flat.numel()
    assert flat.min() >= 0 and flat.max() < 1
    assert flat.unique().numel() == n  # 65536 53-bit values: a collision has probability ~2e-7
    # Kolmogorov-Smirnov against U(0, 1), with the DKW bound at delta = 1e-6
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (ecdf - flat.sort().values).abs().max().item()
    assert ks < math.sqrt(math.log(2e6) / (2 * n)), ks
    # 64 buckets: chi-square with 63 degrees of freedom (mean 63, sd 11.2); 150 is 7.7 sd out
    counts = torch.bincount((flat * 64).long(), minlength=64).double()
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 150, chi2
    # neighbouring counters and neighbouring keys are uncorrelated (|r| < 5 / sqrt(n))
    c = u - 0.5
    for a, b in [(c[:, 1:], c[:, :-1]), (c[1:], c[:-1])]:
        r = (a * b).mean() / (c * c).mean()
        assert abs(r.item()) < 5 / math.sqrt(a.numel()), r


def test_streams_depend_on_seed_row_and_counter_only():
    a = stream_keys(11, [0, 1, 2, 3])
    assert a.unique().numel() == 4
    assert torch.equal(stream_keys(11, [2]), a[2:3])  # a row's key ignores its neighbours
    assert not torch.equal(stream_keys(12, [0, 1, 2, 3]), a)
    assert (stream_keys(12, [0, 1, 2, 3]) != a).all()
    counters = torch.arange(10)
    u = counter_uniforms(a[:, None], counters)
    assert torch.equal(counter_uniforms(a[2], counters), u[2])
    assert u.unique().numel() == u.numel()
    assert stream_keys(2 ** 70 + 5, [0]).dtype == torch.int64  # any Python int seeds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uniforms_and_samples_are_the_same_on_cuda():
    keys = stream_keys(3, range(16))
    counters = torch.arange(256)
    u = counter_uniforms(keys[:, None], counters)
    u_gpu = counter_uniforms(stream_keys(3, range(16), device="cuda")[:, None], counters.cuda())
    assert torch.equal(u_gpu.cpu(), u)
    probs = torch.softmax(torch.randn(16, 256, 50, generator=torch.Generator().manual_seed(0)), -1)
    probs[..., ::7] = 0
    assert torch.equal(sample(probs.cuda(), uniforms=u.cuda()).cpu(), sample(probs, uniforms=u))


# ---------------------------------------------------------------- inverse-CDF sampling
def _edge_uniforms(cdf: torch.Tensor) -> torch.Tensor:
    """0, the largest double below 1, and every CDF step with its two neighbours, sorted."""
    steps = cdf.to(torch.float64)
    near = torch.cat([steps, torch.nextafter(steps, torch.zeros_like(steps)),
                      torch.nextafter(steps, torch.ones_like(steps))])
    u = torch.cat([torch.tensor([0.0, 1 - 2.0 ** -53], dtype=torch.float64), near.clamp(0, 1 - 2.0 ** -53)])
    return torch.cat([u, torch.linspace(0, 1 - 2.0 ** -53, 10001, dtype=torch.float64)]).sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_cdf_never_picks_a_zero_probability_token(dtype):
    gen = torch.Generator().manual_seed(0)
    rows = [torch.tensor([0.0, 0.3, 0.0, 0.0, 0.7, 0.0]),  # zeros first, between and last
            torch.tensor([0.0, 0.0, 1.0, 0.0]),
            torch.tensor([1e-30, 0.0, 0.5, 0.0, 0.5, 0.0])]
    rows += [torch.softmax(torch.randn(37, generator=gen) * 3, -1) for _ in range(20)]
    for i, p in enumerate(rows):
        p = p.to(dtype)
        if i >= 3:  # a top-p style cut
            p = torch.where(p >= p.median(), p, 0)
            p = p / p.sum()
        u = _edge_uniforms(p.to(torch.float64).cumsum(0))
        picked = sample(p.expand(len(u), -1), uniforms=u)
        assert (p[picked] > 0).all(), (i, picked[p[picked] == 0].unique())
        assert picked.diff().min() >= 0  # the inverse CDF is monotone in u
        last = sample(p[None], uniforms=torch.ones(1, dtype=torch.float64))  # u = 1 is out of range, yet safe
        assert p[last] > 0


def test_inverse_cdf_sums_in_float64():
    # 1e-9 is below float32's spacing at 1: a float32 running sum would never reach token 2
    p = torch.tensor([0.25, 0.75, 1e-9], dtype=torch.float32)
    total = 1.0 + float(p[2])
    u = torch.tensor([0.0, 0.2, 0.5, 1 - 2e-10], dtype=torch.float64)
    assert sample(p.expand(4, -1), uniforms=u).tolist() == [0, 0, 1, 2]
    assert (1 - 2e-10) * total > 1.0


def test_inverse_cdf_has_the_law_of_probs():
    V, n = 7, 200_000
    p = torch.tensor([0.05, 0.0, 0.3, 0.15, 0.0, 0.4, 0.1], dtype=torch.float32)
    u = counter_uniforms(stream_keys(5, [0, 1]), torch.arange(n // 2)[:, None]).flatten()
    picked = sample(p.expand(n, V), uniforms=u)
    emp = torch.bincount(picked, minlength=V).double() / n
    tv = 0.5 * (emp - p.double()).abs().sum().item()
    # E[TV] <= sqrt(K / n) / 2 and TV is 1/n-Lipschitz per sample (McDiarmid, delta = 1e-6)
    assert tv < 0.5 * math.sqrt(5 / n) + math.sqrt(math.log(1e6) / (2 * n)), tv
    assert emp[[1, 4]].sum() == 0


def test_sample_checks_the_uniforms_shape():
    with pytest.raises(ValueError, match="uniforms"):
        sample(torch.ones(3, 5), uniforms=torch.zeros(4))


# ---------------------------------------------------------------- the engine
MAX_NEW = 16
EOS = (2,)
# repeats, different lengths, and a prompt whose 4-grams recur (prompt lookup proposes)
PROMPTS = [[1, 4, 5], [7, 8, 9, 10, 7, 8, 9, 10, 7, 8], [1, 4, 5], [3], [11, 12, 13, 14],
           [1, 4, 5], [6, 6, 6, 6, 6, 6], [20, 21]]


@pytest.fixture(scope="module")
def target():
    return tiny_target(seed=3, vocab=23, std=0.3)


def _draft(kind, target):
    if kind == "ar":
        return None
    if kind == "lookup":
        return PromptLookupDraft(3, 4)
    if kind == "model_self":  # shares the target's weights: its top-2 trees get accepted deeply
        return ModelDraft(tiny_target(seed=3, vocab=23, std=0.3), (2, 2, 1))
    return GlideDraft(tiny_draft(target, seed=1), gamma=3)


def _run(target, kind, batch_size, seed=11, temperature=1.0, top_p=1.0):
    """The engine over PROMPTS in chunks of ``batch_size``, each prompt keyed by its index."""
    outs = []
    for start in range(0, len(PROMPTS), batch_size):
        chunk = list(range(start, min(start + batch_size, len(PROMPTS))))
        outs += generate_ids(target, [PROMPTS[i] for i in chunk], _draft(kind, target), max_new_tokens=MAX_NEW,
                             temperature=temperature, top_p=top_p, eos_token_ids=EOS, seed=seed, row_ids=chunk)
    return outs


@pytest.fixture(scope="module")
def ar_one(target):
    return [o.output_ids for o in _run(target, "ar", 1)]


def test_repeated_prompt_gets_different_samples_at_batch_size_one(target, ar_one):
    repeats = [ar_one[i] for i, p in enumerate(PROMPTS) if p == [1, 4, 5]]
    assert len(repeats) == 3 and len({tuple(x) for x in repeats}) == 3
    assert len({tuple(x) for x in ar_one}) == len(PROMPTS)
    # the stream is a function of the row id: row 2 alone, under row 0's id, repeats row 0
    again = generate_ids(target, [PROMPTS[2]], max_new_tokens=MAX_NEW, temperature=1.0, eos_token_ids=EOS,
                         seed=11, row_ids=[0])
    assert again[0].output_ids == ar_one[0]


@pytest.mark.parametrize("kind", ["ar", "lookup", "model_self", "glide"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_samples_do_not_depend_on_batch_size_or_draft(target, ar_one, kind, top_p):
    runs = {bs: _run(target, kind, bs, top_p=top_p) for bs in (1, 3, 8)}
    ids = {bs: [o.output_ids for o in out] for bs, out in runs.items()}
    assert ids[3] == ids[1], _first_difference(ids[1], ids[3])
    assert ids[8] == ids[1], _first_difference(ids[1], ids[8])
    # the uniforms are keyed on output positions, so every draft emits the AR sample
    ar = ar_one if top_p == 1.0 else [o.output_ids for o in _run(target, "ar", 8, top_p=top_p)]
    assert ids[1] == ar, _first_difference(ar, ids[1])
    assert any(o.output_ids[-1] in EOS for o in runs[1]), "no sequence stopped at EOS"
    if kind == "model_self":  # not vacuous: multi-token verifications happened
        assert max(max(o.accepted, default=1) for o in runs[1]) >= 3


def test_the_seed_changes_the_samples(target, ar_one):
    other = [o.output_ids for o in _run(target, "ar", 8, seed=12)]
    assert sum(a != b for a, b in zip(ar_one, other)) >= len(PROMPTS) - 1


def _first_difference(want, got):
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"prompt {i} differs from token {k}: {a[k:k + 4]} vs {b[k:k + 4]}"
    return "lengths differ" if len(want) != len(got) else "equal"


# ---------------------------------------------------------------- the API
class _Tokenizer:
    chat_template = None
    eos_token_id = None
    pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 20 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


@pytest.mark.parametrize("method", ["ar", "lookup"])
def test_api_samples_depend_on_the_prompt_index_not_the_batch(target, method):
    prompts = ["hello there"] * 8
    loaded = (target, _Tokenizer())
    runs = {bs: [r["output_ids"] for r in api.generate(prompts, method=method, loaded=loaded, max_new_tokens=12,
                                                       temperature=1.0, seed=11, batch_size=bs)]
            for bs in (1, 3, 8)}
    assert len({tuple(x) for x in runs[1]}) >= 6  # the same prompt, resampled at batch size 1
    assert runs[3] == runs[1] and runs[8] == runs[1]
