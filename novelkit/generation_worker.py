"""One generation thread that serves queued requests in turn, streaming text as it is produced.

The server submits a request and reads its events (Started, Text…, then Finished or Failed). Everything that touches
the model or the tokenizer runs on the worker thread, one request at a time, so neither needs to be thread-safe.
`stream_generate` is the part a faster engine (continuous batching) replaces.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .formats import Sample
from .generation import generation_kwargs
from .loading import max_positions
from .templates import encode_prompt, get_template, stop_token_ids

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


class _TextStreamer(BaseStreamer):
    """Receives token ids from generate; sends text that is final: not half of a multi-byte character, not a
    possible start of a stop string. Ends generation at a stop token or stop string."""

    def __init__(self, tokenizer, stop_ids, stop_strings, on_text):
        self.tokenizer, self.stop_ids, self.on_text = tokenizer, set(stop_ids), on_text
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already sent
        self.stopped = False
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate passes the prompt first
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stopped:
                return
            self.ids.append(token)
            self.stopped = token in self.stop_ids
        self._flush(final=self.stopped)

    def end(self):
        self._flush(final=True)

    def _flush(self, final: bool):
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            text, self.stopped, final = text[: min(cuts)], True, True
        end = len(text)
        if not final:
            end = len(text.rstrip("\ufffd"))  # byte-fallback pieces of a character not yet complete
            end -= max((k for s in self.stop_strings for k in range(1, len(s)) if text[:end].endswith(s[:k])),
                       default=0)
        if end > self.sent:
            self.on_text(text[self.sent:end])
            self.sent = end


class _Halt(StoppingCriteria):
    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def stream_generate(model, tokenizer, prompt_ids: list[int], *, stop_ids, stop_strings=(), on_text,
                    cancelled=lambda: False, **gen_kwargs) -> tuple[str, int]:
    """Generate from one prompt, calling on_text(piece) as text becomes final. Returns (finish_reason, tokens
    generated): "stop" when a stop token or stop string ended it, else "length"."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    streamer = _TextStreamer(tokenizer, stop_ids, stop_strings, on_text)
    halt = _Halt(lambda: streamer.stopped or cancelled())
    model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), eos_token_id=list(stop_ids),
                   pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                   stopping_criteria=StoppingCriteriaList([halt]), **gen_kwargs)
    return ("stop" if streamer.stopped else "length"), len(streamer.ids)


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
    """A queue of jobs and the thread that runs them one at a time."""

    def __init__(self, model, tokenizer, template, default_max_tokens: int = 512):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.default_max_tokens = default_max_tokens
        self.context = max_positions(model.config)
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="generation", daemon=True).start()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job.cancelled.is_set():
                continue
            try:
                self._generate(job)
            except RequestError as e:
                job.emit(Failed(400, str(e)))
            except Exception as e:  # a failed generation must not take the server down
                job.emit(Failed(500, f"generation failed: {type(e).__name__}: {e}"))

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

    def _generate(self, job: Job) -> None:
        r = job.request
        template = self.template if r.chat else PLAIN
        prompt = encode_prompt(self.tokenizer, template, r.sample)
        max_new_tokens = self._max_new_tokens(len(prompt), r.max_tokens)
        job.emit(Started(len(prompt)))
        sampling = None if r.temperature is None and r.top_p is None else r.temperature != 0
        gen = generation_kwargs(self.model, max_new_tokens=max_new_tokens, do_sample=sampling,
                                temperature=r.temperature or None, top_p=r.top_p)
        if r.seed is not None:
            torch.manual_seed(r.seed)
        finish, tokens = stream_generate(self.model, self.tokenizer, prompt,
                                         stop_ids=stop_token_ids(self.tokenizer, template), stop_strings=r.stop,
                                         on_text=lambda text: job.emit(Text(text)), cancelled=job.cancelled.is_set,
                                         **gen)
        job.emit(Finished(finish, tokens))
