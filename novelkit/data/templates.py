"""Chat templates: how a Sample (system, history, prompt, response) becomes token ids, and which of them are learned.

Every template is encoded segment by segment (each piece of text tokenised on its own, as Baichuan's and the seeds'
training code do), so a template's special markers never merge with the text around them. A template is a few
format strings; `tokenizer` instead uses the tokenizer's own Jinja chat template (Qwen2, Llama 3 …).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .formats import Sample

PROMPT, QUERY, RESPONSE, END = "prompt", "query", "response", "end"  # segment kinds; RESPONSE and END are learned


@dataclass(frozen=True)
class Template:
    name: str
    user: str  # wraps one user turn, contains {query}; the text after {query} opens the assistant's turn
    system: str = "{system}"  # wraps the system text (placed once, before the first turn)
    default_system: str = ""
    response_end: str | None = None  # literal that closes a response and is learned; None = tokenizer's EOS
    turn_sep: str = ""  # between a response's end and the next user turn (not learned)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # Baichuan-13B-Chat
        Template("baichuan", user="<reserved_102>{query}<reserved_103>"),
        # Baichuan2-*-Chat: <reserved_106>/<reserved_107> are token ids 195/196 in its tokenizer
        Template("baichuan2", user="<reserved_106>{query}<reserved_107>"),
        # Qwen2 and other ChatML models
        Template(
            "chatml",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            default_system="You are a helpful assistant.",
            user="<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
            response_end="<|im_end|>",
            turn_sep="\n",
        ),
        # the QLoRA seed's format
        Template("human_assistant", user="Human: \n{query}\n\nAssistant: \n", turn_sep="\n\n"),
        # the babyllama seed's format
        Template("babyllama", user="人类：{query}\n助手：", turn_sep="\n"),
        # no markers: prompt then response (continuation, pretraining-style data)
        Template("plain", user="{query}"),
    ]
}
TOKENIZER_TEMPLATE = "tokenizer"
TEMPLATE_NAMES = [*TEMPLATES, TOKENIZER_TEMPLATE]


def default_template_name(tokenizer, config=None) -> str:
    """The template a model was trained with, as far as its config and tokenizer tell."""
    model_type = getattr(config, "model_type", "")
    if model_type == "baichuan":
        # Baichuan 2 (NormHead) chat models use <reserved_106/107>; Baichuan 1 chat models <reserved_102/103>
        return "baichuan2" if getattr(config, "use_norm_head", False) else "baichuan"
    if getattr(tokenizer, "chat_template", None):
        return TOKENIZER_TEMPLATE
    if model_type in ("qwen2", "qwen3"):
        return "chatml"
    return "human_assistant"


def get_template(name: str) -> Template | str:
    if name == TOKENIZER_TEMPLATE:
        return name
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def _wrap(fmt: str, key: str, text: str, kind: str) -> list[tuple[str, str]]:
    """Split a format string around {key}: markers become PROMPT segments, the text itself a `kind` segment."""
    before, _, after = fmt.partition("{" + key + "}")
    return [(before, PROMPT), (text, kind), (after, PROMPT)]


def template_segments(template: Template, sample: Sample, with_response: bool = True) -> list[tuple[str, str]]:
    """(text, kind) pieces of a sample in order. Every assistant turn is RESPONSE (learned, as in Baichuan 2's own
    multi-turn fine-tuning); user turns are PROMPT, except the last query, marked QUERY so truncation can find it."""
    segments: list[tuple[str, str]] = []
    system = sample.system or template.default_system
    if system:
        segments += _wrap(template.system, "system", system, PROMPT)
    turns = [*sample.history, (sample.prompt, sample.response)]
    for i, (query, response) in enumerate(turns):
        last = i == len(turns) - 1
        if i > 0:
            segments.append((template.turn_sep, PROMPT))
        segments += _wrap(template.user, "query", query, QUERY if last else PROMPT)
        if last and not with_response:
            break
        segments.append((response, RESPONSE))
        segments.append((template.response_end or "", END))
    return [(text, kind) for text, kind in segments if text or kind == END]


def _encode_text(tokenizer, text: str) -> list[int]:
    """A marker such as <reserved_106> that is one vocabulary entry becomes that id, as the original chat code
    inserts it (encoding it as text would add a dummy-prefix piece with Baichuan 1's tokenizer)."""
    if text.startswith("<") and text.endswith(">"):
        token_id = tokenizer.convert_tokens_to_ids(text)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return [token_id]
    return tokenizer.encode(text, add_special_tokens=False)


def encode_segments(tokenizer, segments) -> list[tuple[list[int], str]]:
    """Token ids per segment. An END segment with no text is the tokenizer's EOS."""
    out = []
    for text, kind in segments:
        if kind == END and not text:
            out.append(([tokenizer.eos_token_id], END))
        else:
            out.append((_encode_text(tokenizer, text), kind))
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        out.insert(0, ([tokenizer.bos_token_id], PROMPT))
    return out


def _chat_messages(sample: Sample, with_response: bool) -> list[list[dict]]:
    """Messages for the tokenizer's chat template, growing one message at a time."""
    messages = [{"role": "system", "content": sample.system}] if sample.system else []
    for query, response in sample.history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    messages.append({"role": "user", "content": sample.prompt})
    if with_response:
        messages.append({"role": "assistant", "content": sample.response})
    return messages


def _encode_chat_template(tokenizer, sample: Sample, with_response: bool) -> list[tuple[list[int], str]]:
    """Segments from the tokenizer's chat template: each assistant message is the difference between the render
    with it and the render that stops at the generation prompt."""
    messages = _chat_messages(sample, with_response)

    def render(msgs, gen):
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    segments, done = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:i], gen=True)
        full = render(messages[: i + 1], gen=False)
        if full[: len(prefix)] != prefix:
            raise ValueError(f"chat template of {tokenizer.name_or_path} does not extend its generation prompt")
        segments.append((prefix[len(done):], PROMPT))
        segments.append((full[len(prefix):], RESPONSE))
        done = full
    if not with_response:
        prefix = render(messages, gen=True)
        segments.append((prefix[len(done):], PROMPT))
    return segments


def encode_sample(tokenizer, template, sample: Sample, with_response: bool = True) -> list[tuple[list[int], str]]:
    """(ids, kind) segments of one sample under a template (a Template or the name `tokenizer`)."""
    if template == TOKENIZER_TEMPLATE:
        return _encode_chat_template(tokenizer, sample, with_response)
    return encode_segments(tokenizer, template_segments(template, sample, with_response))


def encode_prompt(tokenizer, template, sample: Sample) -> list[int]:
    """Token ids to generate from: everything up to and including the assistant's opening marker."""
    return [i for ids, _ in encode_sample(tokenizer, template, sample, with_response=False) for i in ids]


def stop_token_ids(tokenizer, template) -> list[int]:
    """Token ids that end a generated response under this template."""
    ids = {tokenizer.eos_token_id}
    if isinstance(template, Template) and template.response_end:
        ids.update(_encode_text(tokenizer, template.response_end)[-1:])
    return sorted(i for i in ids if i is not None)
