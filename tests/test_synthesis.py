"""Novel → instruction synthesis: against a fault-injecting stub API (429, 500, stalls, invalid JSON, unusable answers,
a kill mid-run) and end to end against our own server running the tiny default model."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import uvicorn

from novelkit.data.formats import Sample
from novelkit.data.readers import read_books, read_text
from novelkit.generation.batch import generate_responses
from novelkit.generation.worker import GenerationWorker
from novelkit.models.loading import load_model, load_tokenizer
from novelkit.serve.server import create_app
from novelkit.synthesize.passages import (DEFAULT_MAX_CLASSICAL, DEFAULT_SYSTEM, ResultCache, Settings, book_passages,
                                build_messages, classical_score, clean_summary, request_key, summary_problem)
from novelkit.data.templates import default_template_name, get_template

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-not-a-real-key-42"
TIMEOUT = 1.0  # the client's per-call timeout in these tests; stalls last longer
MAX_ATTEMPTS = 3
CLASSICAL = ("晋太元中，武陵人捕鱼为业。缘溪行，忘路之远近。忽逢桃花林，夹岸数百步，中无杂树，芳草鲜美，落英缤纷。渔人甚异之。"
             "复前行，欲穷其林。林尽水源，便得一山，山有小口，仿佛若有光。便舍船，从口入。初极狭，才通人。复行数十步，豁然开朗。\n"
             "环滁皆山也。其西南诸峰，林壑尤美，望之蔚然而深秀者，琅琊也。山行六七里，渐闻水声潺潺而泻出于两峰之间者，酿泉也。"
             "峰回路转，有亭翼然临于泉上者，醉翁亭也。作亭者谁？山之僧智仙也。名之者谁？太守自谓也。醉翁之意不在酒，在乎山水之间也。\n")


def passage_id(content: str) -> str:
    return hashlib.sha1(content.encode()).hexdigest()[:8]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops connections under 8 concurrent clients


class Stub:
    """A chat-completions endpoint on loopback that counts calls per passage and answers as `plan(ordinal, n)`
    says for the n-th call of a passage; after `hold_after` good answers it holds every request until released."""

    def __init__(self, ordinals: dict, plan, hold_after=None):
        self.ordinals, self.plan, self.hold_after = ordinals, plan, hold_after
        self.calls: Counter = Counter()
        self.good = 0
        self.release = threading.Event()
        self.bad_auth = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.headers.get("authorization") != f"Bearer {KEY}":
                    stub.bad_auth += 1
                content = body["messages"][-1]["content"]
                with stub.lock:
                    stub.calls[content] += 1
                    action = stub.plan(stub.ordinals.get(content, -1), stub.calls[content])
                    if action == "ok":
                        stub.good += 1
                        held = stub.hold_after is not None and stub.good > stub.hold_after
                if action == "ok" and held:
                    stub.release.wait(30)
                try:
                    self.answer(action, content)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

            def answer(self, action, content):
                if action == "stall":
                    time.sleep(TIMEOUT * 3)
                    return self.send(200, json.dumps(chat("晚到的答案")))
                if action in ("429", "500", "401"):
                    return self.send(int(action), json.dumps({"error": {"message": f"injected {action}"}}))
                if action == "badjson":
                    return self.send(200, '{"choices": [{"message": ')
                text = {"ok": f"提示：“{passage_id(content)}的故事”", "empty": "  ", "refusal": "抱歉，我无法完成这个请求。",
                        "long": "一个很长很长的提示" * 6}[action]
                self.send(200, json.dumps(chat(text)))

            def send(self, status, text):
                data = text.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if status == 429:
                    self.send_header("retry-after", "0")
                self.end_headers()
                self.wfile.write(data)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def chat(text):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}


ALWAYS_500, ALWAYS_LONG = 3, 5


def fault_plan(i, n):
    """Every 7 passages see each fault once, then a good answer; two passages never get one."""
    if i == ALWAYS_500:
        return "500"
    if i == ALWAYS_LONG:
        return "long"
    first = {0: "429", 1: "500", 2: "stall", 4: "badjson", 6: "refusal"}.get(i % 7)
    if i % 7 == 6 and n == 2:
        return "empty"
    return first if first and n <= (2 if i % 7 == 6 else 1) else "ok"


def expected_calls(i):
    return MAX_ATTEMPTS if i in (ALWAYS_500, ALWAYS_LONG) else 3 if i % 7 == 6 else 2 if i % 7 in (0, 1, 2, 4) else 1


@pytest.fixture(scope="module")
def books(shared_data, tmp_path_factory):
    """The first three chapters of 西游记 as GB18030 with CRLF, and a short classical text that the filter drops."""
    d = tmp_path_factory.mktemp("books")
    text = read_text(shared_data / "novels" / "xiyouji.txt")
    end = text.index("第四回")
    (d / "xiyouji_1-3.txt").write_bytes(text[:end].replace("\n", "\r\n").encode("gb18030"))
    (d / "taohua.txt").write_text(CLASSICAL * 3, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def passages(books):
    return book_passages(read_books(books), log=lambda *a: None)


@pytest.fixture(scope="module")
def ordinals(passages):
    s = Settings(base_url="", model="stub")
    return {build_messages(s, p.text)[-1]["content"]: i for i, p in enumerate(passages)}


def synthesize(url, books, out, *extra, wait=True):
    cmd = [sys.executable, "-m", "novelkit.synthesize", "--input", str(books), "--output", str(out), "--base_url", url,
           "--model", "stub", "--timeout", str(TIMEOUT), "--retry_base", "0.01", "--max_attempts", str(MAX_ATTEMPTS),
           *map(str, extra)]
    env = {**os.environ, "SYNTH_API_KEY": KEY}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(books, ordinals, tmp_path_factory):
    stub = Stub(ordinals, fault_plan)
    out = tmp_path_factory.mktemp("run1") / "sft.jsonl"
    result = synthesize(stub.url, books, out)
    stub.close()
    return out, result, stub


def test_classical_score_separates_wenyan_from_vernacular_novels(shared_data):
    scores = {b.name: classical_score(b.text) for b in read_books(shared_data / "novels")}
    scores["data_examples"] = classical_score("".join(b.text for b in read_books(ROOT / "data_examples" / "novels")))
    assert max(scores.values()) < DEFAULT_MAX_CLASSICAL < classical_score(CLASSICAL), scores
    assert scores["data_examples"] < scores["hongloumeng"] < scores["xiyouji"]  # modern < 白话 < 半文半白


def test_summaries_are_cleaned_and_unusable_ones_named():
    assert clean_summary(" 写作提示：「少年在雨夜遇见剑客。」\n") == "少年在雨夜遇见剑客"
    assert summary_problem("", 30) == "empty"
    assert summary_problem("抱歉，我无法概括这段内容", 30).startswith("refusal-like")
    assert summary_problem("作为一个AI语言模型，我", 30).startswith("refusal-like")
    assert summary_problem("他无法忘记那个雨夜", 30) is None  # 无法 in a story is not a refusal
    assert summary_problem("长" * 31, 30).startswith("over-long (31 > 30")
    assert summary_problem("第一行\n第二行", 30).startswith("several lines")


def test_cache_survives_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "prompt": "一"}\n{"key": "b", "pro', encoding="utf-8")
    cache = ResultCache(path)
    cache.add({"key": "c", "prompt": "三"})
    cache.close()
    assert set(ResultCache(path).results) == {"a", "c"}
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_cache_keeps_text_with_unicode_line_separators(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ResultCache(path)
    cache.add({"key": "a", "prompt": "甲\u2028乙\x1c丙\x85丁"})  # written raw: ensure_ascii=False
    cache.close()
    assert ResultCache(path).results["a"]["prompt"] == "甲\u2028乙\x1c丙\x85丁"


def test_every_passage_ends_with_a_result_or_a_reported_failure(uninterrupted, passages, ordinals):
    out, result, stub = uninterrupted
    log = result.stdout + result.stderr
    assert result.returncode == 1, log  # two passages failed: reported, non-zero exit
    assert "taohua: 文言 score" in log and "skipped" in log
    assert not any("渔人" in c or "醉翁" in c for c in stub.calls)  # the classical book was never sent
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    failures = [json.loads(line) for line in (out.parent / "sft.failures.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failures] == [ALWAYS_500, ALWAYS_LONG]
    assert "HTTP 500" in failures[0]["error"] and "over-long" in failures[1]["error"]
    kept = [p for i, p in enumerate(passages) if i not in (ALWAYS_500, ALWAYS_LONG)]
    assert [r["output"] for r in records] == [p.text for p in kept]  # passage order, nothing lost
    content = {passages[i].text: c for c, i in ordinals.items()}
    assert all(r["input"] == f"{passage_id(content[r['output']])}的故事" for r in records)
    assert all(r["instruction"] == "根据提示写一段小说正文。" for r in records)
    assert {i: stub.calls[c] for c, i in ordinals.items()} == {i: expected_calls(i) for i in ordinals.values()}
    calls = sum(stub.calls.values())
    assert f"calls: {calls} | retries: {calls - len(passages)}" in log
    answered = sum(fault_plan(i, n) in ("ok", "empty", "refusal", "long")  # parsed answers carry usage
                   for i in ordinals.values() for n in range(1, expected_calls(i) + 1))
    assert f"tokens: {answered * 100:,} prompt + {answered * 10:,} completion" in log
    assert "passage/s" in log  # the progress bar's rate
    assert stub.bad_auth == 0
    for f in out.parent.iterdir():
        assert KEY not in f.read_text(encoding="utf-8")
    assert KEY not in log


def test_kill_and_rerun_repeats_no_call_and_gives_the_same_output(uninterrupted, books, passages, ordinals,
                                                                 tmp_path):
    stub = Stub(ordinals, fault_plan, hold_after=8)
    out = tmp_path / "sft.jsonl"
    cache = tmp_path / "sft.cache.jsonl"
    proc = synthesize(stub.url, books, out, "--concurrency", 4, wait=False)
    deadline = time.time() + 60
    while not (cache.exists() and cache.read_text().count("\n") >= 8) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = {json.loads(line)["key"] for line in cache.read_text().splitlines()}
    s = Settings(base_url="", model="stub")
    done_contents = [c for c, i in ordinals.items() if request_key(s, build_messages(s, passages[i].text)) in done]
    assert len(done) == len(done_contents) == 8
    before = Counter(stub.calls)
    stub.hold_after = None
    stub.release.set()

    result = synthesize(stub.url, books, out, "--concurrency", 4)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "8 from the cache" in result.stdout
    assert all(stub.calls[c] == before[c] for c in done_contents)  # no repeated call for a done passage
    assert out.read_bytes() == uninterrupted[0].read_bytes()

    before = Counter(stub.calls)  # a third run only retries the two failed passages
    result = synthesize(stub.url, books, out, "--concurrency", 4)
    assert sum(stub.calls.values()) - sum(before.values()) == 2 * MAX_ATTEMPTS
    assert out.read_bytes() == uninterrupted[0].read_bytes()
    stub.close()


def test_a_wrong_key_stops_the_run_with_one_line(books, ordinals, tmp_path):
    stub = Stub(ordinals, lambda i, n: "401")
    result = synthesize(stub.url, books, tmp_path / "sft.jsonl")
    stub.close()
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "HTTP 401" in error and "SYNTH_API_KEY" in error and KEY not in error
    assert sum(stub.calls.values()) <= 8  # the requests in flight, not every passage with retries


@pytest.fixture(scope="module")
def our_server(default_model_dir):
    """Our own server (novelkit.serve.server.create_app) on the tiny default model, in a thread on a free loopback
    port."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: two threads thrash
    model, tokenizer = load_model(str(default_model_dir)), load_tokenizer(str(default_model_dir))
    worker = GenerationWorker(model, tokenizer, get_template(default_template_name(tokenizer, model.config)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(worker, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", worker
    server.should_exit = True
    thread.join(30)
    torch.set_num_threads(threads)


def test_end_to_end_against_our_server(our_server, tmp_path):
    url, worker = our_server
    (tmp_path / "books").mkdir()
    text = read_text(ROOT / "data_examples" / "novels" / "qingyun_ji.txt")
    (tmp_path / "books" / "qingyun_ji.txt").write_text(text[:700], encoding="utf-8")
    out = tmp_path / "sft.jsonl"
    args = ["--chunk_chars", 200, "--few_shot", "none", "--temperature", 0, "--max_tokens", 8, "--timeout", 120]
    result = synthesize(url, tmp_path / "books", out, *args)
    log = result.stdout + result.stderr
    passages = book_passages(read_books(tmp_path / "books"), 200, log=lambda *a: None)
    s = Settings(base_url=url, model="tiny", few_shot=[])
    samples = [Sample(prompt=build_messages(s, p.text)[-1]["content"], response="", system=DEFAULT_SYSTEM)
               for p in passages]
    answers = [clean_summary(a) for a in generate_responses(worker.model, worker.tokenizer, worker.template, samples,
                                                             progress=False, max_new_tokens=8, do_sample=False)]
    kept = [(a, p.text) for a, p in zip(answers, passages) if summary_problem(a, 30) is None]
    assert kept and result.returncode == (0 if len(kept) == len(passages) else 1), log
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["input"], r["output"]) for r in records] == kept  # the server's greedy answers, in passage order
    assert re.search(r"tokens: [1-9][\d,]* prompt \+ [1-9][\d,]* completion", log), log  # usage comes through

    again = synthesize(url, tmp_path / "books", out, *args)
    assert f"{len(kept)} from the cache" in again.stdout
    assert out.read_text(encoding="utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def test_a_dead_endpoint_stops_after_consecutive_failures(books, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    result = synthesize(url, books, tmp_path / "sft.jsonl", "--max_consecutive_failures", 4, "--concurrency", 2)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "passages in a row failed (last: connection error: ConnectError" in error and "rerun to resume" in error
