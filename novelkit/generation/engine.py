"""One generation engine for prediction, evaluation, the server and the web demo.

    engine = Engine(model, tokenizer, max_batch=64, max_len=2048)
    done = engine.run([Request(prompt_ids, max_new_tokens=256, sampling=SamplingParams(), stop_ids=[2])])
    # or, continuous batching: engine.add(request) at any time, engine.step() until request.finished

A static KV cache of `max_batch` slots x `max_len` positions (engine_model.py); each request prefills into a free
slot and decodes one token per step at its own position, so requests join and leave between steps. On CUDA the
decode step of each (batch bucket, length bucket) is captured once as a CUDA graph and replayed: one launch per step
instead of hundreds of kernel launches from Python, which is what bounds `generate` at small batches. Sampling
(sampling.py, per-row settings) is part of the graph, and the step's inputs stay on the device, so a step costs the
host one replay and one read of the chosen tokens; and the host reads step n's tokens (streams them, checks stops)
while the device runs step n + 1, launched before them, so that the GPU does not wait for the host between steps. On
CUDA the model's decode step is also compiled with torch.compile (inductor) before capture (`compile=False` for a
model being trained): it fuses the dozens of small kernels per layer that calling the model's own modules costs;
batch and cache length are dynamic dimensions, so one compilation serves every bucket. A compilation failure logs
one line and the engine goes on uncompiled. A compiled engine also takes the weights as frozen (inference only):
q/k/v and gate/up projections run as one matrix product each (engine_model.fuse_linear_weights), and the top-p draw
needs no sort of the vocabulary (sampling.draw_nucleus; a rare miss is drawn again the sorting way, and the row's
next step, launched before the miss was seen, is decoded again). `warm_up()` compiles before the first request. On
CPU the same code runs eagerly (compiled only when asked).

Models the fast path cannot run (engine_model.fast_path_problem) go through transformers' `generate`, one request
at a time, behind the same API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import StoppingCriteria

from ..compile_cache import remember_compiled, step_key
from .engine_model import CachedModel, fast_path_problem, unwrap
from .sampling import Sampler, SamplingParams, hf_generate_kwargs

log = logging.getLogger(__name__)

PREFILL_TOKENS = 16384  # padded prompt tokens per prefill batch: bounds the activation memory of one prefill


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    ignore_eos: bool = False  # benchmarks: always make max_new_tokens
    on_text: Callable[[str], None] | None = None  # streaming: called with each piece of final text
    # filled in by the engine
    tokens: list[int] = field(default_factory=list)  # generated ids, a closing stop token included
    text: str | None = None  # the response (stop token / stop string cut off); None without a tokenizer
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def without_partial_character(text: str) -> str:
    """The text without a trailing incomplete multi-byte character: byte-fallback pieces of a character the tokens
    stopped inside (max_tokens reached, a stop token) decode to U+FFFD. A response never ends in half a character."""
    return text.rstrip("\ufffd")


class Detokenizer:
    """Text of the tokens so far, sent on as it becomes final: never half of a multi-byte character (byte-fallback
    pieces decode to U+FFFD until complete), never a possible start of a stop string. Reports a stop string."""

    def __init__(self, tokenizer, stop_strings, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> bool:
        """Adds a token; True when the text now holds a stop string (the text is cut before it)."""
        self.ids.append(token)
        return self._update(final=False)

    def close(self) -> str:
        self._update(final=True)
        return self.text

    def _update(self, final: bool) -> bool:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            text, final = text[:min(cuts)], True
        if final:
            text = without_partial_character(text)
        self.text = text
        end = len(text)
        if not final:
            end = len(without_partial_character(text))
            end -= max((k for s in self.stop_strings for k in range(1, len(s)) if text[:end].endswith(s[:k])),
                       default=0)
        if end > self.sent and self.on_text is not None:
            self.on_text(text[self.sent:end])
        self.sent = max(self.sent, end)
        return bool(cuts)


class _Sequence:
    """A request's state while it holds a slot."""

    def __init__(self, request: Request, slot: int, tokenizer):
        self.request, self.slot = request, slot
        self.stop_ids = set() if request.ignore_eos else set(request.stop_ids)
        self.ahead = 0  # decode steps launched for it whose tokens the host has not read yet
        streaming = request.on_text is not None or request.stop_strings
        self.detokenizer = Detokenizer(tokenizer, request.stop_strings, request.on_text) \
            if streaming and tokenizer is not None else None

    @property
    def position(self) -> int:
        """Where the last generated token goes in the cache."""
        return len(self.request.prompt) + len(self.request.tokens) - 1

    @property
    def needs_more(self) -> bool:
        """Whether a step launched now could give it a token it uses (else it ends by length before)."""
        return len(self.request.tokens) + self.ahead < self.request.max_new_tokens

    def add(self, token: int, tokenizer) -> bool:
        """Appends a token; True when the request is finished."""
        r = self.request
        r.tokens.append(token)
        reason = None
        if token in self.stop_ids:
            reason = "stop"
        elif self.detokenizer is not None and self.detokenizer.add(token):
            reason = "stop"
        elif len(r.tokens) >= r.max_new_tokens:
            reason = "length"
        if reason:
            self.finish(reason, tokenizer)
        return reason is not None

    def finish(self, reason: str, tokenizer):
        r = self.request
        if self.detokenizer is not None:
            r.text = self.detokenizer.close()
        elif tokenizer is not None:
            ids = r.tokens[:-1] if r.tokens and r.tokens[-1] in self.stop_ids else r.tokens
            r.text = without_partial_character(
                tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        r.finish_reason = reason


@dataclass
class _Launched:
    """A decode step sent to the device whose tokens the host has not read yet."""
    seqs: dict  # slot -> the _Sequence it decodes for
    chosen: torch.Tensor  # host copy of the chosen tokens (-1: a missed draw), complete once `ready` is
    ready: torch.cuda.Event | None
    logits: torch.Tensor | None  # a copy of the step's logits where a draw can miss (the graph's own are reused)


def length_bucket(longest: int, limit: int) -> int:
    """How far a decode step's attention reads the cache (each length has its own CUDA graph): `longest` rounded up
    to a multiple of 64, or of 1/16 of the next power of two past 1,024. Few graphs (32 up to 4,096), and fewer
    than 64 positions or 1/8 read in vain: a 7B model without GQA at batch 64 reads 32 MB of cache per position."""
    power = 1 << max(longest - 1, 1).bit_length()
    step = max(64, power // 16)
    return min(-(-longest // step) * step, limit)


def _bucket(n: int, limit: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, limit)


def fit_cache_in_memory(model, max_batch: int, max_len: int, spare: int = 0, share: float = 0.9) -> int:
    """The number of slots (at most max_batch) whose KV cache fits in `share` of the GPU's free memory: fewer, with
    a note, when it does not all fit; a ConfigError naming the flags when not even one request fits."""
    from ..errors import ConfigError

    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weight = model.get_input_embeddings().weight
    per_slot = 2 * config.num_hidden_layers * kv_heads * head_dim * max_len * weight.element_size()
    free = torch.cuda.mem_get_info(weight.device)[0] * share
    fit = int(free // per_slot) - spare
    if fit < 1:
        raise ConfigError(f"the KV cache for one request of {max_len} tokens needs {per_slot / 2**30:.1f} GiB and "
                          f"{free / share / 2**30:.1f} GiB of GPU memory are free: lower --max_len")
    if fit < max_batch:
        print(f"[engine] KV cache: {fit} slots of {max_len} tokens fit in the free GPU memory, not {max_batch}; "
              f"lower --max_len to serve more requests at once", flush=True)
    return min(fit, max_batch)


def engine_step_key(model, frozen: bool = True) -> str:
    """compile_cache's key of the decode step an engine on `model` compiles."""
    inner = unwrap(model)
    weight = inner.get_input_embeddings().weight
    return step_key(inner.config, weight.dtype, weight.device, frozen)


class Engine:
    """Continuous batching over a static KV cache (see the module docstring)."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 64, max_len: int | None = None,
                 cuda_graphs: bool | None = None, compile: bool | None = None, frozen: bool | None = None):
        from ..models.loading import max_positions

        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.max_len = max_len or max_positions(unwrap(model).config)  # RoPE and ALiBi extend past the config
        self.pending: list[Request] = []
        self.active: dict[int, _Sequence] = {}
        self._needs = None  # the sampler's needs for the active requests
        self.problem = fast_path_problem(model)
        if self.problem:
            log.warning("generation engine: %s, so generating through transformers' generate, one request at a "
                        "time", self.problem)
            print(f"[engine] fast path unavailable ({self.problem}): using transformers' generate", flush=True)
            return
        inner = unwrap(model)
        on_cuda = inner.get_input_embeddings().weight.device.type == "cuda"
        # bitsandbytes layers stay eager: their kernels are not known to be graph-safe
        quantized = any("bitsandbytes" in type(m).__module__ for m in inner.modules())
        self.cuda_graphs = on_cuda and not quantized if cuda_graphs is None else cuda_graphs and on_cuda
        # torch.compile by default wherever CUDA graphs run; a model being trained passes compile=False (the
        # evaluator would pay the compilation at every evaluation)
        self.compile = self.cuda_graphs if compile is None else compile
        if on_cuda:
            self.max_batch = max_batch = fit_cache_in_memory(inner, max_batch, self.max_len, spare=int(self.compile))
        # a compiled step keeps batch >= 2 (a batch dimension of 1 would be compiled separately): one spare slot
        self.slots = max(max_batch, 2) if self.compile else max_batch
        # frozen weights (q/k/v and gate/up fused, NormHead's norms computed once; engine_model.CachedModel): for
        # inference only, so by default wherever CUDA graphs run; a model being trained passes frozen=False
        frozen = self.cuda_graphs or self.compile if frozen is None else frozen
        self.cached = CachedModel(model, self.slots, self.max_len, frozen=frozen)
        vocab = inner.get_input_embeddings().weight.shape[0]
        device = self.cached.device
        self.sampler = Sampler(self.slots, vocab, device, compile=self.compile)
        self.redraws = 0  # rows whose sorting-free draw missed and were drawn again (sampling.py)
        self.compiled = self.cached.compiled_decode() if self.compile else None
        self.compile_key = engine_step_key(model, frozen) if self.compile else None
        # (batch, length, sampling mode, penalty) -> (graph, its outputs: chosen tokens and logits)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.last_graph = None  # the key of the graph replayed last
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.token_buffer = torch.zeros(self.slots, dtype=torch.long, device=device)
        self.position_buffer = torch.zeros(self.slots, dtype=torch.long, device=device)
        # step n's chosen tokens and logits, kept while step n + 1 runs: two of each, used in turn
        pin = device.type == "cuda"
        self.host_chosen = [torch.zeros(self.slots, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.kept_logits: list[torch.Tensor | None] = [None, None]
        self.turn = 0
        self.in_flight: _Launched | None = None

    # --- the API ------------------------------------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_new_tokens: int):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_len:
            raise ValueError(f"the prompt's {prompt_tokens} tokens + {max_new_tokens} new tokens are over the "
                             f"engine's maximum length of {self.max_len} tokens")

    def add(self, request: Request) -> Request:
        self.check(len(request.prompt), request.max_new_tokens)
        if not request.prompt:
            raise ValueError("empty prompt")
        self.pending.append(request)
        return request

    def cancel(self, request: Request):
        """Ends the request at the next step (its slot is freed then)."""
        request.cancelled = True

    def drop_all(self):
        """Forgets every pending and active request (after a step raised; their slots are free again)."""
        self.pending.clear()
        self.in_flight = None
        for slot in list(self.active):
            self._release(slot)

    def warm_up(self):
        """Compiles the decode step before the first request would (a minute or two on a GPU, once per process):
        one short request each greedy, with top-p and with top-k sampling. Nothing to do when uncompiled."""
        if self.compiled is None:
            return
        print("[engine] compiling the decode step (once; a minute or two on a GPU, seconds from the compile cache)",
              flush=True)
        took = []
        for name, params in (("greedy", SamplingParams()), ("top-p", SamplingParams(do_sample=True, top_p=0.9)),
                             ("top-k", SamplingParams(do_sample=True, top_k=50, top_p=0.9))):
            start = time.perf_counter()
            self.run([Request([1, 2], 2, params, ignore_eos=True)])
            took.append(f"{name} {time.perf_counter() - start:.1f} s")
        print(f"[engine] decode step ready: {', '.join(took)}", flush=True)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.active)

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Adds the requests and steps until all are finished."""
        for r in requests:
            self.add(r)
        while any(not r.finished for r in requests):
            self.step()
        return list(requests)

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admits waiting requests into free slots (prefill), then one decode step for every active request.
        Returns the requests finished during this step."""
        if self.problem:
            return self._fallback_step()
        finished = self._drop_cancelled()
        finished += self._admit()
        if self.active:
            finished += self._decode()
        return finished

    # --- scheduling ---------------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> list[Request]:
        done = []
        for r in [r for r in self.pending if r.cancelled]:
            self.pending.remove(r)
            r.finish_reason = "cancelled"
            done.append(r)
        for slot, seq in list(self.active.items()):
            if seq.request.cancelled:
                seq.finish("cancelled", self.tokenizer)
                done.append(self._release(slot))
        return done

    def _release(self, slot: int) -> Request:
        seq = self.active.pop(slot)
        self.sampler.params[slot] = None
        self._needs = None
        return seq.request

    def _admit(self) -> list[Request]:
        free = [s for s in range(self.max_batch) if s not in self.active]
        done = []
        while free and self.pending:
            take, width = [], 0
            while self.pending and len(take) < len(free):
                wider = max(width, len(self.pending[0].prompt))
                if take and wider * (len(take) + 1) > PREFILL_TOKENS:
                    break
                take.append(self.pending.pop(0))
                width = wider
            slots, free = free[:len(take)], free[len(take):]
            logits = self.cached.prefill([r.prompt for r in take], slots)
            for r, slot in zip(take, slots):
                self.sampler.set_row(slot, r.sampling, r.prompt)
            self._needs = None
            index = torch.tensor(slots, device=self.cached.device)
            chosen, logits = self.sampler.choose(logits, index, *self.sampler.needs(slots))
            chosen = self._redraw_missed(chosen.tolist(), logits, list(enumerate(slots)), in_buffer=False)
            # the decode step's inputs live on the device: the first token and where it goes
            self.token_buffer[index] = torch.tensor(chosen, device=self.cached.device)
            self.position_buffer[index] = torch.tensor([len(r.prompt) for r in take], device=self.cached.device)
            for r, slot, token in zip(take, slots, chosen):
                seq = self.active[slot] = _Sequence(r, slot, self.tokenizer)
                if seq.add(token, self.tokenizer):
                    done.append(self._release(slot))
                    free.append(slot)
            free.sort()
        return done

    def _decode(self) -> list[Request]:
        """Launches the next decode step, then reads the previous one's tokens while the device runs it."""
        live = {slot: seq for slot, seq in self.active.items() if seq.needs_more}
        launched = self._launch(live) if live else None
        done = self._collect(self.in_flight, launched) if self.in_flight is not None else []
        self.in_flight = launched
        return done

    def _launch(self, live: dict) -> _Launched:
        """One decode step for the `live` sequences, sent to the device without waiting for it."""
        batch = max(live) + 1
        if self.compiled is not None:
            batch = max(batch, 2)
        longest = max(seq.position + seq.ahead for seq in live.values()) + 1  # ahead: steps not read yet
        if self._needs is None:  # kept while the same requests run
            self._needs = self.sampler.needs(list(self.active))
        mode, penalty, seeded = self._needs
        if self.cuda_graphs and not seeded:
            length = length_bucket(longest, self.max_len)
            chosen, logits = self._replay(_bucket(batch, self.slots), length, mode, penalty)
        else:  # CPU, or a row with its own generator (its draw is not capturable)
            chosen, logits = self._decode_step(batch, longest, mode, penalty, seeded)
        turn, self.turn = self.turn, 1 - self.turn
        host = self.host_chosen[turn][:len(chosen)]
        host.copy_(chosen, non_blocking=True)
        kept = None
        if mode in ("nucleus", "nucleus_top_k"):  # the draws that can miss: keep their logits for `redraw`
            if self.kept_logits[turn] is None or self.kept_logits[turn].dtype != logits.dtype:
                self.kept_logits[turn] = torch.empty(self.slots, logits.shape[-1], dtype=logits.dtype,
                                                     device=logits.device)
            kept = self.kept_logits[turn][:len(logits)]
            kept.copy_(logits)
        ready = None
        if host.is_pinned():
            ready = torch.cuda.Event()
            ready.record()
        for seq in live.values():
            seq.ahead += 1
        return _Launched(dict(live), host, ready, kept)

    def _collect(self, step: _Launched, following: _Launched | None) -> list[Request]:
        """Adds a launched step's tokens to their sequences (those still active). A missed draw (-1) is drawn again
        from the step's kept logits. The step launched after it (`following`) has already decoded that row from a
        stand-in token: the row's result there is dropped, and the row decodes its redrawn token next (its
        repetition marks set again from its tokens, as `following` marked a token of its own)."""
        if step.ready is not None:
            step.ready.synchronize()
        chosen = step.chosen.tolist()
        mine = [(slot, seq) for slot, seq in step.seqs.items() if self.active.get(slot) is seq]
        missed = [(slot, seq) for slot, seq in mine if chosen[slot] < 0]
        for slot, seq in missed:
            self.sampler.reset_seen(slot, seq.request.prompt, seq.request.tokens)
        chosen = self._redraw_missed(chosen, step.logits, [(slot, slot) for slot, _ in missed], in_buffer=True)
        done = []
        for slot, seq in mine:
            seq.ahead -= 1
            if seq.add(chosen[slot], self.tokenizer):
                done.append(self._release(slot))
            elif following is not None and following.seqs.get(slot) is seq and (slot, seq) in missed:
                del following.seqs[slot]
                seq.ahead -= 1
        redone = [slot for slot, seq in missed if self.active.get(slot) is seq]
        if redone:  # where each redrawn token goes (`following` moved the row on)
            index = torch.tensor(redone, device=self.cached.device)
            self.position_buffer[index] = torch.tensor([self.active[s].position for s in redone],
                                                       device=self.cached.device)
        return done

    def _redraw_missed(self, chosen: list[int], logits, pairs, in_buffer: bool) -> list[int]:
        """`chosen` with the rows whose sorting-free draw missed (-1) drawn again the sorting way. pairs: (row of
        `chosen` and `logits`, its slot); in_buffer: also write the new tokens into the device-side token buffer."""
        missed = [(row, slot) for row, slot in pairs if chosen[row] < 0]
        if not missed:
            return chosen
        self.redraws += len(missed)
        rows, slots = [m[0] for m in missed], [m[1] for m in missed]
        tokens = self.sampler.redraw(logits[torch.tensor(rows, device=logits.device)], slots)
        if in_buffer:
            self.token_buffer[torch.tensor(slots, device=self.cached.device)] = tokens
        chosen = list(chosen)
        for row, token in zip(rows, tokens.tolist()):
            chosen[row] = token
        return chosen

    def _decode_step(self, batch: int, length: int, mode: str | None, penalty: bool, seeded: bool = False):
        """One token for slots 0..batch-1 from the device-side token and position buffers, which it advances
        (free slots in the range compute garbage that nothing reads). Returns the chosen tokens (device; -1 for
        a missed draw, see _collect) and the logits they were drawn from."""
        tokens, positions = self.token_buffer[:batch], self.position_buffer[:batch]
        logits = self._logits(tokens, positions, length)
        chosen, logits = self.sampler.choose(logits, slice(0, batch), mode, penalty, seeded,
                                             compiled=self.compiled is not None)
        # a missed draw (-1) goes in as token 0, a stand-in: the next step may be launched before the host draws it
        # again (_collect), which then drops that step's result for the row
        tokens.copy_(chosen.clamp(min=0))
        positions.copy_((positions + 1).clamp(max=self.max_len - 1))
        return chosen, logits

    def _logits(self, tokens, positions, length):
        if self.compiled is not None:
            capturing = self.cuda_graphs and torch.cuda.is_current_stream_capturing()
            try:
                logits = self.compiled(tokens, positions, length)
                if self.compile_key is not None:  # compiled once: its kernels are now in the compile cache
                    remember_compiled(self.compile_key)
                    self.compile_key = None
                return logits
            except Exception as error:  # compilation must never break generation
                if capturing:
                    raise  # _replay falls back and captures again
                self._compile_failed(error)
        return self.cached.decode(tokens, positions, length)

    def _compile_failed(self, error):
        self.compiled = None
        log.warning("generation engine: torch.compile failed (%s: %s), decoding uncompiled", type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "")
        print(f"[engine] torch.compile failed ({type(error).__name__}): decoding uncompiled", flush=True)

    def _replay(self, batch: int, length: int, mode: str | None, penalty: bool):
        key = (batch, length, mode, penalty)
        if key not in self.graphs:
            start = time.perf_counter()
            try:
                self._capture(key)
            except Exception as error:
                if self.compiled is None:
                    raise
                self._compile_failed(error)
                self.graphs.clear()  # graphs captured with the compiled step are fine, but keep one kind
                self._capture(key)
            took = time.perf_counter() - start
            if took > 2:  # more than a capture (a compilation, or the kernels' first use): say where a pause came from
                print(f"[engine] decode graph for batch {batch}, length {length}, {mode or 'greedy'}: {took:.1f} s",
                      flush=True)
        graph, out = self.graphs[key]
        graph.replay()
        self.last_graph = key
        return out

    def _capture(self, key):
        batch, length, mode, penalty = key
        # The warm-up runs the step for real (kernel selection, lazy init): put back what it advanced. Its K/V
        # writes are the ones the replay makes again.
        saved = (self.token_buffer.clone(), self.position_buffer.clone(), self.sampler.seen[:batch].clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode_step(batch, length, mode, penalty)
        torch.cuda.current_stream().wait_stream(stream)
        self.token_buffer.copy_(saved[0])
        self.position_buffer.copy_(saved[1])
        self.sampler.seen[:batch].copy_(saved[2])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = self._decode_step(batch, length, mode, penalty)
        self.graphs[key] = (graph, out)

    # --- fallback: transformers' generate -----------------------------------------------------------------------
    def _fallback_step(self) -> list[Request]:
        done = [r for r in self.pending if r.cancelled]
        for r in done:
            self.pending.remove(r)
            r.finish_reason = "cancelled"
        if not self.pending:
            return done
        r = self.pending.pop(0)
        _generate_one(self.model, self.tokenizer, r)
        return done + [r]



class _Halt(StoppingCriteria):
    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def _generate_one(model, tokenizer, r: Request):
    """One request through `generate`, tokens fed to the same bookkeeping as the fast path."""
    from transformers import StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    seq = _Sequence(r, 0, tokenizer)

    class Feed(BaseStreamer):
        prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                if not r.finished:
                    seq.add(token, tokenizer)

        def end(self):
            pass

    s = r.sampling
    gen = hf_generate_kwargs(dict(max_new_tokens=r.max_new_tokens, do_sample=s.do_sample,
                                  repetition_penalty=s.repetition_penalty,
                                  encoder_repetition_penalty=s.encoder_repetition_penalty,
                                  penalize_prompt=s.penalize_prompt), len(r.prompt))
    if s.do_sample:
        gen.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    if s.seed is not None:
        torch.manual_seed(s.seed)
    device = next(model.parameters()).device
    ids = torch.tensor([r.prompt], device=device)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=list(seq.stop_ids) or None,
                   pad_token_id=pad, streamer=Feed(),
                   stopping_criteria=StoppingCriteriaList([_Halt(lambda: r.finished or r.cancelled)]), **gen)
    if not r.finished:
        seq.finish("cancelled" if r.cancelled else "length", tokenizer)
