"""Structured outputs against two oracles we did not write: transformers' greedy
generation under the same grammar (llguidance's mask applied to Hugging Face's logits
by a LogitsProcessor) gives the same tokens, and Python's own ``json`` and ``re``
accept every finished output, greedy or sampled."""

from __future__ import annotations

import json
import os
import re

import httpx
import llguidance
import llguidance.numpy
import numpy as np
import pytest
import torch
import transformers

import ryzen_jax as rj
from ryzen_jax.engine.structured import StructuredOutput, StructuredOutputError
from tests import hf_models
from ryzen_jax.serve import Server
from tests.test_server import Running, build_chat_model, stream_events

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
REGEX = r"[a-z]{2,8}@[a-z]{2,5}\.(com|org)"
CHOICES = ["yes", "no", "not sure"]
LARK = 'start: "(" num (" + " num)? (" + " num)? ")"\nnum: /[0-9]{1,3}/'
SPECS = {
    "json_schema": StructuredOutput(json=SCHEMA, whitespace_flexible=False),
    "json_flexible": StructuredOutput(json=json.dumps(SCHEMA)),
    "regex": StructuredOutput(regex=REGEX),
    "choice": StructuredOutput(choice=CHOICES),
    "lark": StructuredOutput(grammar=LARK),
}
PROMPTS = ["The weather in the mountains", "Distributed computing is", "hello"]


def matches(kind: str, text: str) -> bool:
    """Python's own reading of a finished output: it parses and fits the spec."""
    if kind.startswith("json"):
        obj = json.loads(text)
        return set(obj) == {"name", "ok", "n"} and isinstance(obj["name"], str) and len(obj["name"]) <= 6 \
            and isinstance(obj["ok"], bool) and type(obj["n"]) is int and 0 <= obj["n"] <= 99
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch(r"\(\d{1,3}( \+ \d{1,3}){0,2}\)", text) is not None


class GrammarMask(transformers.LogitsProcessor):
    """transformers' side of the oracle: llguidance's matcher follows the generated
    tokens and every disallowed token's score becomes -inf."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, prompt_len: int):
        self.m, self.start, self.seen = llguidance.LLMatcher(tokenizer, grammar), prompt_len, 0

    def __call__(self, input_ids, scores):
        new = input_ids[0, self.start:].tolist()
        assert self.m.consume_tokens(new[self.seen:]), self.m.get_error()
        self.seen = len(new)
        mask = llguidance.numpy.allocate_token_bitmask(1, scores.shape[-1])
        llguidance.numpy.fill_next_token_bitmask(self.m, mask)
        bits = (mask[0][np.arange(scores.shape[-1]) >> 5] >> (np.arange(scores.shape[-1]) & 31)) & 1
        return scores.masked_fill(torch.from_numpy(bits == 0)[None], -float("inf"))


#: a chat template that shows the model its tools' names, an assistant's tool calls and the tools' results
#: (short: the tiny model's context is 128 tokens)
TOOL_TEMPLATE = ("{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }} {% endfor %}\n{% endif %}"
                 "{% for m in messages %}<|{{ m['role'] }}|>"
                 "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments }}{% endfor %}"
                 "{{ m['content'] or '' }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = build_chat_model(str(tmp_path_factory.mktemp("structured") / "m"))
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**cfg, "chat_template": TOOL_TEMPLATE}, f)
    return out


@pytest.fixture(scope="module")
def lm(model_dir):
    return rj.load_model(model_dir, tp=2, max_seq_len=128, progress=False)


@pytest.fixture(scope="module")
def hf(model_dir):
    return hf_models.load(model_dir)


def hf_constrained(hf, lm, prompt: list[int], grammar: str, new_tokens: int) -> list[int]:
    """transformers' greedy tokens under the grammar, up to its EOS (kept)."""
    eos = lm.config.eos_token_ids[0]
    processor = GrammarMask(lm.generator.grammars.tokenizer(), grammar, len(prompt))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos,
                          logits_processor=transformers.LogitsProcessorList([processor]))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", list(SPECS))
def test_greedy_structured_output_is_transformers_under_the_same_grammar(lm, hf, kind):
    spec = SPECS[kind]
    done = rj.generate(lm, PROMPTS, max_new_tokens=40, structured=spec)
    eos = lm.config.eos_token_ids[0]
    finished = 0
    for prompt, c in zip(PROMPTS, done):
        theirs = hf_constrained(hf, lm, c.prompt_ids, spec.compile(), 40)
        # a complete grammar ends our output; transformers' then picks the EOS, the one token left
        if c.finish_reason == "stop" and c.generated_ids[-1] != eos:
            assert theirs[len(c.generated_ids):] == [eos], (prompt, theirs)
            theirs = theirs[:len(c.generated_ids)]
        assert c.generated_ids == theirs, (kind, prompt)
        if c.finish_reason == "stop":
            finished += 1
            assert matches(kind, c.text), (kind, c.text)
        else:  # out of tokens mid-output: still a prefix the grammar allows (whitespace runs, in flexible JSON)
            assert c.finish_reason == "length" and len(c.generated_ids) == 40
    if kind != "json_flexible":  # a random model spends flexible JSON's budget on whitespace
        assert finished == len(PROMPTS), [c.text for c in done]


def test_sampled_outputs_fit_and_share_a_batch_with_free_rows(lm, hf):
    """Sampled rows always fit their grammar (each seed its own output); a row without
    one, in the same batch, is transformers' plain greedy continuation."""
    prompt = lm.tokenizer.encode("Once upon a time")
    kinds = [("regex", "json_schema", "choice")[seed % 3] for seed in range(6)]
    sampling = [rj.SamplingParams(temperature=1.0, top_p=0.95, seed=seed) for seed in range(6)] + [rj.SamplingParams()]
    outs = rj.generate(lm, [prompt] * 7, max_new_tokens=48, sampling=sampling, stop_token_ids=[], ignore_eos=True,
                       structured=[SPECS[k] for k in kinds] + [None])
    for kind, c in zip(kinds, outs):
        assert c.finish_reason == "stop" and matches(kind, c.text), (kind, c.text)
    assert len({c.text for c in outs[:-1:3]}) > 1  # the regex rows' seeds differ, and so do their outputs
    assert outs[-1].generated_ids == hf_models.greedy(hf, prompt, 48)


def test_streamed_structured_output_joins_to_the_whole(lm):
    spec = SPECS["regex"]
    deltas = list(rj.stream(lm, "hello", max_new_tokens=40, structured=spec))
    whole = rj.generate(lm, ["hello"], max_new_tokens=40, structured=spec)[0]
    assert "".join(d.text for d in deltas) == whole.text and deltas[-1].finish_reason == "stop"
    assert [t for d in deltas for t in d.token_ids] == whole.generated_ids


@pytest.mark.parametrize("spec,words", [
    (dict(), "exactly one"),
    (dict(regex="a", choice=["a"]), "exactly one"),
    (dict(choice=[]), "choice"),
    (dict(choice="yes"), "choice"),
    (dict(json=3), "json"),
])
def test_bad_specs_are_refused_when_made(spec, words):
    with pytest.raises(StructuredOutputError, match=words):
        StructuredOutput(**spec)


@pytest.mark.parametrize("spec,words", [
    (StructuredOutput(regex="a(b"), "unclosed group"),
    (StructuredOutput(json={"type": "frob"}), "frob"),
    (StructuredOutput(json="{not json"), "not valid JSON"),
    (StructuredOutput(grammar="start: missing_rule"), "missing_rule"),
])
def test_bad_grammars_are_refused_before_any_device_work(lm, spec, words):
    before = lm.generator.compile_count
    with pytest.raises(StructuredOutputError, match=words):
        rj.generate(lm, ["hello"], max_new_tokens=4, structured=spec)
    assert lm.generator.compile_count == before
    with pytest.raises(TypeError, match="StructuredOutput"):
        rj.generate(lm, ["hello"], structured={"regex": "a"})
    with pytest.raises(ValueError, match="2 structured outputs for 1 prompts"):
        rj.generate(lm, ["hello"], structured=[spec, None])


# -- the server: OpenAI's response_format and vLLM's fields, answered as offline ------------------

@pytest.fixture(scope="module")
def server(lm):
    running = Running(Server(lm, max_batch=4, max_queue=16, model_name="tiny"))
    yield running
    running.stop()


def post(server, route: str, **body) -> dict:
    r = httpx.post(f"{server.url}{route}", json={"model": "tiny", "temperature": 0, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_server_answers_each_structured_field_as_offline(server, lm):
    schema = {**SCHEMA, "x-guidance": {"whitespace_flexible": False}}
    messages = [{"role": "user", "content": "Describe yourself."}]
    body = post(server, "/v1/chat/completions", messages=messages, max_tokens=60,
                response_format={"type": "json_schema", "json_schema": {"name": "me", "schema": schema}})
    ids = lm.tokenizer(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    want = rj.generate(lm, [ids], max_new_tokens=60, structured=StructuredOutput(json=schema))[0]
    content = body["choices"][0]["message"]["content"]
    assert content == want.text and matches("json_schema", content) and body["choices"][0]["finish_reason"] == "stop"

    asks = {"guided_regex": ("regex", REGEX), "structured_outputs": ("lark", {"grammar": LARK}),
            "guided_choice": ("choice", CHOICES)}
    for field, (kind, value) in asks.items():
        spec = SPECS[kind]
        text = post(server, "/v1/completions", prompt="hello", max_tokens=40, **{field: value})["choices"][0]["text"]
        assert text == rj.generate(lm, ["hello"], max_new_tokens=40, structured=spec)[0].text and matches(kind, text)
    # streamed, and sampled: n choices, each its own output, each a fit
    events = stream_events(server.url, prompt="hello", max_tokens=40, guided_regex=REGEX, n=3, temperature=1.0,
                           seed=7)
    texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["index"] == i)
             for i in range(3)]
    assert all(matches("regex", t) for t in texts) and len(set(texts)) > 1, texts
    anything = post(server, "/v1/chat/completions", messages=messages, max_tokens=60,
                    response_format={"type": "json_object"})["choices"][0]
    assert anything["finish_reason"] == "length" or isinstance(json.loads(anything["message"]["content"]), dict)


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_bad_structured_requests_are_400s_naming_the_field(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err
    assert post(server, "/v1/completions", prompt="hi", max_tokens=2)["choices"]  # and the server carries on


# -- tool calls: tool_choice named or "required", as vLLM runs them without a parser --------------

COMPACT = {"x-guidance": {"whitespace_flexible": False}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False, **COMPACT}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False, **COMPACT}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def fits(name: str, arguments: str) -> bool:
    """Python's reading of a call's arguments against its function's schema."""
    args = json.loads(arguments)
    if name == "get_weather":
        return set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 8 \
            and args["unit"] in ("c", "f")
    return set(args) == {"zone"} and type(args["zone"]) is int and -12 <= args["zone"] <= 14


def rendered(lm, messages, tools=None) -> list[int]:
    """The prompt as transformers' own apply_chat_template renders it."""
    text = lm.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_named_tool_call_is_its_arguments_under_its_schema(server, lm):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    ask = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=40,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = client.chat.completions.create(**ask).choices[0]
    [call] = choice.message.tool_calls
    want = rj.generate(lm, [rendered(lm, ASK, [WEATHER, TIME])], max_new_tokens=40,
                       structured=StructuredOutput(json=WEATHER["function"]["parameters"]))[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert call.function.arguments == want.text and fits("get_weather", want.text)
    assert choice.message.content is None and choice.finish_reason == "stop"
    # streamed: the call's id and name first, then its arguments, which join to the whole
    chunks = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    opening = chunks[0].tool_calls[0]
    assert opening.id.startswith("call_") and opening.function.name == "get_weather" and opening.type == "function"
    assert "".join(d.tool_calls[0].function.arguments or "" for d in chunks if d.tool_calls) == want.text


def test_required_tool_calls_are_parsed_from_a_list_of_calls(server, lm):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    ask = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=72)
    names = set()
    for seed in range(4):  # one call each (parallel_tool_calls false): one of the tools, with its arguments
        choice = client.chat.completions.create(**ask, parallel_tool_calls=False, temperature=1.0,
                                                seed=seed).choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        assert call.function.name in ("get_weather", "get_time") and fits(call.function.name, call.function.arguments)
        assert choice.message.content is None
        names.add(call.function.name)
    # any number of calls: each parsed, or the list cut short by max_tokens and left as text
    choice = client.chat.completions.create(**ask, temperature=0).choices[0]
    if choice.finish_reason == "length":
        assert choice.message.content.startswith("[") and not choice.message.tool_calls
    else:
        assert choice.finish_reason == "tool_calls" and all(fits(c.function.name, c.function.arguments)
                                                            for c in choice.message.tool_calls)
    # streamed: each call whole once its object closes, the same calls as the whole answer's
    seeded = dict(parallel_tool_calls=False, temperature=1.0, seed=0)
    for extra, whole in ((seeded, client.chat.completions.create(**ask, **seeded).choices[0]),
                         (dict(temperature=0), choice)):
        chunks = [c.choices[0] for c in client.chat.completions.create(**ask, **extra, stream=True) if c.choices]
        streamed = [t for c in chunks for t in c.delta.tool_calls or []]
        content = "".join(c.delta.content or "" for c in chunks)
        assert [t.index for t in streamed] == list(range(len(streamed))) and all(t.id for t in streamed)
        assert chunks[-1].finish_reason == whole.finish_reason
        if whole.finish_reason == "tool_calls":
            want = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
            rest = ""
        else:  # the calls that closed before the cut, then the open one's text
            want, rest = closed_calls(whole.message.content)
        assert [(t.function.name, json.loads(t.function.arguments)) for t in streamed] == want
        assert content == rest


def closed_calls(text: str) -> tuple[list, str]:
    """Python's json reading of a JSON list of calls cut short: the calls whole before the
    cut, and the text from the one left open."""
    decoder, calls, i = json.JSONDecoder(), [], 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return calls, text[i:]
        calls.append((obj["name"], obj["parameters"]))


@pytest.mark.parametrize("cut", [None, -30, -1])
def test_a_list_of_calls_is_read_streamed_in_pieces(cut):
    """tool_choice "required"'s streamed reading agrees with Python's json, whatever the
    pieces, with braces and quotes inside strings; an unclosed call's text comes back
    at the end."""
    from ryzen_jax.serve.tools import CallListStream

    text = '[{"name": "a", "parameters": {"s": "}{\\" ]", "t": [1, {"u": 2}]}}, {"name": "b", "parameters": {}}]'
    text = text[:cut]
    want, rest = closed_calls(text) if cut else ([(c["name"], c["parameters"]) for c in json.loads(text)], "")
    assert len(want) == (2 if cut in (None, -1) else 1)
    for step in (1, 3, 7):
        stream, found = CallListStream(), []
        for i in range(0, len(text), step):
            content, calls = stream.push(text[i:i + step])
            assert content == ""  # a list of calls has no content
            found += calls
        tail, more = stream.finish()
        assert [(n, json.loads(a)) for n, a in found] == want and not more
        assert tail == rest


def test_a_tool_result_turn_renders_as_transformers_renders_it(server, lm):
    """An assistant's tool call and the tool's answer reach the chat template as sent."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": '{"city":"Paris","unit":"c"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"}]
    body = post(server, "/v1/chat/completions", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8)
    ids = rendered(lm, messages, [WEATHER])
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"]["content"] == rj.generate(lm, [ids], max_new_tokens=8)[0].text


@pytest.mark.parametrize("body,param", [
    ({"tools": [WEATHER]}, "tool_choice"),  # OpenAI's default "auto" needs a tool-call parser
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "none"},
     "tools.function.name"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server, body, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


# -- tool_choice "auto": the model's own call syntax, read back by a parser -----------------------

HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>')
LLAMA3 = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; ' \
         '{"name": "get_time", "parameters": {"zone": 1}}'
CALLS = [("get_weather", '{"city": "Paris", "unit": "c"}'), ("get_time", '{"zone": 1}')]
MISTRAL_LIST = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, ' \
               '{"name": "get_time", "arguments": {"zone": 1}}]'  # Mistral's v3 tokenizers
MISTRAL_NAMED = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]get_time[ARGS]{"zone": 1}'
PYTHONIC = '[get_weather(city="Paris", unit="c"), get_time(zone=1)]'


@pytest.mark.parametrize("name,text,content,calls", [
    ("hermes", HERMES, "Let me look.", CALLS),
    ("hermes", "no call here, <tool_call> nor a closed one", "no call here, <tool_call> nor a closed one", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {broken</tool_call>',
     '<tool_call>{"name": "f", "arguments": {broken</tool_call>', []),
    ("llama3_json", LLAMA3, None, CALLS),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone": 1}}', None, CALLS[1:]),
    ("llama3_json", "It is sunny.", "It is sunny.", []),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone"', '{"name": "get_time", "parameters": {"zone"', []),
    ("mistral", "Let me look. [TOOL_CALLS] " + MISTRAL_LIST, "Let me look.", CALLS),
    ("mistral", MISTRAL_LIST, None, CALLS),  # [TOOL_CALLS] dropped with the special tokens
    ("mistral", MISTRAL_NAMED, None, CALLS),  # v11 and later
    ("mistral", "[1] is a citation, not a call", "[1] is a citation, not a call", []),
    ("mistral", 'Sure [TOOL_CALLS] [{"name": "f", "arguments": {', 'Sure [TOOL_CALLS] [{"name": "f", "arguments": {', []),
    ("pythonic", PYTHONIC, None, CALLS),
    ("pythonic", "<|python_start|>[get_time(zone=1)]<|python_end|>", None, CALLS[1:]),
    ("pythonic", '[f(a=[1, {"b": None}], c=True)]', None, [("f", '{"a": [1, {"b": null}], "c": true}')]),
    ("pythonic", "It is sunny.", "It is sunny.", []),
    ("pythonic", '[f(a=__import__("os").getcwd())]', '[f(a=__import__("os").getcwd())]', []),  # never run
    ("pythonic", '[print(open("x").read())]', '[print(open("x").read())]', []),  # positional: not a call
    ("pythonic", "[get_time(zone=1", "[get_time(zone=1", []),  # cut short
])
def test_tool_call_parsers_read_their_syntax_whole_and_streamed(name, text, content, calls):
    from ryzen_jax.serve.tools import tool_parser

    parser = tool_parser(name)
    got = parser.parse(text)
    assert (got[0], [(n, json.loads(a)) for n, a in got[1]]) == (content, [(n, json.loads(a)) for n, a in calls])
    for step in (1, 3, 7):  # streamed in pieces: the same calls; the content's text, whitespace aside
        stream, pieces, found = parser.streamer(), [], []
        for i in range(0, len(text), step):
            c, f = stream.push(text[i:i + step])
            pieces.append(c)
            found += f
        c, f = stream.finish()
        pieces.append(c)
        found += f
        assert [(n, json.loads(a)) for n, a in found] == [(n, json.loads(a)) for n, a in calls]
        assert "".join(pieces).strip() == (content or "").strip()


@pytest.fixture(scope="module")
def auto_server(lm):
    running = Running(Server(lm, max_batch=4, max_queue=16, model_name="tiny", tool_call_parser="hermes"))
    yield running
    running.stop()


def test_auto_tool_calls_are_read_out_of_the_models_text(auto_server):
    """The output is steered into hermes syntax (guided_regex, as a model trained on it
    would write): the server returns its calls; an output with none stays text."""
    import openai

    client = openai.OpenAI(base_url=f"{auto_server.url}/v1", api_key="none")
    syntax = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{2,5}"\}\}\n</tool_call>'
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], temperature=0,
               max_tokens=88, extra_body={"guided_regex": syntax})
    plain = client.chat.completions.create(**ask, tool_choice="none").choices[0]  # what the model writes, as text
    assert plain.finish_reason == "stop" and re.fullmatch(syntax, plain.message.content), plain
    written = json.loads(plain.message.content.split("\n")[1])
    choice = client.chat.completions.create(**ask).choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == written["arguments"]
    chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = [t for c in chunks for t in c.delta.tool_calls or []]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in streamed] == [
        ("get_weather", written["arguments"])] and chunks[-1].finish_reason == "tool_calls"
    assert not "".join(c.delta.content or "" for c in chunks).strip()
    text = client.chat.completions.create(**{**ask, "extra_body": {"guided_regex": "[a-z]{3,5}"}}).choices[0]
    assert text.finish_reason == "stop" and not text.message.tool_calls and re.fullmatch("[a-z]{3,5}",
                                                                                         text.message.content)
