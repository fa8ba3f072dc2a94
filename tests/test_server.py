"""The OpenAI-compatible server, as clients see it: a real uvicorn server on a
loopback port, many concurrent clients, streaming, cancellation, bad input and
metrics; offline generation (itself checked against transformers) is the oracle."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.metadata
import json
import os
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import transformers

import ryzen_jax as rj
from ryzen_jax.demo import save_tokenizer, train_tokenizer
from ryzen_jax.serve import Server
from tests import hf_models, mp_helpers

CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
                 "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% if brief %}(briefly){% endif %}{% endif %}")
MODEL_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 6}  # top_k 50: HF's own
#: the server's slot programs and offline generation's batch are different XLA programs:
#: their log-probabilities agree to float32 rounding, a few 1e-5 apart at most
ATOL = 1e-4
PROMPTS = ["The weather in the mountains", "Distributed computing is", "Once upon a time", "Tensor parallel",
           "A B C D E F G", "hello", "The quick brown fox jumps over the lazy dog", "JAX and XLA",
           "1 2 3 4 5 6 7 8 9 10 11 12", "What is a mesh?", "x", "Many small requests", "Streaming text",
           "Continuous batching keeps every slot busy", "The end", "ryzen"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_chat_model(out_dir: str) -> str:
    """A tiny Llama with a locally trained byte-level tokenizer and a chat template."""
    cfg = transformers.LlamaConfig(**{**hf_models.BASE, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1,
                                      "pad_token_id": 1})
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out_dir)
    save_tokenizer(train_tokenizer(), out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tok_cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**tok_cfg, "chat_template": CHAT_TEMPLATE}, f)
    path = os.path.join(out_dir, "generation_config.json")
    with open(path) as f:
        gen_cfg = json.load(f)
    with open(path, "w") as f:  # sampling defaults, as an instruct model's config has them
        json.dump({**gen_cfg, **MODEL_DEFAULTS}, f)
    return out_dir


class Running:
    """A Server (or EmbeddingServer, which has no scheduler) under uvicorn in a thread,
    on a free loopback port."""

    def __init__(self, server):
        import uvicorn

        self.server = server
        self.scheduler = getattr(server, "scheduler", None)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if self.scheduler is not None:
            self.scheduler.start()
        self.uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=10)
        if self.scheduler is not None:
            self.scheduler.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_chat_model(str(tmp_path_factory.mktemp("chat") / "m"))


@pytest.fixture(scope="module")
def lm(model_dir):
    return rj.load_model(model_dir, tp=4, max_seq_len=128, progress=False)


@pytest.fixture(scope="module")
def server(lm):
    running = Running(Server(lm, max_batch=4, max_queue=32, model_name="tiny"))
    yield running
    running.stop()


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=120)


def stream_events(url: str, route: str = "/v1/completions", **body) -> list:
    events = []
    with httpx.stream("POST", f"{url}{route}", json={"model": "tiny", "stream": True, **body}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_sixteen_concurrent_clients_get_offline_outputs(server, lm):
    offline = rj.generate(lm, PROMPTS, max_new_tokens=12, sampling=rj.SamplingParams())
    before = metric(server.url, 'ryzen_jax_requests_total{outcome="ok"}')
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: complete(server.url, prompt=p, max_tokens=12, temperature=0), PROMPTS))
    for answer, want in zip(answers, offline):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        assert body["choices"][0]["text"] == want.text
        assert body["choices"][0]["finish_reason"] == want.finish_reason
        assert body["usage"]["completion_tokens"] == len(want.generated_ids)
        assert body["usage"]["prompt_tokens"] == len(want.prompt_ids)
    assert metric(server.url, 'ryzen_jax_requests_total{outcome="ok"}') == before + len(PROMPTS)
    assert metric(server.url, "ryzen_jax_generation_tokens_total") >= sum(len(w.generated_ids) for w in offline)
    assert metric(server.url, "ryzen_jax_time_to_first_token_seconds_count") >= len(PROMPTS)
    assert metric(server.url, "ryzen_jax_busy_slots") == 0


def test_streamed_deltas_join_to_the_full_text(server):
    body = dict(prompt="Once upon a time", max_tokens=24, temperature=0.8, seed=5, stop=["zz"])
    whole = complete(server.url, **body).json()["choices"][0]
    events = stream_events(server.url, **body, stream_options={"include_usage": True})
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == whole["text"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == whole["finish_reason"]
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_chat_completions(server, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                               "max_tokens": 10, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert choice["message"] == {"role": "assistant", "content": rj.generate(lm, [ids], max_new_tokens=10)[0].text}
    events = stream_events(server.url, "/v1/chat/completions", messages=messages, max_tokens=10, temperature=0)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == choice["message"]["content"]


def test_the_openai_client_library(server, lm):
    """The official ``openai`` Python client, as vLLM users point it at a server:
    models, completions and chat, plain and streamed, OpenAI's presence and frequency
    penalties, and errors raised as its typed exceptions — the texts are offline
    generation's (itself checked against transformers)."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["tiny"]
    penalties = dict(presence_penalty=-2.0, frequency_penalty=-1.0)  # negative: repeats, which the penalties see
    want = rj.generate(lm, ["Once upon a time"], max_new_tokens=24, ignore_eos=True,
                       sampling=rj.SamplingParams(**penalties))[0]
    assert want.text != rj.generate(lm, ["Once upon a time"], max_new_tokens=24, ignore_eos=True)[0].text
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}, **penalties)
    assert done.choices[0].text == want.text and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 24 and done.usage.prompt_tokens == len(want.prompt_ids)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}, **penalties))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text

    # logit bias: banning the plain greedy text's first two tokens changes it, as offline
    plain = rj.generate(lm, ["Once upon a time"], max_new_tokens=8, ignore_eos=True)[0]
    bias = {plain.generated_ids[0]: -100, plain.generated_ids[1]: -100, 300: 5.0}
    want = rj.generate(lm, ["Once upon a time"], max_new_tokens=8, ignore_eos=True,
                       sampling=rj.SamplingParams(logit_bias=bias))[0]
    assert want.text != plain.text
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                     logit_bias={str(k): v for k, v in bias.items()}, extra_body={"ignore_eos": True})
    assert done.choices[0].text == want.text

    # vLLM's truncate_prompt_tokens (the prompt's last k tokens) and continuous usage in a stream
    long = "The quick brown fox jumps over the lazy dog"
    ids = lm.tokenizer(long)["input_ids"]
    want = rj.generate(lm, [ids[-4:]], max_new_tokens=5, ignore_eos=True)[0]
    done = client.completions.create(model="tiny", prompt=long, max_tokens=5, temperature=0, echo=True,
                                     extra_body={"truncate_prompt_tokens": 4, "ignore_eos": True})
    assert done.choices[0].text == lm.tokenizer.decode(ids[-4:]) + want.text and done.usage.prompt_tokens == 4
    chunks = list(client.completions.create(model="tiny", prompt=long, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 5 and all(c.usage.prompt_tokens == len(ids) for c in chunks)

    # vLLM's min_tokens: a stop string counts only in text that comes after the first min_tokens tokens
    plain = rj.generate(lm, ["Once upon a time"], max_new_tokens=12, ignore_eos=True)[0]
    early = rj.generate(lm, ["Once upon a time"], max_new_tokens=4, ignore_eos=True)[0].text
    assert plain.text.startswith(early)
    stop = next(c for c in early if plain.text.find(c, len(early)) >= 0)  # in the first 4 tokens' text and later
    for min_tokens, before in ((0, ""), (4, early)):
        cut = next(i for i in range(len(plain.text)) if plain.text.startswith(stop, i) and i + len(stop) > len(before))
        done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                         stop=[stop], extra_body={"ignore_eos": True, "min_tokens": min_tokens})
        assert done.choices[0].text == plain.text[:cut] and done.choices[0].finish_reason == "stop"
    assert plain.text.index(stop) < len(early) <= cut  # min_tokens moved the cut
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert done.choices[0].text == plain.text[:plain.text.index(stop) + len(stop)]

    messages = [{"role": "user", "content": "Hello there"}]
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = rj.generate(lm, [ids], max_new_tokens=8)[0].text
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == text
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    # log-probabilities: offline generation's (checked against transformers' logits elsewhere)
    want = rj.generate(lm, ["Once upon a time"], max_new_tokens=6, sampling=rj.SamplingParams(logprobs=3))[0]
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert lp.tokens == [lm.tokenizer.decode([t]) for t in want.generated_ids]
    np.testing.assert_allclose(lp.token_logprobs, want.logprobs, atol=ATOL)
    for got, top, t, chosen in zip(lp.top_logprobs, want.top_logprobs, want.generated_ids, want.logprobs):
        assert got == pytest.approx({lm.tokenizer.decode([a]): b for a, b in [(t, chosen), *top]}, abs=ATOL)
    assert lp.text_offset == list(np.cumsum([0] + [len(x) for x in lp.tokens[:-1]]))
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            logprobs=3, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((x.tokens for x in streamed), []) == lp.tokens
    assert sum((x.text_offset for x in streamed), []) == lp.text_offset
    want = rj.generate(lm, [ids], max_new_tokens=8, sampling=rj.SamplingParams(logprobs=2))[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [lm.tokenizer.decode([t]) for t in want.generated_ids]
    np.testing.assert_allclose([c.logprob for c in content], want.logprobs, atol=ATOL)
    assert [[a.token for a in c.top_logprobs] for c in content] == \
        [[lm.tokenizer.decode([a]) for a, _ in top] for top in want.top_logprobs]
    np.testing.assert_allclose([[a.logprob for a in c.top_logprobs] for c in content],
                               [[b for _, b in top] for top in want.top_logprobs], atol=ATOL)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8,
                                                 temperature=0, logprobs=True, stream=True))
    assert [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content] \
        == [c.token for c in content]
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].logprobs is None
    # vLLM's return_tokens_as_token_ids: every token named by its id, alternatives too, streamed or not
    as_ids = lambda t: f"token_id:{t}"  # noqa: E731
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    assert [c.token for c in chat.choices[0].logprobs.content] == [as_ids(t) for t in want.generated_ids]
    assert [[a.token for a in c.top_logprobs] for c in chat.choices[0].logprobs.content] == \
        [[as_ids(a) for a, _ in top] for top in want.top_logprobs]
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=1,
                                            echo=True, stream=True, extra_body={"return_tokens_as_token_ids": True}))
    tokens = sum((c.choices[0].logprobs.tokens for c in chunks if c.choices and c.choices[0].logprobs), [])
    assert tokens == [as_ids(t) for t in ids + want.generated_ids[:3]]

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert e.value.param == "tool_choice" and "auto" in str(e.value)  # OpenAI's default, which needs a parser


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(server, lm):
    """``echo`` with ``logprobs``, through the official client: the request an
    evaluation harness sends for a log-likelihood (token-id prompt, ``max_tokens`` 1,
    ``logprobs`` 1, ``echo``) answers every prompt token's log-probability (none for
    the first) before the generated token's, and ``max_tokens=0`` the prompt's alone,
    plain and streamed — the values are offline generation's ``prompt_logprobs``
    (checked against transformers' logits in test_generation.py)."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "Once upon a time"
    ids = lm.tokenizer(prompt)["input_ids"]
    want = rj.generate(lm, [ids], max_new_tokens=1, sampling=rj.SamplingParams(logprobs=2, prompt_logprobs=2))[0]
    name = lambda t: lm.tokenizer.decode([t])  # noqa: E731

    def check(lp, n_generated: int) -> None:
        tokens = ids + want.generated_ids[:n_generated]
        assert lp.tokens == [name(t) for t in tokens]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        np.testing.assert_allclose(lp.token_logprobs[1:], want.prompt_logprobs[1:] + want.logprobs[:n_generated],
                                   atol=ATOL)
        tops = want.prompt_top_logprobs[1:] + want.top_logprobs[:n_generated]
        for got, t, chosen, top in zip(lp.top_logprobs[1:], tokens[1:], lp.token_logprobs[1:], tops):
            assert got == pytest.approx({name(a): b for a, b in [(t, chosen), *top]}, abs=ATOL)
        assert lp.text_offset == list(np.cumsum([0] + [len(x) for x in lp.tokens[:-1]]))

    done = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=2, temperature=0)
    choice = done.choices[0]
    assert choice.text == lm.tokenizer.decode(ids) + want.text
    check(choice.logprobs, 1)
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 1

    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    assert done.choices[0].text == prompt and done.choices[0].finish_reason == "length"
    check(done.choices[0].logprobs, 0)
    assert done.usage.completion_tokens == 0
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == prompt
    assert sum((c.choices[0].logprobs.tokens for c in chunks if c.choices[0].logprobs), []) == [name(t) for t in ids]
    assert chunks[-1].choices[0].finish_reason == "length"

    plain = rj.generate(lm, [prompt], max_new_tokens=5)[0]  # echo without logprobs: the text only
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, echo=True, temperature=0)
    assert done.choices[0].text == prompt + plain.text and done.choices[0].logprobs is None
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=5, echo=True, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == prompt + plain.text


def test_vllm_prompt_logprobs_are_transformers_log_softmax(server, lm, model_dir):
    """vLLM's ``prompt_logprobs``: per prompt token None at the first, then
    ``{token id: {logprob, rank, decoded_token}}`` for the token itself (its rank in the
    whole vocabulary) and the k most likely (ranks 1 to k) — transformers' log-softmax
    over the prompt. On each completion choice (two prompts), beside a chat's choices,
    with ``echo`` keeping its own depth, with ``max_tokens=0``; generation unchanged by
    the scoring; streamed or out of range it is a 400 naming the field."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    name = lambda t: lm.tokenizer.decode([t])  # noqa: E731

    def check(scores: list, ids: list[int], k: int) -> None:
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1).numpy()
        assert len(scores) == len(ids) and scores[0] is None
        for j, entry in enumerate(scores[1:]):
            t, best = ids[j + 1], np.sort(logp[j])[::-1]
            own = entry[str(t)]
            assert own["logprob"] == pytest.approx(logp[j, t], abs=1e-4) and own["decoded_token"] == name(t)
            assert (logp[j] > logp[j, t] + 1e-4).sum() + 1 <= own["rank"] <= (logp[j] >= logp[j, t] - 1e-4).sum()
            others = {int(a): v for a, v in entry.items() if int(a) != t}
            ranks = sorted(v["rank"] for v in others.values())  # the k best, less the token if it is one
            assert ranks in (list(range(1, k + 1)), [x for x in range(1, k + 1) if x != own["rank"]]), (ranks, own)
            for a, v in others.items():  # the k best: HF's values, in HF's order
                assert v["logprob"] == pytest.approx(logp[j, a], abs=1e-4) == pytest.approx(best[v["rank"] - 1], abs=1e-4)
                assert v["decoded_token"] == name(a)

    prompts = ["Once upon a time", "Distributed computing is"]
    r = complete(server.url, prompt=prompts, max_tokens=3, temperature=0, prompt_logprobs=3)
    assert r.status_code == 200, r.text
    plain = rj.generate(lm, prompts, max_new_tokens=3)
    for choice, p, want in zip(r.json()["choices"], prompts, plain):
        assert choice["text"] == want.text and choice["logprobs"] is None
        check(choice["prompt_logprobs"], lm.tokenizer(p)["input_ids"], 3)

    r = complete(server.url, prompt=prompts[0], max_tokens=0, echo=True, logprobs=1, prompt_logprobs=5).json()
    choice = r["choices"][0]
    assert choice["text"] == prompts[0] and r["usage"]["completion_tokens"] == 0
    check(choice["prompt_logprobs"], lm.tokenizer(prompts[0])["input_ids"], 5)
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"][1:])  # echo: its own logprobs=1
    r = complete(server.url, prompt=prompts[1], max_tokens=0, prompt_logprobs=0).json()
    check(r["choices"][0]["prompt_logprobs"], lm.tokenizer(prompts[1])["input_ids"], 0)
    assert r["choices"][0]["text"] == ""

    messages = [{"role": "user", "content": "Say something"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                   json={"model": "tiny", "messages": messages, "max_tokens": 2, "n": 2, "prompt_logprobs": 2}).json()
    assert all("prompt_logprobs" not in c for c in r["choices"]) and len(r["choices"]) == 2
    check(r["prompt_logprobs"], ids, 2)

    for body in ({"prompt": "hi", "prompt_logprobs": 2, "stream": True}, {"prompt": "hi", "prompt_logprobs": 21},
                 {"prompt": "hi", "prompt_logprobs": -1}):
        r = complete(server.url, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    r = complete(server.url, prompt="hi", prompt_logprobs=2, stream=True).json()
    assert "not available when stream is true" in r["error"]["message"]


def test_tokenize_detokenize_and_chat_template_options(server, lm):
    """vLLM's /tokenize and /detokenize: a prompt's ids are the tokenizer's, chat
    messages' are those a chat request runs (its usage counts them), ids decode to the
    tokenizer's text; the chat template options (``chat_template_kwargs``,
    ``continue_final_message``) render as transformers' ``apply_chat_template``; bad
    input is a 400 naming the field."""
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once upon a time", "return_token_strs": True}).json()
    ids = lm.tokenizer("Once upon a time")["input_ids"]
    assert r == {"count": len(ids), "max_model_len": lm.generator.max_seq_len, "tokens": ids,
                 "token_strs": lm.tokenizer.convert_ids_to_tokens(ids)}
    messages = [{"role": "user", "content": "Hello there"}]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60)
    assert r["count"] == chat.json()["usage"]["prompt_tokens"]
    assert lm.tokenizer.decode(r["tokens"]) == lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                                tokenize=False)
    def rendered(messages, **options) -> list[int]:  # transformers' rendering, as the chat route should do it
        text = lm.tokenizer.apply_chat_template(messages, tokenize=False, **options)
        return lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    # vLLM's template options: a template keyword, and continuing the assistant's last message
    r = httpx.post(f"{server.url}/tokenize", json={"messages": messages, "chat_template_kwargs": {"brief": True}})
    assert r.json()["tokens"] == rendered(messages, add_generation_prompt=True, brief=True) != \
        rendered(messages, add_generation_prompt=True)
    started = messages + [{"role": "assistant", "content": "Once upon"}]
    body = {"messages": started, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 6,
            "temperature": 0}
    want = rendered(started, add_generation_prompt=False, continue_final_message=True)
    assert httpx.post(f"{server.url}/tokenize", json=body).json()["tokens"] == want
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == rj.generate(lm, [want], max_new_tokens=6)[0].text
    for bad, param in (({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
                       ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs")):
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": started, "max_tokens": 1, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text

    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()
    assert r == {"prompt": lm.tokenizer.decode(ids)}
    for route, body, param in (("tokenize", {"prompt": "a", "messages": messages}, "prompt"),
                               ("tokenize", {}, "prompt"), ("detokenize", {"tokens": [10**6]}, "tokens"),
                               ("detokenize", {"tokens": [1], "model": "gpt-4"}, "model")):
        r = httpx.post(f"{server.url}/{route}", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (route, body, r.text)


def test_models_health_and_metrics(server):
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "tiny", "input": "hi"})
    assert r.status_code == 400 and "--task embed" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/version").json() == {"version": importlib.metadata.version("ryzen_jax")}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("ryzen_jax_requests_total", "ryzen_jax_prompt_tokens_total", "ryzen_jax_inter_token_latency_seconds",
                 "ryzen_jax_e2e_request_latency_seconds", "ryzen_jax_queue_depth", "ryzen_jax_busy_slots"):
        assert name in text


def test_a_disconnected_client_frees_its_slot(server):
    before = metric(server.url, 'ryzen_jax_requests_total{outcome="cancelled"}')
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "long", "max_tokens": 100, "ignore_eos": True,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream
    deadline = time.time() + 30
    while metric(server.url, 'ryzen_jax_requests_total{outcome="cancelled"}') == before:
        assert time.time() < deadline, "the cancelled request never freed its slot"
        time.sleep(0.1)
    while metric(server.url, "ryzen_jax_busy_slots") != 0:
        assert time.time() < deadline
        time.sleep(0.1)
    assert complete(server.url, prompt="still serving", max_tokens=3).status_code == 200


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "word " * 200}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "top_k": 2**40}, 400, "top_k"),
    ({"prompt": "hi", "stop_token_ids": [2**40]}, 400, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [512]}, 400, "stop_token_ids"),
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ({"prompt": "hi", "max_tokens": 3, "min_tokens": 4}, 400, "min_tokens"),
    ({"prompt": "hi", "max_tokens": 0, "echo": False}, 400, "max_tokens"),
    ({"prompt": "hi", "logit_bias": {"five": 10}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"512": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ({"prompt": "hi", "guided_regex": "a(b"}, 400, "guided_regex"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ({"prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] or param == "model", err
    assert err["type"]


def test_malformed_oversized_and_chat_errors(server, lm):
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert complete(server.url, prompt="still serving", max_tokens=3).status_code == 200


def test_choices_prompt_lists_and_nulls_match_offline(server, lm):
    """n choices, a list of prompts, null fields and text content parts: each choice is
    what offline generation (checked against transformers elsewhere) gives for its
    prompt and seed (choice j of a seeded request samples with seed + j)."""
    prompts = ["Once upon a time", "Tensor parallel"]
    sampling = lambda j: rj.SamplingParams(temperature=0.9, top_p=0.9, seed=7 + j)  # noqa: E731 — top_p: the model's
    offline = {(p, j): rj.generate(lm, [p], max_new_tokens=8, sampling=sampling(j))[0].text
               for p in prompts for j in range(2)}
    r = complete(server.url, prompt=prompts, n=2, max_tokens=8, temperature=0.9, seed=7, top_p=None, stop=None)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [offline[p, j] for p in prompts for j in range(2)]
    assert offline[prompts[0], 0] != offline[prompts[0], 1]
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))  # each prompt once, as OpenAI bills n choices
    events = stream_events(server.url, prompt=prompts, n=2, max_tokens=8, temperature=0.9, seed=7,
                           stream_options={"include_usage": True})
    assert {e["created"] for e in events} == {events[0]["created"]} and all("usage" in e for e in events)
    for i, (p, j) in enumerate((p, j) for p in prompts for j in range(2)):
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["index"] == i) \
            == offline[p, j]
    assert events[-1]["usage"] == body["usage"]
    assert complete(server.url, prompt=["a"] * 5, n=4).status_code == 400  # 20 choices > 16
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    chat = lambda messages, **kw: httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={  # noqa: E731
        "model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, **kw})
    assert chat(parts, n=None).json()["choices"] == chat([{"role": "user", "content": "Hello\nthere"}]).json()["choices"]
    r = chat([{"role": "tool", "content": "x"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "no tool role" in r.text
    r = chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert r.status_code == 400 and "text content" in r.text


def test_left_out_settings_take_the_model_generation_config(server, lm):
    """A request without temperature, top_p or max_tokens gets generation_config.json's
    (vLLM's --generation-config auto); a value equal to transformers' default (top_k
    50) is no setting; what a request gives wins."""
    assert dict(lm.config.generation_defaults) == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 6}
    want = rj.generate(lm, ["Once upon a time"], max_new_tokens=6, ignore_eos=True,
                       sampling=rj.SamplingParams(temperature=0.7, top_p=0.9, seed=3))[0]
    r = complete(server.url, prompt="Once upon a time", seed=3, ignore_eos=True).json()
    assert r["choices"][0]["text"] == want.text and r["usage"]["completion_tokens"] == 6
    greedy = rj.generate(lm, ["Once upon a time"], max_new_tokens=9, ignore_eos=True)[0]
    r = complete(server.url, prompt="Once upon a time", max_tokens=9, temperature=0, ignore_eos=True).json()
    assert r["choices"][0]["text"] == greedy.text


def test_bodies_past_the_bound_and_odd_json(server):
    chunks = (b"x" * (256 << 10) for _ in range(16))  # 4 MiB, chunked: no Content-Length
    r = httpx.post(f"{server.url}/v1/completions", content=chunks, timeout=30)
    assert r.status_code == 413, r.text
    r = httpx.post(f"{server.url}/v1/completions", content=b"[" * 100_000 + b"]" * 100_000, timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    assert complete(server.url, prompt="still serving", max_tokens=3).status_code == 200


def test_serving_limits_are_checked_first(lm):
    for kw in ({"steps_per_dispatch": 0}, {"steps_per_dispatch": 33}, {"max_queue": -1}, {"max_batch": 0}):
        with pytest.raises(ValueError, match="must be"):
            Server(lm, **kw)


def test_queue_bound_and_api_key(lm):
    """One slot and a queue of one: the third concurrent request gets 429; with an API
    key, requests without it get 401; clients that hang up are cancelled; with no queue
    at all, requests still take the free slots."""
    server = Server(lm, max_batch=1, max_queue=1, api_key="s3cret", model_name="tiny")
    real_apply = server.batcher.apply

    def slow_apply(plan):  # ~100 tokens take seconds: the first two requests are still there for the third
        time.sleep(0.03)
        return real_apply(plan)

    server.batcher.apply = slow_apply
    running = Running(server)
    auth = {"Authorization": "Bearer s3cret"}
    try:
        url = running.url
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"},
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        long = {"prompt": "long", "max_tokens": 100, "ignore_eos": True}
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=long, headers=auth, timeout=120)
            deadline = time.time() + 30
            while metric(url, "ryzen_jax_busy_slots") < 1:
                assert time.time() < deadline
                time.sleep(0.02)
            second = pool.submit(httpx.post, f"{url}/v1/completions", json=long, headers=auth, timeout=120)
            while metric(url, "ryzen_jax_queue_depth") < 1:
                assert time.time() < deadline
                time.sleep(0.02)
            third = httpx.post(f"{url}/v1/completions", json=long, headers=auth, timeout=30)
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
            cancelled = metric(url, 'ryzen_jax_requests_total{outcome="cancelled"}')
            multi = httpx.post(f"{url}/v1/completions", json={**long, "n": 2}, headers=auth, timeout=30)
            assert multi.status_code == 429 and "2 choices do not fit" in multi.text  # all or none queued
            assert metric(url, 'ryzen_jax_requests_total{outcome="cancelled"}') == cancelled
            assert metric(url, "ryzen_jax_queue_depth") == 1
            assert first.result().status_code == second.result().status_code == 200
        # non-streaming clients that hang up, one decoding and one queued behind it, are cancelled
        cancelled = metric(url, 'ryzen_jax_requests_total{outcome="cancelled"}')
        with cf.ThreadPoolExecutor(2) as pool:
            gone = [pool.submit(httpx.post, f"{url}/v1/completions", json=long, headers=auth, timeout=1.0)
                    for _ in range(2)]
            for g in gone:
                with pytest.raises(httpx.ReadTimeout):
                    g.result()
        deadline = time.time() + 30
        while metric(url, 'ryzen_jax_requests_total{outcome="cancelled"}') < cancelled + 2:
            assert time.time() < deadline, "an abandoned request kept its slot or its place in the queue"
            time.sleep(0.1)
    finally:
        running.stop()
    running = Running(Server(lm, max_batch=2, max_queue=0, model_name="tiny", generation_config="none"))
    try:  # no queue at all: requests still take the free slots; the API's defaults (16 tokens)
        with cf.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda p: complete(running.url, prompt=p, ignore_eos=True), ["a", "b"]))
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert [a.json()["usage"]["completion_tokens"] for a in answers] == [16, 16]
    finally:
        running.stop()


def test_a_stuck_step_fails_requests_explicitly(lm):
    """When a decode step stops returning (a dead or stopped process), in-flight
    requests end with an explicit error and /health says 503, instead of hanging."""
    server = Server(lm, max_batch=2, model_name="tiny", step_timeout_s=2.0)
    real_apply, release = server.batcher.apply, threading.Event()

    def apply(plan):
        if plan.admit and plan.admit[0].request.prompt_ids[-1] == server.lm.tokenizer("stuck")["input_ids"][-1]:
            release.wait(60)  # a step that never returns, as when a peer process is gone
        return real_apply(plan)

    server.batcher.apply = apply
    running = Running(server)
    try:
        t0 = time.time()
        r = complete(running.url, prompt="stuck", max_tokens=4)
        assert r.status_code == 503 and "dead or stuck" in r.json()["error"]["message"], r.text
        assert time.time() - t0 < 30
        assert httpx.get(f"{running.url}/health").status_code == 503
        assert complete(running.url, prompt="hi", max_tokens=2).status_code == 503  # refused at once, no hang
    finally:
        release.set()
        running.stop()


def test_two_process_server_answers_like_one(model_dir, server):
    """scripts/serve.py under scripts/launch.py: 2 processes × 2 devices (tp 4 across
    them) answer exactly like the 1-process server; killing the worker ends the run
    instead of leaving clients hanging."""
    with mp_helpers.LaunchedServer("--model", model_dir, "--tensor-parallel-size", "4",  # vLLM's spellings
                                   "--max-model-len", "128", "--served-model-name", "tiny",
                                   "--max-batch", "4") as two_process:  # the 1-process server's slots
        two_process.wait_healthy()
        url = two_process.url
        # every other one held to a regex: each process follows the grammar and places the same masks
        bodies = [dict(prompt=p, max_tokens=10, temperature=0, **({"guided_regex": r"[a-z]{2,8}@[a-z]{2,5}\.org"}
                                                                   if i % 2 else {}))
                  for i, p in enumerate(PROMPTS[:6])]
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            two = list(pool.map(lambda b: complete(url, **b), bodies))
            one = list(pool.map(lambda b: complete(server.url, **b), bodies))
        assert [r.json()["choices"][0]["text"] for r in two] == [r.json()["choices"][0]["text"] for r in one]
        for r in two[1::2]:  # the regex's output, or a prefix of one
            assert re.fullmatch(r"[a-z]{1,8}(@[a-z]{0,5}(\.(o(rg?)?)?)?)?", r.json()["choices"][0]["text"]), r.text
        two_process.kill_the_follower(lambda: complete(url, prompt="after the worker died", max_tokens=50,
                                                       ignore_eos=True))
