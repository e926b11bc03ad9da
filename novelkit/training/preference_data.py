"""Preference pairs for DPO-style tuning: a prompt, the response people preferred (`chosen`) and the other one
(`rejected`), read from

- a file of `{prompt, chosen, rejected}` records (`system` optional), or the shapes LLaMA-Factory and TRL write:
  alpaca `{instruction, input, chosen, rejected}`, sharegpt `{conversations, chosen, rejected}` and openai
  `{messages, chosen, rejected}` whose conversation ends with the user's turn, TRL's conversational
  `{prompt: [messages], chosen: [messages], rejected: [messages]}`; `chosen`/`rejected` may be a string, one turn
  object or a list of turns (the last assistant turn is the response);
- the web demo's `ratings.sqlite` (novelkit.evaluation.ratings.preference_pairs: overall choice or one axis).

The prompt side becomes a Sample exactly as the SFT formats read it (same templates, history, system prompt).
A bad record stops the load with the file, line and field, like every other reader here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..data.formats import FORMATS, OPENAI_ROLES, SHAREGPT_ROLES, Sample, _error, _type_name
from ..data.readers import Record, RecordStream
from ..errors import DataError
from ..evaluation.ratings import RatingStore, preference_pairs

SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_SHAPES = ("{prompt, chosen, rejected}, alpaca {instruction, input, chosen, rejected}, sharegpt {conversations, "
           "chosen, rejected}, openai {messages, chosen, rejected}")


@dataclass
class PreferencePair:
    sample: Sample  # the prompt (with system and history) and, as its response, the chosen answer
    rejected: str

    @property
    def chosen(self) -> str:
        return self.sample.response


def _answer(record: Record, name: str) -> str:
    """`chosen`/`rejected` as text: a string, a turn object, or a list of turns ending with the assistant's."""
    if name not in record.data:
        raise _error(record, f"missing field '{name}' (preference records: {_SHAPES})")
    value = record.data[name]
    if isinstance(value, list):
        if not value:
            raise _error(record, f"field '{name}' is an empty list")
        value = value[-1]
    if isinstance(value, dict):
        for role_key, text_key in (("role", "content"), ("from", "value")):
            if text_key in value:
                role = value.get(role_key, "assistant")
                if {**SHAREGPT_ROLES, **OPENAI_ROLES}.get(role) != "assistant":
                    raise _error(record, f"field '{name}': the response must be an assistant turn, not {role!r}")
                value = value[text_key]
                break
        else:
            raise _error(record, f"field '{name}': a turn object needs 'content' (or 'value')")
    if not isinstance(value, str):
        raise _error(record, f"field '{name}' must be a string or an assistant turn, got {_type_name(value)}")
    if not value.strip():
        raise _error(record, f"field '{name}' is empty")
    return value


def _prompt_sample(record: Record, chosen: str) -> Sample:
    """The record's prompt side read by the SFT format it has, with `chosen` as its response."""
    data = record.data
    if isinstance(data.get("prompt"), list):  # TRL conversational: the prompt is a list of messages
        data = {"messages": data["prompt"]}
        fmt = "openai"
    elif "prompt" in data:
        if not isinstance(data["prompt"], str):
            raise _error(record, f"field 'prompt' must be a string or a list of messages, got "
                                 f"{_type_name(data['prompt'])}")
        return Sample(prompt=data["prompt"], response=chosen, system=data.get("system") or "",
                      meta={"path": record.path, "line": record.line})
    elif "conversations" in data:
        fmt = "sharegpt"
    elif "messages" in data:
        fmt = "openai"
    elif "instruction" in data:
        fmt = "alpaca"
    else:
        raise _error(record, f"cannot tell the prompt from the fields {sorted(data)}; preference records: {_SHAPES}")
    if fmt == "alpaca":
        data = {**data, "output": chosen}
    else:  # the conversation ends with the user's turn: the chosen answer is the assistant turn that follows
        key, role, text = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        turns = data.get(key)
        if not isinstance(turns, list):
            raise _error(record, f"field '{key}' must be a list, got {_type_name(turns)}")
        data = {**data, key: [*turns, {role: "assistant" if fmt == "openai" else "gpt", text: chosen}]}
    return FORMATS[fmt](replace(record, data=data))


def to_preference_pair(record: Record) -> PreferencePair:
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    if chosen.strip() == rejected.strip():
        raise _error(record, "fields 'chosen' and 'rejected' are the same text: the pair says nothing")
    return PreferencePair(_prompt_sample(record, chosen), rejected)


def load_preference_pairs(path, by: str = "overall") -> list[PreferencePair]:
    """All pairs of a preference file, or of a ratings database (`by`: overall or one rating axis)."""
    path = str(path)
    if Path(path).suffix.lower() in SQLITE_SUFFIXES:
        return pairs_from_ratings(path, by)
    return [to_preference_pair(record) for record in RecordStream(path)]


def rating_pairs(path, by: str = "overall") -> tuple[list[dict], dict]:
    """preference_pairs() of a ratings database, with a one-line error for a missing file or no pairs at all."""
    if not Path(path).is_file():
        raise DataError(str(path), None, "no such ratings database (web_demo.py writes one: --ratings_db)")
    rows, counts = preference_pairs(RatingStore(path).rows(), by=by)
    if not rows:
        raise DataError(str(path), None, f"no preference pairs by {by}: every rating was a tie or an even split")
    return rows, counts


def describe_counts(counts: dict, by: str) -> str:
    return (f"{counts['ratings']} ratings by {by} -> {counts['pairs']} pairs ({counts['ties']} ties and "
            f"{counts['split']} even splits dropped, {counts['repeats']} repeats merged)")


def pairs_from_ratings(path: str, by: str = "overall") -> list[PreferencePair]:
    """The demo's stored A/B ratings as pairs; prints what was kept and dropped."""
    rows, counts = rating_pairs(path, by)
    print(f"[preferences] {path}: {describe_counts(counts, by)}", flush=True)
    return [PreferencePair(Sample(prompt=r["prompt"], response=r["chosen"], meta={"path": path, "pair": i}),
                           r["rejected"]) for i, r in enumerate(rows)]
