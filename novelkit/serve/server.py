"""An OpenAI-compatible HTTP server for any of our checkpoints (base, base + LoRA adapter, merged).

    python -m novelkit.serve --model_path /models/Baichuan2-7B-Base --lora_model output/lora --port 8000

/v1/models, /v1/completions and /v1/chat/completions, streamed (server-sent events) or not; chat goes through the
model's chat template. Binds 127.0.0.1 unless --host says otherwise; with --api_key (or $NOVELKIT_API_KEY) every
request needs `Authorization: Bearer <key>`. Requests are batched continuously by one generation worker (up to
--max_batch at once, joining and leaving between decode steps).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..data.formats import Sample
from ..errors import exit_on_error
from ..generation.worker import Failed, Finished, GenerationRequest, GenerationWorker, Text
from .api_protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body, messages_to_sample


def create_app(worker: GenerationWorker, model_name: str, api_key: str = "") -> FastAPI:
    app = FastAPI(title="novelkit", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def check_key(request: Request):
        if api_key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           kind="authentication_error")

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return JSONResponse(error_body(f"{where}: {message}" if where else message, param=where or None),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "novelkit"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatCompletionRequest):
        sample = messages_to_sample(body.messages)
        return await respond(body, sample, chat=True, max_tokens=body.max_completion_tokens or body.max_tokens)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest):
        return await respond(body, Sample(prompt=body.text(), response=""), chat=False, max_tokens=body.max_tokens)

    async def respond(body, sample: Sample, chat: bool, max_tokens: int | None):
        request = GenerationRequest(sample, chat=chat, max_tokens=max_tokens, temperature=body.temperature,
                                    top_p=body.top_p, stop=body.stop_list(), seed=body.seed)
        events = worker.submit(request).events()
        first = await anext(events)  # errors found before generating (prompt too long) are plain 400s
        if isinstance(first, Failed):
            raise APIError(first.status, first.message, kind="invalid_request_error" if first.status == 400
                           else "server_error")
        shape = _Shape(chat, model_name, first.prompt_tokens)
        if body.stream:
            return StreamingResponse(_sse(shape, events, body.include_usage()), media_type="text/event-stream")
        pieces = []
        async for event in events:
            if isinstance(event, Text):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise APIError(event.status, event.message, kind="server_error")
            elif isinstance(event, Finished):
                return shape.whole("".join(pieces), event)

    return app


class _Shape:
    """Response bodies of one request: a chat completion or a text completion, whole or in chunks."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, done: Finished) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": self.usage(done.completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(self._chunk_kind), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict:
        return {**self._head(self._chunk_kind), "choices": [], "usage": self.usage(completion_tokens)}

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(shape: _Shape, events, include_usage: bool):
    """Server-sent events: chunks as text arrives, the finish reason, usage if asked for, then [DONE]. Leaving
    early (the client hung up) closes `events`, which cancels the generation."""
    try:
        if shape.chat:
            yield _data(shape.chunk(None, role=True))
        async for event in events:
            if isinstance(event, Text):
                yield _data(shape.chunk(event.text))
            elif isinstance(event, Failed):
                yield _data(error_body(event.message, "server_error"))
            elif isinstance(event, Finished):
                yield _data(shape.chunk(None, event.finish_reason))
                if include_usage:
                    yield _data(shape.usage_chunk(event.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="", help="model folder; empty = the adapter's base, else the default")
    p.add_argument("--lora_model", default="", help="PEFT adapter folder; empty = the model alone")
    p.add_argument("--template", default="", help="chat template; empty = the model's own")
    p.add_argument("--served_model_name", default="", help="the model id clients see; default: the folder name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed at start)")
    p.add_argument("--api_key", default="", help="required Bearer token; default $NOVELKIT_API_KEY, else none")
    p.add_argument("--max_tokens", type=int, default=512, help="when a request gives none")
    p.add_argument("--max_batch", type=int, default=16, help="requests decoded together (KV cache slots)")
    p.add_argument("--max_len", type=int, default=0, help="prompt + response tokens per request; 0 = the model's "
                   "context (the KV cache holds max_batch x max_len)")
    p.add_argument("--dtype", default="auto")
    return p.parse_args(argv)


@exit_on_error
def main(argv=None):
    import uvicorn

    from ..generation.batch import generation_kwargs
    from ..models.loading import adapter_base_path, load_model, load_tokenizer
    from ..data.templates import default_template_name, get_template

    args = parse_args(argv)
    api_key = args.api_key or os.environ.get("NOVELKIT_API_KEY", "")
    model_path = args.model_path or (adapter_base_path(args.lora_model) if args.lora_model else "")
    start = time.perf_counter()
    model = load_model(model_path, dtype=args.dtype, adapter=args.lora_model or None)
    tokenizer = load_tokenizer(model_path)
    print(f"[serve] model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    template_name = args.template or default_template_name(tokenizer, model.config)
    name = args.served_model_name or Path(args.lora_model or model_path or "default").name
    worker = GenerationWorker(model, tokenizer, get_template(template_name), default_max_tokens=args.max_tokens,
                              max_batch=args.max_batch, max_len=args.max_len or None)
    sampling = {k: v for k, v in generation_kwargs(model).items() if k != "max_new_tokens"}
    print(f"[serve] {name}: template {template_name}, sampling defaults {sampling}, API key "
          f"{'required' if api_key else 'not required'}", flush=True)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[serve] warning: listening on {args.host} with no API key", file=sys.stderr, flush=True)
    uvicorn.run(create_app(worker, name, api_key), host=args.host, port=args.port, log_level="info")
