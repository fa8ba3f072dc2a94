"""The generation engine against Hugging Face transformers: per-request sampling with
transformers' logits processors as the oracle, stop rules, streaming text and the
compile discipline (no compilation after warm-up)."""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
import torch
import transformers
from transformers import LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, \
    SequenceBiasLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import ryzen_jax as rj
from ryzen_jax import kernels
from ryzen_jax.engine.sampling import History, SamplingArrays, add_bias, filtered_logits, greedy_tokens
from ryzen_jax.engine.text import Detokenizer
from tests import hf_models

PROMPT = [1, 17, 42, 99, 3, 243, 128, 64, 5, 77, 31, 17, 42]
# every knob on at once, in the range where each one changes the distribution
KNOBS = rj.SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3)
# a flatter setting for the frequency test: about 30 tokens survive the filters
FLAT = rj.SamplingParams(temperature=2.0, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def llama(hf_model_dir):
    return rj.load_model(hf_model_dir("llama_gqa"), tp=4, progress=False)


@pytest.fixture(scope="module")
def llama_dp2(hf_model_dir):
    """The same model at dp 2 × tp 2: rows split over data as well as heads over model."""
    return rj.load_model(hf_model_dir("llama_gqa"), tp=2, dp=2, progress=False)


@pytest.fixture(scope="module")
def hf_llama(hf_model_dir):
    return hf_models.load(hf_model_dir("llama_gqa"))


class OpenAIPenalties(transformers.LogitsProcessor):
    """OpenAI's presence and frequency penalties as its API reference defines them
    (``logit[j] -= c[j] * frequency + (c[j] > 0) * presence``, c[j]: how often token j
    was generated so far, the prompt not counted), for transformers' generate loop,
    which has no such processor of its own."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids[:, self.prompt_len:],
                                                        torch.ones_like(input_ids[:, self.prompt_len:], dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def hf_processed(hf_model, prompt: list[int], p: rj.SamplingParams, generated: list[int] = ()) -> np.ndarray:
    """transformers' scores for the next token after its processors, in generate's order
    (its sequence bias of one-token sequences for the logit bias; OpenAI's penalties
    after the repetition penalty, before the temperature, as vLLM applies them),
    ``generated`` being the tokens generated after ``prompt`` so far."""
    procs = LogitsProcessorList([SequenceBiasLogitsProcessor(sequence_bias_of(p))] if p.logit_bias else [])
    procs.extend([RepetitionPenaltyLogitsProcessor(p.repetition_penalty),
                                 OpenAIPenalties(len(prompt), p.presence_penalty, p.frequency_penalty),
                                 TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(MinPLogitsWarper(p.min_p))
    ids = torch.tensor([list(prompt) + list(generated)])
    with torch.no_grad():
        scores = hf_model(ids).logits[:, -1].float()
    return procs(ids, scores)[0].numpy()


def our_filtered(logits: np.ndarray, prompt: list[int], p: rj.SamplingParams,
                 generated: list[int] = ()) -> np.ndarray:
    h = History(prompt=np.zeros((1, logits.shape[-1]), bool), counts=np.zeros((1, logits.shape[-1]), np.int32))
    h.prompt[0, prompt] = True
    np.add.at(h.counts[0], list(generated), 1)
    s = SamplingArrays.from_params([p], [0], logits.shape[-1])
    biased = add_bias(logits[None].astype(np.float32), s.bias_ids, s.bias)
    return np.asarray(filtered_logits(biased, s, h))[0]


def sequence_bias_of(p: rj.SamplingParams) -> dict[tuple[int], float]:
    """A logit bias as transformers' ``sequence_bias`` (one-token sequences)."""
    return {(t,): b for t, b in p.logit_bias}


def test_processors_match_transformers(hf_llama):
    """Penalties, temperature, top-k, top-p and min-p keep exactly transformers' tokens,
    with the same probabilities, for several settings; OpenAI's penalties count only
    generated tokens (some of them twice here, one also in the prompt)."""
    generated = [7, 7, 17, 200, 7]
    with torch.no_grad():
        logits = hf_llama(torch.tensor([PROMPT + generated])).logits[0, -1].numpy()
    for p in (KNOBS, rj.SamplingParams(temperature=1.3, top_p=0.5), rj.SamplingParams(temperature=1.0, min_p=0.1),
              rj.SamplingParams(temperature=0.5, top_k=5, repetition_penalty=0.8),
              rj.SamplingParams(temperature=0.8, top_k=30, presence_penalty=1.5, frequency_penalty=0.7),
              rj.SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.2, presence_penalty=-0.5,
                                frequency_penalty=2.0),
              rj.SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.3,
                                logit_bias={7: -100, 17: 2.5, 200: -1.0, 64: 4.0, 230: 9.0})):
        ours = our_filtered(logits, PROMPT, p, generated)
        theirs = hf_processed(hf_llama, PROMPT, p, generated)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs), err_msg=str(p))
        kept = np.isfinite(theirs)
        assert 1 < kept.sum() < len(kept)
        prob = lambda x: np.exp(x[kept] - x[kept].max()) / np.exp(x[kept] - x[kept].max()).sum()  # noqa: E731
        np.testing.assert_allclose(prob(ours), prob(theirs), atol=1e-5)


@pytest.mark.parametrize("path", ["xla", "kernel"])
@pytest.mark.parametrize("vocab", [32000, 32003, 5])
def test_greedy_tokens_match_torch_argmax(path, vocab):
    """The greedy pick is torch's argmax (the one HF's greedy search takes), by XLA's
    reductions and by our CPU kernel (one-device CPU mesh): ties go to the first index,
    -inf rows to 0, and a NaN wins wherever it stands; vocabularies off the kernel's
    8-wide step."""
    if path == "kernel" and not kernels.load():
        pytest.skip("the CPU kernels cannot be built here")
    rng = np.random.default_rng(vocab)
    rows = rng.standard_normal((8, vocab)).astype(np.float32)
    rows[1, [1, 3, vocab - 1]] = 50.0  # a three-way tie, the last in the tail
    rows[2] = -np.inf
    rows[3, vocab - 1] = 99.0  # the last entry
    rows[4, [vocab // 2, 2]] = np.nan
    rows[5] = np.round(rows[5])  # many ties at the maximum
    rows[6, vocab - 1] = np.nan  # a NaN in the tail only
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:1])
    with kernels.for_mesh(mesh) if path == "kernel" else contextlib.nullcontext():
        pick = jax.jit(lambda x: greedy_tokens(x))  # a fresh trace: jit's cache does not know the mesh context
        text = pick.lower(rows).as_text()
        ours = np.asarray(pick(rows))
    assert (kernels.GREEDY_TARGET in text) == (path == "kernel")
    np.testing.assert_array_equal(ours, torch.argmax(torch.from_numpy(rows), dim=-1).numpy())


def test_sampled_frequencies_follow_the_transformers_distribution(llama, hf_llama):
    """2048 seeded draws of the first token: a chi-square test against transformers'
    processed distribution (p-value > 1e-3; the test fails by chance 1 run in 1000)."""
    n = 2048
    requests = [rj.Request(PROMPT, 1, rj.SamplingParams(**{**FLAT.__dict__, "seed": i}), ignore_eos=True)
                for i in range(n)]
    result = rj.GenerationResult(completions=[])
    for _ in llama.generator.run(requests, stats=result):
        pass
    drawn = np.array([c.generated_ids[0] for c in result.completions])
    scores = hf_processed(hf_llama, PROMPT, FLAT)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    support = np.flatnonzero(probs > 0)
    assert set(drawn) <= set(support)
    counts = np.array([(drawn == t).sum() for t in support])
    expected = probs[support] * n
    # pool tokens expected fewer than 5 times into one cell, as the chi-square test requires
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    statistic = ((obs - exp) ** 2 / exp).sum()
    p_value = float(jax.scipy.special.gammaincc((len(obs) - 1) / 2, statistic / 2))  # chi-square survival
    print(f"\nchi-square over {len(obs)} cells: p = {p_value:.3f}")
    assert len(obs) >= 20  # a test with power: many tokens in play
    assert p_value > 1e-3


def test_seeded_sampling_is_reproducible_across_meshes_and_batches(hf_model_dir, llama, llama_dp2):
    """Same seed → same tokens at tp 1, tp 4 and dp 2 × tp 2, alone or inside a batch
    with other requests' settings; another seed → other tokens."""
    p = rj.SamplingParams(**{**KNOBS.__dict__, "seed": 11})
    alone = llama.generator.generate([PROMPT], 24, p, stop_ids=[]).generated_ids[0]
    mixed = llama.generator.generate([PROMPT[:4], PROMPT, [9, 8, 7]], 24,
                                     [rj.SamplingParams(temperature=1.0, seed=1), p, rj.SamplingParams()],
                                     stop_ids=[]).generated_ids
    assert mixed[1] == alone
    for other in (rj.load_model(hf_model_dir("llama_gqa"), tp=1, progress=False), llama_dp2):
        assert other.generator.generate([PROMPT], 24, p, stop_ids=[]).generated_ids[0] == alone
    different = llama.generator.generate([PROMPT], 24, rj.SamplingParams(**{**KNOBS.__dict__, "seed": 12}),
                                         stop_ids=[]).generated_ids[0]
    assert different != alone
    unseeded = [llama.generator.generate([PROMPT], 24, rj.SamplingParams(temperature=1.0), stop_ids=[])
                .generated_ids[0] for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # no seed: a fresh one per request


def test_greedy_repetition_penalty_matches_transformers(llama, hf_llama):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                                do_sample=False, repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)
    ours = llama.generator.generate([PROMPT], 24, rj.SamplingParams(repetition_penalty=1.5), stop_ids=[])
    assert ours.generated_ids[0] == ref[0, len(PROMPT):].tolist()


def test_logit_bias_matches_transformers_sequence_bias(llama, hf_llama, llama_dp2):
    """OpenAI's logit bias, greedy over 16 tokens, against transformers' generate with
    the same biases as its ``sequence_bias``: banning the plain greedy path's tokens and
    favouring others, alone and with a repetition penalty, each row with its own
    biases in one batch (an unbiased row stays plain greedy) at tp 4 and dp 2 × tp 2.
    A sampled row whose +100 biases single out three tokens draws only those, and the
    reported log-probabilities stay the model's own."""
    ids = torch.tensor([PROMPT])
    plain = llama.generator.generate([PROMPT], 16, stop_ids=[]).generated_ids[0]
    settings = [rj.SamplingParams(logit_bias={plain[0]: -100, plain[2]: -100, 250: 3.0}),
                rj.SamplingParams(repetition_penalty=1.3, logit_bias=[(plain[1], -100.0), (5, 6.0), (77, 2.0)]),
                rj.SamplingParams()]
    refs = []
    for p in settings:
        extra = {"sequence_bias": sequence_bias_of(p)} if p.logit_bias else {}
        with torch.no_grad():
            out = hf_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                    do_sample=False, repetition_penalty=p.repetition_penalty, eos_token_id=None,
                                    pad_token_id=0, **extra)
        refs.append(out[0, len(PROMPT):].tolist())
    assert refs[2] == plain and refs[0] != plain and refs[1] != plain  # the biases change the tokens
    for lm in (llama, llama_dp2):
        assert lm.generator.generate([PROMPT] * 3, 16, settings, stop_ids=[]).generated_ids == refs

    few = {3: 100.0, 64: 100.0, 128: 100.0}
    sampled = [rj.SamplingParams(temperature=1.0, seed=5, logit_bias=few, logprobs=1),
               rj.SamplingParams(temperature=1.0, seed=5)]
    result = rj.GenerationResult(completions=[])
    for _ in llama.generator.run([rj.Request(PROMPT, 16, p, ignore_eos=True) for p in sampled], stats=result):
        pass
    biased, free = result.completions
    assert set(biased.generated_ids) <= set(few) and len(set(biased.generated_ids)) > 1
    assert not set(free.generated_ids) <= set(few)
    with torch.no_grad():
        logp = torch.log_softmax(hf_llama(torch.tensor([PROMPT + biased.generated_ids])).logits[0, len(PROMPT) - 1:-1],
                                 -1).numpy()
    np.testing.assert_allclose(biased.logprobs, logp[np.arange(16), biased.generated_ids], atol=1e-4)


def test_greedy_presence_and_frequency_penalties_match_openai_rule(llama, hf_llama):
    """OpenAI's penalties, greedy over 24 tokens, against transformers' generate with
    the rule as a logits processor: the same tokens at tp 4, each row with its own
    settings in one batch (a row without penalties is plain greedy)."""
    settings = [rj.SamplingParams(frequency_penalty=2.0), rj.SamplingParams(presence_penalty=-2.0),
                rj.SamplingParams(repetition_penalty=1.2, presence_penalty=1.0, frequency_penalty=-1.0),
                rj.SamplingParams()]
    ids = torch.tensor([PROMPT])
    refs = []
    for p in settings:
        with torch.no_grad():
            out = hf_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                                    do_sample=False, repetition_penalty=p.repetition_penalty, eos_token_id=None,
                                    pad_token_id=0, logits_processor=LogitsProcessorList(
                                        [OpenAIPenalties(len(PROMPT), p.presence_penalty, p.frequency_penalty)]))
        refs.append(out[0, len(PROMPT):].tolist())
    assert len({tuple(r) for r in refs}) == len(refs)  # every setting changes the tokens
    requests = [rj.Request(PROMPT, 24, p, ignore_eos=True) for p in settings]
    result = rj.GenerationResult(completions=[])
    for _ in llama.generator.run(requests, stats=result):
        pass
    assert [c.generated_ids for c in result.completions] == refs


def test_logprobs_are_the_models_own_against_transformers(llama, hf_llama, llama_dp2):
    """Each generated token's log-probability and the k best alternatives are the
    log-softmax of transformers' logits at that step (before any processor): greedy
    and sampled rows with their own k, and a row that asks for none, in one batch at
    tp 4, plain and streamed (one step per dispatch), and at dp 2 × tp 2."""
    settings = [rj.SamplingParams(logprobs=5), rj.SamplingParams(temperature=0.9, seed=3, logprobs=0),
                rj.SamplingParams(), rj.SamplingParams(repetition_penalty=1.3, logprobs=20)]
    requests = [rj.Request(PROMPT, 12, p, ignore_eos=True) for p in settings]
    for lm, steps in ((llama, 32), (llama, 1), (llama_dp2, 32)):
        result = rj.GenerationResult(completions=[])
        for _ in lm.generator.run(requests, steps_per_dispatch=steps, stats=result):
            pass
        assert result.completions[2].logprobs is None and result.completions[2].top_logprobs is None
        for c, p in zip(result.completions, settings):
            if p.logprobs is None:
                continue
            ids = torch.tensor([PROMPT + c.generated_ids])
            with torch.no_grad():
                logp = torch.log_softmax(hf_llama(ids).logits[0, len(PROMPT) - 1:-1].float(), -1).numpy()
            np.testing.assert_allclose(c.logprobs, logp[np.arange(12), c.generated_ids], atol=1e-4)
            assert [len(t) for t in c.top_logprobs] == [p.logprobs] * 12
            for step, top in enumerate(c.top_logprobs):
                want = np.sort(logp[step])[::-1][:p.logprobs]
                np.testing.assert_allclose([lp for _, lp in top], want, atol=1e-4)
                np.testing.assert_allclose(logp[step, [t for t, _ in top]], want, atol=1e-4)  # the ids name them
            if p.greedy and p.repetition_penalty == 1:
                assert [top[0][0] for top in c.top_logprobs] == c.generated_ids


def test_server_slots_report_logprobs_only_where_asked(llama, hf_llama):
    """In a server's decode slots, a request with logprobs gets transformers' values
    while its neighbour without them gets none; free and finished slots never make a
    dispatch compute them (the decode step then returns zeros for every row)."""
    from ryzen_jax.engine.batcher import Admission, Plan, SlotBatcher

    batcher = SlotBatcher(llama.generator, 4)
    plain = rj.Request(PROMPT, 6, rj.SamplingParams(), ignore_eos=True)
    asking = rj.Request(PROMPT[:7], 3, rj.SamplingParams(logprobs=2), ignore_eos=True)

    def decode_logprobs() -> np.ndarray:  # one raw dispatch of the slots' decode program, state left as it was
        g = batcher.gen
        cache, d = jax.tree.map(lambda x: x.copy(), (batcher.cache, batcher.d))
        picked, _, _ = g.decode_program(batcher.slots, g.max_seq_len)(g.state, cache, d, batcher.s, np.int32(1))
        return np.asarray(picked.logprobs[:, 0])

    out = batcher.apply(Plan(admit=(Admission(0, plain, 0),), steps=0))
    assert out.deltas[0].logprobs is None
    assert not decode_logprobs().any()  # one live row, three free slots: nothing computed
    deltas = batcher.apply(Plan(admit=(Admission(2, asking, 0),), steps=2)).deltas
    mine = [d for d in deltas if d.index == 2]
    ids = [t for d in mine for t in d.token_ids]
    lps = [lp for d in mine for lp in d.logprobs]
    with torch.no_grad():
        logp = torch.log_softmax(hf_llama(torch.tensor([PROMPT[:7] + ids])).logits[0, 6:-1].float(), -1).numpy()
    np.testing.assert_allclose(lps, logp[np.arange(len(ids)), ids], atol=1e-4)
    assert all(d.logprobs is None for d in deltas if d.index == 0)
    assert batcher.rows[2] is None  # finished after its 3 tokens
    assert not decode_logprobs().any()  # its slot is done: nothing computed for it


def test_prompt_logprobs_score_the_prompt_against_transformers(llama, hf_llama, llama_dp2, monkeypatch):
    """``prompt_logprobs``: every prompt token's log-probability given those before it
    (none for the first) and the k best there are the log-softmax of transformers'
    logits over the prompt: prompts of different lengths in one padded batch (one row
    asking for none) at tp 4 and dp 2 × tp 2, and a request admitted into a server slot;
    the generated tokens are those of a plain prefill. The LM head runs over chunks of
    5 positions here, so the 16-token bucket spans four chunks, the last one padded."""
    from ryzen_jax.engine import programs as engine
    from ryzen_jax.engine.batcher import Admission, Plan, SlotBatcher

    monkeypatch.setattr(engine, "SCORE_CHUNK", 5)  # read when the scoring prefill is first traced, below

    prompts = [PROMPT, PROMPT[3:10], PROMPT[:5]]
    settings = [rj.SamplingParams(prompt_logprobs=3), rj.SamplingParams(prompt_logprobs=0, logprobs=1),
                rj.SamplingParams()]
    requests = [rj.Request(p, 4, s, ignore_eos=True) for p, s in zip(prompts, settings)]

    def check(c: rj.Completion, prompt: list[int], k: int) -> None:
        with torch.no_grad():
            logp = torch.log_softmax(hf_llama(torch.tensor([prompt])).logits[0, :-1].float(), -1).numpy()
        assert c.prompt_logprobs[0] is None and c.prompt_top_logprobs[0] is None
        assert len(c.prompt_logprobs) == len(prompt) == len(c.prompt_top_logprobs)
        np.testing.assert_allclose(c.prompt_logprobs[1:], logp[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
        for j, top in enumerate(c.prompt_top_logprobs[1:]):
            want = np.sort(logp[j])[::-1][:k]
            np.testing.assert_allclose([lp for _, lp in top], want, atol=1e-4)
            np.testing.assert_allclose(logp[j, [t for t, _ in top]], want, atol=1e-4)
        # each token's rank: the tokens at least as likely under HF's distribution (a
        # token within the tolerance of it may fall either side)
        assert c.prompt_ranks[0] is None and len(c.prompt_ranks) == len(prompt)
        for j, rank in enumerate(c.prompt_ranks[1:]):
            lp = logp[j, prompt[j + 1]]
            assert (logp[j] > lp + 1e-4).sum() + 1 <= rank <= (logp[j] >= lp - 1e-4).sum(), (j, rank)
        assert any(r > 1 for r in c.prompt_ranks[1:]) and any(r > k for r in c.prompt_ranks[1:])

    plain = llama.generator.generate(prompts, 4, stop_ids=[]).generated_ids
    for lm in (llama, llama_dp2):
        result = rj.GenerationResult(completions=[])
        deltas = [d for step in lm.generator.run(requests, stats=result) for d in step]
        assert [c.generated_ids for c in result.completions] == plain
        for c, p, s in zip(result.completions, prompts, settings):
            if s.prompt_logprobs is None:
                assert c.prompt_logprobs is None and c.prompt_top_logprobs is None and c.prompt_ranks is None
            else:
                check(c, p, s.prompt_logprobs)
        firsts = {d.index: d for d in reversed(deltas)}  # each request's first delta carries its prompt's
        assert firsts[0].prompt_logprobs == result.completions[0].prompt_logprobs
        assert all(d.prompt_logprobs is None for d in deltas if d is not firsts[d.index])

    batcher = SlotBatcher(llama.generator, 2)
    out = batcher.apply(Plan(admit=(Admission(1, requests[0], 0),), steps=0))
    c = rj.Completion(prompts[0], [], None, "", prompt_logprobs=out.deltas[0].prompt_logprobs,
                      prompt_top_logprobs=out.deltas[0].prompt_top_logprobs, prompt_ranks=out.deltas[0].prompt_ranks)
    check(c, prompts[0], 3)


def test_min_tokens_holds_back_stop_ids_as_transformers_min_new_tokens(llama, hf_llama, llama_dp2):
    """``min_tokens``: a row's stop ids cannot be picked before it has that many tokens,
    as transformers' ``min_new_tokens`` holds back its EOS ids: with the plain greedy
    path's second token as the stop id, the row without min_tokens ends at it while the
    rows with 6 and 12 go on to transformers' tokens, in one batch at tp 4 and dp 2 ×
    tp 2, greedy and with a +100 bias on the stop id (picked as soon as it is allowed)."""
    ids = torch.tensor([PROMPT])
    plain = llama.generator.generate([PROMPT], 16, stop_ids=[]).generated_ids[0]
    stop = plain[1]
    settings = [rj.SamplingParams(min_tokens=6), rj.SamplingParams(),
                rj.SamplingParams(min_tokens=12, logit_bias={stop: 100.0})]
    refs = []
    for p in settings:
        extra = {"sequence_bias": sequence_bias_of(p)} if p.logit_bias else {}
        with torch.no_grad():
            out = hf_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                    min_new_tokens=p.min_tokens, do_sample=False, eos_token_id=stop, pad_token_id=0,
                                    **extra)
        refs.append(out[0, len(PROMPT):].tolist())
    assert refs[1] == plain[:2] and len(refs[0]) >= 6
    assert len(refs[2]) == 13 and refs[2][-1] == stop  # the bias forces the stop id as soon as it is allowed
    requests = [rj.Request(PROMPT, 16, p, stop_token_ids=(stop,), ignore_eos=True) for p in settings]
    for lm in (llama, llama_dp2):
        result = rj.GenerationResult(completions=[])
        for _ in lm.generator.run(requests, stats=result):
            pass
        assert [c.generated_ids for c in result.completions] == refs


def test_a_plan_crosses_processes_with_every_setting():
    """The leader's plan, as JSON through the key-value store, gives followers the very
    same requests: every sampling setting, the logit bias's pairs and both kinds of
    log-probabilities included."""
    from ryzen_jax.engine.batcher import Admission, Plan

    p = rj.SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5,
                          frequency_penalty=-0.5, seed=9, logprobs=3, prompt_logprobs=1, logit_bias={5: -100, 2: 1.5},
                          min_tokens=2)
    plan = Plan(admit=(Admission(1, rj.Request([1, 2, 3], 7, p, (4,), ("\n",), True, True), 11),), cancel=(0,), steps=4)
    assert Plan.from_json(plan.to_json()) == plan


# -- stop rules -------------------------------------------------------------------------

def test_eos_from_generation_config_and_stop_token_ids(hf_model_dir, hf_llama, tmp_path):
    """EOS ids come from generation_config.json (as transformers reads them) and end a
    row with the EOS kept; extra stop ids do the same; the other rows go on."""
    greedy = hf_models.greedy(hf_llama, PROMPT, 24)
    eos = greedy[6]
    model_dir = hf_model_dir("llama_gqa")
    local = tmp_path / "m"
    local.mkdir()
    for f in os.listdir(model_dir):
        os.symlink(os.path.join(model_dir, f), local / f)
    (local / "generation_config.json").unlink(missing_ok=True)
    transformers.GenerationConfig(eos_token_id=[eos, 250]).save_pretrained(local)
    lm = rj.load_model(str(local), tp=2, progress=False)
    assert lm.config.eos_token_ids == (eos, 250)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                eos_token_id=[eos, 250], pad_token_id=0)[0, len(PROMPT):].tolist()
    outs = rj.generate(lm, [PROMPT, [5, 6]], max_new_tokens=24)
    assert outs[0].generated_ids == ref == greedy[: greedy.index(eos) + 1]
    assert outs[0].finish_reason == "stop"
    assert outs[1].finish_reason in ("stop", "length")
    stop_at = greedy[3]
    out = rj.generate(lm, [PROMPT], max_new_tokens=24, stop_token_ids=[stop_at])[0]
    assert out.generated_ids == greedy[: greedy.index(stop_at) + 1] and out.finish_reason == "stop"
    out = lm.generator.generate([PROMPT], 5, stop_ids=[]).completions[0]
    assert out.generated_ids == greedy[:5] and out.finish_reason == "length"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model: a byte-level BPE tokenizer trained here, so multi-byte
    characters are split across tokens."""
    from ryzen_jax.demo import write_demo_hf_checkpoint

    return rj.load_model(write_demo_hf_checkpoint(str(tmp_path_factory.mktemp("demo") / "m")), tp=2,
                         progress=False)


def test_stop_strings_cut_across_token_boundaries(demo):
    prompt = "The weather in the mountains"
    full = rj.generate(demo, [prompt], max_new_tokens=24, stop_token_ids=[])[0]
    tok = demo.tokenizer
    pieces = [tok.decode(full.generated_ids[: i + 1], skip_special_tokens=True) for i in range(len(full.generated_ids))]
    # a stop string made of the last character of token k's text and the first of token k+1's
    for k in range(1, len(pieces) - 1):
        a, b = pieces[k], pieces[k + 1]
        if (len(a) > len(pieces[k - 1]) and len(b) > len(a) and "\ufffd" not in b[len(a) - 1:] + a[-1:]
                and b.find(b[len(a) - 1: len(a) + 1]) == len(a) - 1):
            break
    else:
        pytest.fail(f"no usable token boundary in {pieces[-1]!r}")
    stop, cut = b[len(a) - 1: len(a) + 1], len(a) - 1
    out = rj.generate(demo, [prompt], max_new_tokens=24, stop=[stop, "never-appears"])[0]
    assert out.text == full.text[:cut]
    assert rj.generate(demo, [prompt], max_new_tokens=24, stop=stop)[0] == out  # one stop string, bare
    assert out.finish_reason == "stop"
    assert out.generated_ids == full.generated_ids[: k + 2]  # up to the token that completed the stop string
    streamed = list(rj.stream(demo, prompt, max_new_tokens=24, stop=[stop]))
    assert "".join(d.text for d in streamed) == out.text
    assert [t for d in streamed for t in d.token_ids] == out.generated_ids
    kept = rj.generate(demo, [prompt], max_new_tokens=24, stop=[stop], include_stop_str=True)[0]  # vLLM's option
    assert kept.text == full.text[:cut + len(stop)] and kept.generated_ids == out.generated_ids
    assert "".join(d.text for d in rj.stream(demo, prompt, max_new_tokens=24, stop=[stop], include_stop_str=True)) \
        == kept.text


def test_a_stop_tokens_text_is_left_out_unless_asked(demo):
    """vLLM's rule for stop token ids: ``generated_ids`` keep the stop token, the text
    leaves its text out (transformers' decoding of the tokens before it), and
    ``include_stop_str`` keeps it (the decoding of them all) — plain and streamed."""
    prompt = "The weather in the mountains"
    full = rj.generate(demo, [prompt], max_new_tokens=24, stop_token_ids=[])[0]
    decode = lambda ids: demo.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    k = next(i for i, t in enumerate(full.generated_ids) if i >= 3 and decode([t]).strip()
             and t not in full.generated_ids[:i])  # a token with visible text, first generated at step k
    stop = full.generated_ids[k]
    for keep in (False, True):
        out = rj.generate(demo, [prompt], max_new_tokens=24, stop_token_ids=[stop], include_stop_str=keep)[0]
        assert out.generated_ids == full.generated_ids[: k + 1] and out.finish_reason == "stop"
        assert out.text == decode(full.generated_ids[: k + 1 if keep else k])
        streamed = rj.stream(demo, prompt, max_new_tokens=24, stop_token_ids=[stop], include_stop_str=keep)
        assert "".join(d.text for d in streamed) == out.text


def test_streaming_deltas_never_split_a_character(demo):
    """Byte-level tokens split 'é', '世' and '✓' across tokens: no delta holds half a
    character, and the deltas join to the decoded text."""
    text = "héllo 世界 ✓ naïve café — 日本語"
    ids = demo.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # really split into byte-level pieces
    detok = Detokenizer(demo.tokenizer, [0])
    deltas = [detok.push([t]) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert sum(1 for d in deltas if d) < len(ids)  # some tokens had to wait for the rest of a character


def test_a_context_ending_mid_character_keeps_the_generated_bytes(demo):
    """A token-id prompt may end inside a character (the first byte of 'é'): the
    generated bytes after it decode as transformers decodes them alone."""
    tok = demo.tokenizer
    split = tok("café au lait", add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(split)) if tok.decode(split[:i]).endswith("\ufffd"))
    context, rest = split[:cut], split[cut:]
    detok = Detokenizer(tok, context)
    text = "".join(detok.push([t]) for t in rest) + detok.flush()
    assert text == tok.decode(rest, skip_special_tokens=True)


def test_stream_matches_generate(demo):
    prompt = "Distributed computing is"
    p = rj.SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    whole = rj.generate(demo, [prompt], max_new_tokens=20, sampling=p)[0]
    deltas = list(rj.stream(demo, prompt, max_new_tokens=20, sampling=p))
    assert [t for d in deltas for t in d.token_ids] == whole.generated_ids
    assert "".join(d.text for d in deltas) == whole.text == demo.tokenizer.decode(whole.generated_ids,
                                                                                 skip_special_tokens=True)
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason == whole.finish_reason
    assert len(deltas) == len(whole.generated_ids)  # one delta per token: a dispatch per step


# -- compile discipline -------------------------------------------------------------------

def test_no_compilation_after_warmup(llama):
    """Warm the prompt buckets once; then 20 prompts of varied lengths (each alone),
    varied sampling settings and a streamed request compile nothing: counted by
    JAX's own compile events, not by our cache."""
    gen = llama.generator
    gen.warmup(batch_sizes=(1,))
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_a, **_k: events.append(name) if "backend_compile" in name else None)
    before = gen.compile_count
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, gen.max_seq_len - 40, size=20)
    for i, n in enumerate(lengths):
        prompt = rng.integers(3, llama.config.vocab_size, size=int(n)).tolist()
        p = rj.SamplingParams(temperature=float(i % 3) / 2, top_k=int(i % 4) * 10, top_p=0.5 + (i % 5) / 10,
                              min_p=(i % 2) / 10, repetition_penalty=1 + (i % 3) / 10, seed=i)
        out = gen.generate([prompt], 1 + int(rng.integers(1, 30)), p)
        assert out.compile_s == 0.0
    list(rj.stream(llama, PROMPT, max_new_tokens=8))
    print(f"\n20 prompts of lengths {sorted(lengths.tolist())}: {len(events)} compilations after warm-up")
    assert gen.compile_count == before
    assert events == []
