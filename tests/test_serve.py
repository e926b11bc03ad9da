"""The OpenAI-compatible server (`python -m novelkit.serve`) on the tiny default model + a LoRA adapter, driven by the
official `openai` client on loopback: answers match in-process generation, streaming matches whole answers,
malformed requests get OpenAI-style 400s, 32 concurrent requests all complete."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from novelkit.data.formats import Sample
from novelkit.data.templates import default_template_name, encode_prompt, get_template
from novelkit.generation.batch import generate_responses
from novelkit.models.loading import load_model, load_tokenizer, write_base_fingerprint

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-7f3a"
SYSTEM = "你是一位小说作家。"
HISTORY = [("写一句开头。", "雨下了一整夜。")]
QUESTION = "接着写主角出门。"


@pytest.fixture(scope="module")
def adapter(default_model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights, so its answers differ from the base model's."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = get_peft_model(load_model(str(default_model_dir)), config)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lora") / "novel-lora"
    model.save_pretrained(out)
    write_base_fingerprint(str(out), model.config)
    return out


@pytest.fixture(scope="module")
def url(adapter, tmp_path_factory):
    """`python -m novelkit.serve --lora_model ...` (the base comes from the adapter) on a free loopback port."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "novelkit.serve", "--lora_model", str(adapter), "--port", "0", "--max_tokens", "8"]
    with open(log, "w") as f:
        # one thread: on a shared 2-core machine two threads per process thrash (32 requests: 20 s vs 1 s)
        env = {**os.environ, "NOVELKIT_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=f)
    deadline = time.time() + 240
    while not (found := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())):
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)
    yield found.group(1) + "/v1"
    proc.terminate()
    proc.wait(30)
    assert KEY not in log.read_text()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(adapter, default_model_dir):
    """Greedy answers computed in this process with the same weights, for comparison."""
    tokenizer = load_tokenizer(str(default_model_dir))
    lora = load_model(str(default_model_dir), adapter=str(adapter))
    base = load_model(str(default_model_dir))
    template = get_template(default_template_name(tokenizer, lora.config))

    def answer(sample, model=lora, template=template):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the server runs: same kernels, same rounding, same greedy choices
        try:
            return generate_responses(model, tokenizer, template, [sample], progress=False, max_new_tokens=8,
                                      do_sample=False)[0]
        finally:
            torch.set_num_threads(threads)

    answer.tokenizer, answer.template, answer.base = tokenizer, template, base
    answer.threads = torch.get_num_threads()
    return answer


def chat_messages():
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in HISTORY:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": QUESTION}]


def test_models_lists_the_adapter_and_every_route_needs_the_key(client, url):
    assert [m.id for m in client.models.list().data] == ["novel-lora"]
    wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="novel-lora", messages=[{"role": "user", "content": "你好"}])
    r = httpx.post(f"{url}/completions", json={"prompt": "雨", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_chat_uses_the_template_history_and_adapter(client, reference):
    sample = Sample(prompt=QUESTION, response="", system=SYSTEM, history=HISTORY)
    r = client.chat.completions.create(model="novel-lora", messages=chat_messages(), temperature=0, max_tokens=8)
    expected = reference(sample)
    assert r.choices[0].message.content.strip() == expected
    assert expected != reference(sample, model=reference.base)  # the adapter is really applied
    assert r.usage.prompt_tokens == len(encode_prompt(reference.tokenizer, reference.template, sample))
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8


def test_completion_is_raw_text_and_streams_the_same_text(client, reference):
    r = client.completions.create(model="novel-lora", prompt="青云山的雨，", temperature=0, max_tokens=8)
    text = r.choices[0].text
    assert text.strip() == reference(Sample(prompt="青云山的雨，", response=""), template=get_template("plain"))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    pieces = [c.choices[0].text for c in client.completions.create(model="novel-lora", prompt="青云山的雨，",
                                                                    temperature=0, max_tokens=8, stream=True)]
    assert "".join(pieces) == text and len(pieces) > 2

    whole = client.chat.completions.create(model="x", messages=chat_messages(), temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model="x", messages=chat_messages(), temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_completion_never_ends_in_half_a_character(client, reference, adapter, default_model_dir):
    """max_tokens that ends inside a multi-byte character (its byte-fallback pieces decode to U+FFFD): the response
    ends before that character, streamed or not, and usage still counts every generated token."""
    from novelkit.generation.engine import Engine, Request

    tokenizer, plain = reference.tokenizer, get_template("plain")
    lora = load_model(str(default_model_dir), adapter=str(adapter))
    torch.set_num_threads(1)  # as the server runs
    try:
        # openings of the bundled novels' lines: greedy continuations that stop inside a character (the tiny model
        # writes rare characters as byte pieces) are common, but which ones depends on the built model's weights
        novels = sorted((ROOT / "data_examples" / "novels").glob("*.txt"))
        lines = [line.strip()[:8] for path in novels for line in path.read_text().splitlines() if line.strip()]
        cases = []
        for prompt in lines[:60]:
            ids = encode_prompt(tokenizer, plain, Sample(prompt=prompt, response=""))
            tokens = Engine(lora, max_batch=1, max_len=len(ids) + 32).run([Request(ids, 32)])[0].tokens
            cases += [(prompt, n) for n in range(1, len(tokens) + 1)
                      if tokenizer.decode(tokens[:n], skip_special_tokens=True).endswith("\ufffd")][:1]
            if len(cases) == 3:
                break
    finally:
        torch.set_num_threads(reference.threads)
    assert cases, "no greedy continuation stops inside a character"
    for prompt, n in cases:
        r = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=n)
        text = r.choices[0].text
        assert not text.endswith("\ufffd") and r.usage.completion_tokens == n
        pieces = [c.choices[0].text for c in client.completions.create(model="m", prompt=prompt, temperature=0,
                                                                        max_tokens=n, stream=True)]
        assert "".join(pieces) == text and "\ufffd" not in pieces


def test_stop_strings_cut_the_answer(client):
    text = client.completions.create(model="m", prompt="沈砚背着草药", temperature=0, max_tokens=8).choices[0].text
    stop = next(ch for ch in text[1:] if ch.strip())
    cut = text[:text.index(stop)]
    r = client.completions.create(model="m", prompt="沈砚背着草药", temperature=0, max_tokens=8, stop=[stop, "不会出现的"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="m", prompt="沈砚背着草药", temperature=0, max_tokens=8, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_sampling_with_a_seed_repeats(client):
    def ask():
        return client.completions.create(model="m", prompt="夜雨", temperature=1.0, top_p=0.9, seed=7,
                                         max_tokens=8).choices[0].text
    assert ask() == ask()


BAD = [
    ("/chat/completions", b"{not json", "not valid JSON"),
    ("/chat/completions", b"[1, 2]", "valid dictionary"),
    ("/chat/completions", {"model": "m"}, "messages: Field required"),
    ("/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
    ("/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "the last message must be a user message"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                        {"role": "user", "content": "c"}]}, "messages[1]: a system message"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 2}, "only n=1 is supported"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}], "temperature": 5}, "temperature"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "max_tokens"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 10**6}, "context"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
    ("/completions", {"prompt": ["a", "b"]}, "give one prompt"),
    ("/completions", {"prompt": 42}, "prompt"),
    ("/completions", {"prompt": "雨" * 20000}, "context"),
]


@pytest.mark.parametrize("path, body, message", BAD, ids=[m for _, _, m in BAD])
def test_malformed_requests_get_an_openai_error_and_the_server_carries_on(url, path, body, message):
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body)
    r = httpx.post(url + path, content=content, headers=headers, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    ok = httpx.post(url + "/completions", json={"prompt": "雨", "max_tokens": 1}, headers=headers, timeout=60)
    assert ok.status_code == 200


def test_the_openai_client_sees_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], n=3)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="雨")


def test_32_concurrent_requests_all_complete(url):
    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300) as aclient:
            async def one(i):
                if i % 4 == 3:
                    stream = await aclient.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"第{i}个请求"}], max_tokens=4, stream=True)
                    return [c.choices[0].finish_reason async for c in stream if c.choices][-1]
                if i % 2:
                    r = await aclient.completions.create(model="m", prompt=f"第{i}章", max_tokens=4)
                else:
                    r = await aclient.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"第{i}个请求"}], max_tokens=4)
                return r.choices[0].finish_reason
            return await asyncio.gather(*(one(i) for i in range(32)))

    start = time.time()
    reasons = asyncio.run(main())
    assert len(reasons) == 32 and set(reasons) <= {"stop", "length"}, reasons
    print(f"32 concurrent requests: {time.time() - start:.1f} s")
