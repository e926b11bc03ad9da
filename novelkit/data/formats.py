"""Dataset formats (alpaca, sharegpt, openai, CSL, LCSTS, MSRA NER, novels, ...) turned into one Sample shape.

The format is detected from the first record's field names, or named explicitly (`--format` overrides
detection, e.g. to read a {title, text} TSV as csl_title2abstract when its path does not mention csl).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from novelkit.data.readers import Record, RecordStream, report_skipped
from novelkit.errors import ConfigError, DataError

CSL_TITLE2ABSTRACT_PROMPT = "根据标题生成中文学位论文摘要："
CSL_ABSTRACT2TITLE_PROMPT = "为下面的论文摘要写一个标题："
LCSTS_PROMPT = "为下面的新闻写一个标题："


@dataclass
class Sample:
    prompt: str
    response: str
    system: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (user, assistant) turns, oldest first
    meta: dict = field(default_factory=dict)  # path, line; name for novels; source: the document inside the prompt

    @property
    def source(self) -> str:
        """The text the prompt asks about (an abstract, a news text, an alpaca `input`), without the instruction
        around it; the whole prompt where the record has no such part. What a copying baseline copies."""
        return self.meta.get("source", self.prompt)


class Samples(list):
    """The samples of one file, with the format used and how many bad records skip_bad left out."""

    def __init__(self, samples=(), fmt: str = "", skipped: int = 0):
        super().__init__(samples)
        self.format = fmt
        self.skipped = skipped


# ---------------------------------------------------------------- field access


def _error(record: Record, message: str) -> DataError:
    return DataError(record.path, record.line, message)


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _string(record: Record, name: str, data: dict | None = None, where: str = "") -> str:
    """Required string field `name` of `data` (the record's data by default)."""
    data = record.data if data is None else data
    if name not in data:
        raise _error(record, f"{where}missing field '{name}'")
    value = data[name]
    if not isinstance(value, str):
        raise _error(record, f"{where}field '{name}' must be a string, got {_type_name(value)}")
    return value


def _optional_string(record: Record, name: str) -> str:
    """Optional string field; absent or null reads as ""."""
    if record.data.get(name) is None:
        return ""
    return _string(record, name)


def _list(record: Record, name: str) -> list:
    if name not in record.data:
        raise _error(record, f"missing field '{name}'")
    value = record.data[name]
    if not isinstance(value, list):
        raise _error(record, f"field '{name}' must be a list, got {_type_name(value)}")
    return value


def _meta(record: Record, **extra) -> dict:
    return {"path": record.path, "line": record.line, **extra}


# ---------------------------------------------------------------- converters


def _text(record: Record) -> Sample:
    return Sample(prompt="", response=_string(record, "text"), meta=_meta(record))


def _novel(record: Record) -> Sample:
    name = _string(record, "name")
    return Sample(prompt="", response=_string(record, "text"), meta=_meta(record, name=name))


def _alpaca(record: Record) -> Sample:
    instruction = _string(record, "instruction")
    extra_input = _optional_string(record, "input")
    prompt = instruction + ("\n" + extra_input if extra_input else "")
    return Sample(
        prompt=prompt,
        response=_string(record, "output"),
        system=_optional_string(record, "system"),
        history=_alpaca_history(record),
        meta=_meta(record, **({"source": extra_input} if extra_input else {})),
    )


def _alpaca_history(record: Record) -> list[tuple[str, str]]:
    if record.data.get("history") is None:
        return []
    history = []
    for i, pair in enumerate(_list(record, "history")):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _error(record, f"field 'history' item {i} must be a [question, answer] pair of strings")
        history.append((pair[0], pair[1]))
    return history


def _instruct(record: Record) -> Sample:
    prompt = _string(record, "instruct") + "\n" + _string(record, "query")
    return Sample(prompt=prompt, response=_string(record, "answer"), meta=_meta(record))


def _input_label(record: Record) -> Sample:
    return Sample(prompt=_string(record, "input"), response=_string(record, "label"), meta=_meta(record))


def _abstract(record: Record) -> str:
    # The 2-column CSL file reads as {title, text}; the 3-column one as {task, abstract, title}.
    if "abstract" not in record.data and "text" in record.data:
        return _string(record, "text")
    return _string(record, "abstract")


def _csl_title2abstract(record: Record) -> Sample:
    source = _string(record, "title")
    return Sample(prompt=CSL_TITLE2ABSTRACT_PROMPT + source, response=_abstract(record),
                  meta=_meta(record, source=source))


def _csl_abstract2title(record: Record) -> Sample:
    source = _abstract(record)
    return Sample(prompt=CSL_ABSTRACT2TITLE_PROMPT + source, response=_string(record, "title"),
                  meta=_meta(record, source=source))


def _lcsts(record: Record) -> Sample:
    source = _string(record, "text")
    return Sample(prompt=LCSTS_PROMPT + source, response=_string(record, "title"), meta=_meta(record, source=source))


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def _sharegpt(record: Record) -> Sample:
    turns = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    return _dialogue(record, "conversations", turns, default_system=_optional_string(record, "system"))


def _openai(record: Record) -> Sample:
    turns = _turns(record, "messages", "role", "content", OPENAI_ROLES)
    return _dialogue(record, "messages", turns, default_system="")


def _turns(record: Record, name: str, role_key: str, text_key: str, roles: dict) -> list[tuple[str, str]]:
    """(role, text) of every turn, roles mapped to system/user/assistant."""
    turns = []
    for i, turn in enumerate(_list(record, name)):
        where = f"{name}[{i}]: "
        if not isinstance(turn, dict):
            expected = f"an object with '{role_key}' and '{text_key}'"
            raise _error(record, f"{where}expected {expected}, got {_type_name(turn)}")
        role = _string(record, role_key, turn, where)
        if role not in roles:
            raise _error(record, f"{where}unknown {role_key} '{role}' (expected one of {', '.join(roles)})")
        turns.append((roles[role], _string(record, text_key, turn, where)))
    return turns


_A_TURN = {"system": "a system turn", "user": "a user turn", "assistant": "an assistant turn"}


def _dialogue(record: Record, name: str, turns: list[tuple[str, str]], default_system: str) -> Sample:
    """An optional system turn, then user/assistant pairs; the last pair is the sample, the rest history."""
    system, first = default_system, 0
    if turns and turns[0][0] == "system":
        system, first = turns[0][1], 1
    if first == len(turns):
        raise _error(record, f"field '{name}' has no user/assistant turns")
    for i in range(first, len(turns)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if turns[i][0] != expected:
            raise _error(record, f"{name}[{i}]: expected {_A_TURN[expected]}, got {_A_TURN[turns[i][0]]}")
    if turns[-1][0] != "assistant":
        raise _error(record, f"{name}[{len(turns) - 1}]: the conversation must end with an assistant turn")
    texts = [text for _, text in turns[first:]]
    pairs = list(zip(texts[0::2], texts[1::2]))
    return Sample(prompt=pairs[-1][0], response=pairs[-1][1], system=system, history=pairs[:-1], meta=_meta(record))


FORMATS: dict[str, Callable[[Record], Sample]] = {
    "text": _text,
    "novel": _novel,
    "alpaca": _alpaca,
    "instruct": _instruct,
    "input_label": _input_label,
    "sharegpt": _sharegpt,
    "openai": _openai,
    "csl_title2abstract": _csl_title2abstract,
    "csl_abstract2title": _csl_abstract2title,
    "lcsts": _lcsts,
}

# Detection rules, first match wins: (fields that must all be present, format).
# {title, text} is handled separately because CSL and LCSTS TSVs share that shape.
_DETECTION = [
    ({"conversations"}, "sharegpt"),
    ({"messages"}, "openai"),
    ({"instruction", "output"}, "alpaca"),
    ({"instruct", "query", "answer"}, "instruct"),
    ({"input", "label"}, "input_label"),
    ({"task", "abstract", "title"}, "csl_abstract2title"),
    ({"title", "abstract"}, "csl_title2abstract"),
    ({"title", "text"}, None),
    ({"name", "text"}, "novel"),
    ({"text"}, "text"),
]

_KNOWN_SHAPES = (
    "alpaca {instruction, input, output}, sharegpt {conversations}, openai {messages}, "
    "instruct {instruct, query, answer}, input_label {input, label}, csl_abstract2title {task, abstract, title}, "
    "csl_title2abstract {title, abstract} or {title, text} in a csl file, lcsts {title, text}, "
    "novel {name, text}, text {text}"
)


def detect_format(record: Record) -> str:
    """The format whose fields the record has; {title, text} is CSL when the file or its folder name says csl."""
    fields = set(record.data)
    for required, fmt in _DETECTION:
        if required <= fields:
            return fmt or ("csl_title2abstract" if _is_csl_path(record.path) else "lcsts")
    raise _error(
        record,
        f"cannot tell the format from the fields {sorted(fields)}; known formats: {_KNOWN_SHAPES} (or pass --format)",
    )


def _is_csl_path(path: str) -> bool:
    p = Path(path)
    return "csl" in p.name.lower() or "csl" in p.parent.name.lower()


def to_sample(record: Record, fmt: str) -> Sample:
    """Convert one record; DataError naming the field when it does not fit `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    sample = FORMATS[fmt](record)
    if not sample.prompt.strip() and not sample.response.strip():
        raise _error(record, "empty sample: both prompt and response are empty")
    return sample


def load_samples(path, fmt: str | None = None, *, skip_bad: bool = False, tsv_columns=None) -> Samples:
    """All samples of a file. The format is detected from the first record unless given, then every
    record must fit it. With skip_bad, bad records are left out, counted in `.skipped` and reported on stderr.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    records = RecordStream(path, skip_bad=skip_bad, tsv_columns=tsv_columns, warn=False)
    samples = Samples()
    for record in records:
        if fmt is None:
            fmt = detect_format(record)  # an unrecognised first record is fatal: nothing tells the format
        try:
            samples.append(to_sample(record, fmt))
        except DataError as e:
            records.reject(e)
    report_skipped(path, records.skipped, records.first_error)
    if not samples:
        raise DataError(path, 1, f"no usable records: all {records.skipped} were bad and skipped")
    samples.format = fmt
    samples.skipped = records.skipped
    return samples
