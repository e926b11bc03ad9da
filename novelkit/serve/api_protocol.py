"""The OpenAI API's request bodies (the fields this server honours), its error shape, and chat messages → Sample."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.formats import Sample

# Options that change what the answer looks like: better a clear 400 than an answer that silently ignores them.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "tool_choice", "function_call")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, presence_penalty …) are accepted, unused

    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError(f"only n=1 is supported (one completion per request), got {n}")
        return n

    @model_validator(mode="after")
    def _no_unsupported(self):
        given = [k for k in UNSUPPORTED if (self.model_extra or {}).get(k) not in (None, False, [], 0)]
        if given:
            raise ValueError(f"not supported by this server: {', '.join(given)}")
        return self

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients send this instead of max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"give one prompt (a string); got a list of {len(prompt)}")
        return prompt

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def messages_to_sample(messages: list[ChatMessage]) -> Sample:
    """An optional system message first, then user/assistant turns in alternation ending with a user turn."""
    system, turns = "", []
    for i, m in enumerate(messages):
        text = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        if m.role in ("system", "developer"):
            if i != 0:
                raise APIError(400, f"messages[{i}]: a {m.role} message can only come first", f"messages.{i}.role")
            system = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if m.role != expected:
            raise APIError(400, f"messages[{i}]: expected a {expected} message (user and assistant turns alternate)",
                           f"messages.{i}.role")
        turns.append(text)
    if len(turns) % 2 == 0:
        raise APIError(400, "the last message must be a user message", "messages")
    return Sample(prompt=turns[-1], response="", system=system, history=list(zip(turns[0:-1:2], turns[1:-1:2])))
