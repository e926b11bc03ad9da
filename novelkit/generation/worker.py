"""One generation thread that serves queued requests together, streaming text as it is produced.

The server submits a request and reads its events (Started, Text…, then Finished or Failed). Everything that touches
the model or the tokenizer runs on the worker thread, so neither needs to be thread-safe; that thread runs the
engine (engine.py) with continuous batching: up to `max_batch` requests decode together, joining and leaving
between steps. `stream_generate` is the one-request form the web demo and the interactive mode use.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from dataclasses import dataclass, field

from ..data.formats import Sample
from ..data.templates import encode_prompt, get_template, stop_token_ids
from ..models.loading import max_positions
from .batch import generation_kwargs
from .engine import Engine, Request
from .sampling import resolve_sampling

PLAIN = get_template("plain")  # completions: the prompt text as it is


@dataclass
class GenerationRequest:
    sample: Sample  # chat: system, history and the last user message; completions: prompt only
    chat: bool = True  # False: no chat template (raw text completion)
    max_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy; None with top_p None = the model's generation config
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Text:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass
class Failed:
    status: int  # 400: the request cannot be served (too long); 500: generation raised
    message: str


class RequestError(ValueError):
    """A request this model cannot serve, e.g. longer than its context."""


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "encoder_repetition_penalty")


def engine_for(model, tokenizer) -> Engine:
    """One single-slot engine per model, kept (its KV cache and CUDA graphs) for the next call."""
    engine = _ENGINES.get(model)
    if engine is None or engine.tokenizer is not tokenizer:
        engine = _ENGINES[model] = Engine(model, tokenizer, max_batch=1)
    return engine


def stream_generate(model, tokenizer, prompt_ids: list[int], *, stop_ids, stop_strings=(), on_text,
                    cancelled=lambda: False, seed=None, **gen_kwargs) -> tuple[str, int]:
    """Generate from one prompt through the engine, calling on_text(piece) as text becomes final. Returns
    (finish_reason, tokens generated): "stop" when a stop token or stop string ended it, else "length"."""
    engine = engine_for(model, tokenizer)
    params = resolve_sampling(model, seed=seed, **{k: gen_kwargs.get(k) for k in SAMPLING_KEYS})
    max_new = gen_kwargs.get("max_new_tokens") or 512
    r = engine.add(Request(list(prompt_ids), max_new, params, stop_ids=list(stop_ids), stop_strings=list(stop_strings),
                           on_text=on_text))
    while not r.finished:
        if cancelled():
            engine.cancel(r)
        engine.step()
    return ("stop" if r.finish_reason == "stop" else "length"), len(r.tokens)


class Job:
    """One submitted request: the worker emits events from its thread, the server awaits them on its loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def emit(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the server's loop is gone (shutting down)
            self.cancelled.set()

    async def events(self):
        """Events until Finished or Failed; leaving early (client gone) cancels the generation."""
        try:
            while True:
                event = await self._events.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            self.cancelled.set()


class GenerationWorker:
    """A queue of jobs and the thread that serves them: continuous batching over the engine, so requests join
    (prefill into a free slot) and leave (finished, stopped or cancelled) between decode steps."""

    def __init__(self, model, tokenizer, template, default_max_tokens: int = 512, max_batch: int = 16,
                 max_len: int | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.default_max_tokens = default_max_tokens
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_len=max_len or max_positions(model.config))
        self.context = self.engine.max_len
        self._jobs: queue.Queue = queue.Queue()
        self._running: dict[int, tuple[Job, Request]] = {}
        threading.Thread(target=self._run, name="generation", daemon=True).start()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        try:  # requests wait in the queue meanwhile
            self.engine.warm_up()
        except Exception as e:  # the first request will meet the problem and fail alone
            print(f"[server] engine warm-up failed: {type(e).__name__}: {e}", flush=True)
        while True:
            if not self.engine.busy:  # idle: wait for work
                self._start(self._jobs.get())
            while not self._jobs.empty():
                self._start(self._jobs.get_nowait())
            for job, request in self._running.values():
                if job.cancelled.is_set():
                    self.engine.cancel(request)
            try:
                finished = self.engine.step()
            except Exception as e:  # a failed step must not take the server down: fail what was running
                for job, _ in self._running.values():
                    job.emit(Failed(500, f"generation failed: {type(e).__name__}: {e}"))
                self._running.clear()
                self.engine.drop_all()
                continue
            for request in finished:
                job, _ = self._running.pop(id(request))
                if request.finish_reason != "cancelled":
                    job.emit(Finished(request.finish_reason, len(request.tokens)))

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            request = self._request(job)
            self.engine.add(request)
        except (RequestError, ValueError) as e:
            job.emit(Failed(400, str(e)))
            return
        except Exception as e:
            job.emit(Failed(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        job.emit(Started(len(request.prompt)))
        self._running[id(request)] = (job, request)

    def _max_new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        room = self.context - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt is {prompt_tokens} tokens; the model's context is {self.context}")
        if requested is None:
            return min(self.default_max_tokens, room)
        if requested > room:
            raise RequestError(f"max_tokens {requested} + the prompt's {prompt_tokens} tokens is over the model's "
                               f"context of {self.context} tokens")
        return requested

    def _request(self, job: Job) -> Request:
        r = job.request
        template = self.template if r.chat else PLAIN
        prompt = encode_prompt(self.tokenizer, template, r.sample)
        max_new_tokens = self._max_new_tokens(len(prompt), r.max_tokens)
        sampling = None if r.temperature is None and r.top_p is None else r.temperature != 0
        gen = generation_kwargs(self.model, do_sample=sampling, temperature=r.temperature or None, top_p=r.top_p)
        params = resolve_sampling(self.model, seed=r.seed, **{k: gen.get(k) for k in SAMPLING_KEYS})
        return Request(prompt, max_new_tokens, params, stop_ids=stop_token_ids(self.tokenizer, template),
                       stop_strings=list(r.stop), on_text=lambda text: job.emit(Text(text)))
