"""Novel → instruction data: each ~800-character passage is summarised by an LLM behind any OpenAI-compatible
chat API into a short writing prompt, giving Alpaca records {instruction, input: prompt, output: passage}.

Built for long unattended runs: concurrent requests; retries with exponential backoff and jitter on 429, 5xx,
timeouts, connection errors and unusable answers, up to a cap on attempts; every accepted summary is appended to a
JSON-lines cache as it arrives, keyed by a hash of the request (model + messages, so the passage and the prompt
settings), so a killed run resumes without repeating a call. HTTP goes through httpx directly: the retry policy is
ours, and every failure (status, transport error, bad JSON, missing fields) is classified in one place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from ..data.chunking import chunk_book
from ..data.readers import iter_records
from ..errors import ConfigError, DataError

DEFAULT_INSTRUCTION = "根据提示写一段小说正文。"
DEFAULT_SYSTEM = "你是一位经验丰富的网络小说编辑，擅长把小说片段概括成简短的写作提示。"
DEFAULT_REQUEST = ("请把下面这段小说概括成一个不超过{max_chars}个字的写作提示，说清楚人物和事件。"
                   "只输出提示本身，不要加引号、标题或解释。\n\n{passage}")
# (passage, prompt) pairs, from this project's own data_examples/sft/train.jsonl
DEFAULT_FEW_SHOT = [
    ("雨下得很急，山门前的石灯被浇灭了一半。阿临抱着柴火往回跑，脚下一滑，差点撞上台阶边坐着的一个人。那人一身黑衣，"
     "胸口洇开一大片深色，手里却仍握着一柄长剑，剑尖拄地，撑着没有倒下。“小兄弟，”他抬起头，声音低哑，“这里可是玄霄宗？”"
     "阿临点点头，又飞快地摇头：“山门戌时就关了，你进不去。”剑客笑了一下，雨水顺着他的眉骨往下淌：“那就在这里等到天亮。”"
     "阿临犹豫片刻，把怀里唯一干燥的那件旧袄子，轻轻盖在了他的肩上。",
     "少年在雨夜的山门前遇见一位受伤的剑客"),
    ("客栈打烊前，进来一个戴斗笠的汉子，只要一碗阳春面。柳三娘亲自下厨，面端上桌，汤清葱绿，还卧着一只荷包蛋。汉子吃了两口，"
     "筷子忽然一顿。“蛋是溏心的。”柳三娘倚着柜台，笑吟吟地说，“江南人吃阳春面，蛋要煎老；只有雁门关外的人，才爱这口溏心。"
     "客官口音学得像，胃口却骗不了人。”汉子的手慢慢移向腰间。柳三娘却只是拿起抹布擦了擦桌子：“面钱八文，命钱另算。"
     "谁雇你来的，说了，这碗面我请。”",
     "女掌柜用一碗阳春面套出了刺客的来历"),
]

# Function characters of classical Chinese against those of the vernacular. Measured book scores: modern web
# novels 0.03-0.04, 红楼梦 0.11, 水浒传 0.11, 西游记 0.23, 桃花源记 0.71; 0.5 keeps all 白话 novels.
CLASSICAL_CHARS = "之乎者也矣焉哉曰"
VERNACULAR_CHARS = "的了是们这那么着"
DEFAULT_MAX_CLASSICAL = 0.5

_LABEL = re.compile(r"^\s*(?:写作)?(?:提示|梗概|概括)\s*[:：]\s*")
_QUOTE_PAIRS = {'""', "''", "“”", "‘’", "「」", "『』"}
_REFUSAL = re.compile(r"^\s*(?:很?抱歉|对不起|sorry)|作为(?:一个|一名)?(?:AI|人工智能|语言模型)|as an AI|"
                      r"我(?:无法|不能)(?:为你|为您|提供|完成|回答|处理|生成|协助)|I can(?:not|'t) (?:help|assist|provide)",
                      re.IGNORECASE)
RETRY_STATUS = {408, 409, 429}  # and every 5xx
FATAL_STATUS = {401, 403, 404}  # a wrong key, model or base URL: no passage can succeed


@dataclass
class Settings:
    base_url: str
    model: str
    api_key: str = ""
    system: str = DEFAULT_SYSTEM
    request: str = DEFAULT_REQUEST  # with {passage} and {max_chars}
    few_shot: list[tuple[str, str]] = field(default_factory=lambda: list(DEFAULT_FEW_SHOT))
    max_prompt_chars: int = 30
    temperature: float = 0.7
    max_tokens: int = 64
    concurrency: int = 8
    max_attempts: int = 6
    timeout: float = 120.0
    retry_base: float = 1.0  # seconds before the first retry, doubled on each next one, ±50% jitter
    retry_cap: float = 60.0
    max_consecutive_failures: int = 50  # this many failed passages in a row: the endpoint is down, stop


@dataclass
class Passage:
    book: str
    index: int  # within the book
    text: str
    key: str = ""


@dataclass
class Stats:
    cached: int = 0
    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    failures: list[dict] = field(default_factory=list)


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float = 0.0):
        super().__init__(reason)
        self.wait = wait  # the server's Retry-After, seconds


class _Permanent(Exception):
    """This passage cannot succeed (e.g. a 400 for its content)."""


# ---------------------------------------------------------------- books and passages


def classical_score(text: str) -> float:
    """Share of classical function characters (之乎者也…) among classical + vernacular ones (的了是…); 0 when none."""
    counts = Counter(c for c in text if c in CLASSICAL_CHARS or c in VERNACULAR_CHARS)
    classical = sum(counts[c] for c in CLASSICAL_CHARS)
    total = sum(counts.values())
    return classical / total if total else 0.0


def book_passages(books, chunk_chars: int = 800, min_chars: int = 100, max_classical: float = DEFAULT_MAX_CLASSICAL,
                  log=print) -> list[Passage]:
    """Passages of every book in order (any iterable of books, read one at a time), skipping books whose classical
    score is above max_classical and passages shorter than min_chars (chapter tails). Logs each book's score."""
    passages = []
    for book in books:
        score = classical_score(book.text)
        if score > max_classical:
            log(f"  {book.name}: 文言 score {score:.2f} > {max_classical}: skipped")
            continue
        chunks = [c.text for c in chunk_book(book.text, chunk_chars)]
        kept = [t for t in chunks if len(t) >= min_chars]
        passages += [Passage(book.name, i, t) for i, t in enumerate(kept)]
        dropped = len(chunks) - len(kept)
        short = f", {dropped} shorter than {min_chars} chars left out" if dropped else ""
        log(f"  {book.name}: 文言 score {score:.2f}, {len(kept)} passages{short}")
    return passages


def load_few_shot(path) -> list[tuple[str, str]]:
    """Few-shot examples from JSON lines of {"passage": ..., "prompt": ...}."""
    examples = []
    for record in iter_records(path):
        values = []
        for name in ("passage", "prompt"):
            value = record.data.get(name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(record.path, record.line, f"field '{name}' must be a non-empty string")
            values.append(value.strip())
        examples.append((values[0], values[1]))
    return examples


def check_settings(s: Settings) -> None:
    if not s.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base URL {s.base_url!r} must start with http:// or https://")
    if "{passage}" not in s.request:
        raise ConfigError("the request text must contain {passage}")
    for passage, prompt in s.few_shot:
        if len(prompt) > s.max_prompt_chars:
            raise ConfigError(f"few-shot prompt {prompt!r} is {len(prompt)} chars, over the {s.max_prompt_chars} limit")
    for name in ("concurrency", "max_attempts", "max_prompt_chars", "max_tokens", "max_consecutive_failures"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(s, name)}")


def build_messages(s: Settings, passage: str) -> list[dict]:
    def ask(text):
        return {"role": "user", "content": s.request.replace("{max_chars}", str(s.max_prompt_chars))
                .replace("{passage}", text)}

    messages = [{"role": "system", "content": s.system}] if s.system else []
    for example, prompt in s.few_shot:
        messages += [ask(example), {"role": "assistant", "content": prompt}]
    return messages + [ask(passage)]


def request_key(s: Settings, messages: list[dict]) -> str:
    blob = json.dumps({"model": s.model, "messages": messages}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------- answers


def clean_summary(text: str) -> str:
    """The answer without a leading label (提示：), surrounding quotes or a final 。."""
    text = _LABEL.sub("", text.strip()).strip()
    inner = text[1:-1]
    if len(text) >= 2 and text[0] + text[-1] in _QUOTE_PAIRS and text[0] not in inner and text[-1] not in inner:
        text = inner.strip()
    return text.removesuffix("。").strip()


def summary_problem(text: str, max_chars: int) -> str | None:
    """Why a cleaned summary cannot be kept, or None."""
    if not text:
        return "empty"
    if _REFUSAL.search(text):
        return f"refusal-like: {text[:40]!r}"
    if "\n" in text:
        return f"several lines: {text[:40]!r}"
    if len(text) > max_chars:
        return f"over-long ({len(text)} > {max_chars} chars): {text[:40]!r}"
    return None


# ---------------------------------------------------------------- cache


class ResultCache:
    """Append-only JSON lines {key, prompt, usage, book, index}; read back on start. A line cut short by a kill is
    dropped (and the file trimmed to its last complete line, so the next append starts on a fresh line)."""

    def __init__(self, path):
        self.path = Path(path)
        self.results: dict[str, dict] = {}
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        # "\n" only: a model's text may hold U+2028 or \x1c, which json.dumps(ensure_ascii=False) writes as they are
        # and str.splitlines() would split on
        for number, line in enumerate(complete.decode("utf-8").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.results[row["key"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(self.path, number, "not a cache line {key, prompt, ...}; delete it to start over")

    def add(self, row: dict) -> None:
        self.results[row["key"]] = row
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- calls


async def _call(client: httpx.AsyncClient, s: Settings, messages: list[dict]) -> tuple[str, dict]:
    """One chat completion: (answer text, usage). Raises _Retryable, _Permanent or ConfigError."""
    body = {"model": s.model, "messages": messages, "temperature": s.temperature, "max_tokens": s.max_tokens}
    try:
        response = await asyncio.wait_for(client.post("chat/completions", json=body), s.timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise _Retryable(f"timeout after {s.timeout:g} s") from None
    except httpx.RequestError as e:
        raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
    status = response.status_code
    if status >= 400:
        message = _redact(f"HTTP {status}: {_error_message(response)}", s.api_key)
        if status in FATAL_STATUS:
            raise ConfigError(f"{s.base_url} answered {message} (check the base URL, the model name and the key "
                              "in $SYNTH_API_KEY / $OPENAI_API_KEY)")
        if status in RETRY_STATUS or status >= 500:
            raise _Retryable(message, _retry_after(response))
        raise _Permanent(message)
    try:
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retryable(_redact(f"unusable response: {response.text[:80]!r}", s.api_key)) from None
    if not isinstance(text, str):
        raise _Retryable(f"unusable response: content is {type(text).__name__}")
    if choice.get("finish_reason") == "content_filter":
        raise _Retryable("refused by the content filter")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return text, usage


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error)[:200]
    except (ValueError, AttributeError):
        return response.text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


async def _summarise(client, s: Settings, passage: Passage, stats: Stats) -> dict:
    """Attempts for one passage until a usable summary: a cache row, or a failure row (with "error")."""
    messages = build_messages(s, passage.text)
    reason = ""
    for attempt in range(1, s.max_attempts + 1):
        if attempt > 1:
            stats.retries += 1
        stats.calls += 1
        wait = 0.0
        try:
            text, usage = await _call(client, s, messages)
            stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            stats.completion_tokens += int(usage.get("completion_tokens") or 0)
            stats.usage_reported |= bool(usage)
            prompt = clean_summary(text)
            problem = summary_problem(prompt, s.max_prompt_chars)
            if problem is None:
                return {"key": passage.key, "prompt": prompt, "usage": usage, "book": passage.book,
                        "index": passage.index}
            reason = f"unusable summary: {problem}"
        except _Retryable as e:
            reason, wait = str(e), e.wait
        except _Permanent as e:
            reason = str(e)
            break
        if attempt < s.max_attempts:
            backoff = min(s.retry_cap, s.retry_base * 2 ** (attempt - 1)) * (0.5 + random.random())
            await asyncio.sleep(max(backoff, min(wait, s.retry_cap)))
    return {"key": passage.key, "book": passage.book, "index": passage.index, "attempts": attempt, "error": reason}


async def _run_all(todo: list[Passage], s: Settings, cache: ResultCache, stats: Stats, progress: bool) -> None:
    headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
    queue: asyncio.Queue = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)
    bar = tqdm(total=len(todo), unit="passage", desc="synthesize", disable=not progress, smoothing=0.05)
    consecutive = 0

    async def worker(client):
        nonlocal consecutive
        while not queue.empty():
            passage = queue.get_nowait()
            row = await _summarise(client, s, passage, stats)
            if "error" in row:
                stats.failures.append(row)
                consecutive += 1
                if consecutive >= s.max_consecutive_failures:
                    raise ConfigError(f"{consecutive} passages in a row failed (last: {row['error']}); the endpoint "
                                      f"looks down. Results so far are in {cache.path}: rerun to resume")
            else:
                cache.add(row)
                consecutive = 0
            bar.update(1)
            bar.set_postfix(retries=stats.retries, failed=len(stats.failures), refresh=False)

    async with httpx.AsyncClient(base_url=s.base_url.rstrip("/") + "/", headers=headers, limits=limits,
                                 timeout=httpx.Timeout(s.timeout)) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(min(s.concurrency, len(todo)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()


def synthesize(passages: list[Passage], s: Settings, cache_path, instruction: str = DEFAULT_INSTRUCTION,
               progress: bool = True) -> tuple[list[dict], Stats]:
    """Alpaca records for the passages that got a usable summary (in passage order), and the run's statistics
    (stats.failures lists the passages that did not, with the reason). Done passages come from the cache."""
    check_settings(s)
    for p in passages:
        p.key = request_key(s, build_messages(s, p.text))
    cache = ResultCache(cache_path)
    stats = Stats()
    todo, seen = [], set()
    for p in passages:
        if p.key in cache.results:
            stats.cached += 1
        elif p.key not in seen:  # a passage repeated word for word is asked once
            seen.add(p.key)
            todo.append(p)
    try:
        if todo:
            asyncio.run(_run_all(todo, s, cache, stats, progress))
    finally:
        cache.close()
    position = {p.key: i for i, p in reversed(list(enumerate(passages)))}
    stats.failures.sort(key=lambda row: position[row["key"]])
    records = [{"instruction": instruction, "input": cache.results[p.key]["prompt"], "output": p.text}
               for p in passages if p.key in cache.results]
    return records, stats


def report(passages: list[Passage], records: list[dict], stats: Stats, seconds: float) -> str:
    tokens = (f"tokens: {stats.prompt_tokens:,} prompt + {stats.completion_tokens:,} completion"
              if stats.usage_reported else "tokens: not reported by the API")
    return (f"passages: {len(passages)} ({stats.cached} from the cache, {len(records)} with a prompt, "
            f"{len(stats.failures)} failed) | calls: {stats.calls} | retries: {stats.retries} | {tokens} | "
            f"{seconds:.1f} s")
