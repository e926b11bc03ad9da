"""Training features: SFT samples to (input_ids, labels), batches, and packed pretraining blocks."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator

import torch

from .formats import Sample
from .templates import END, QUERY, RESPONSE, encode_sample

IGNORE_INDEX = -100


@dataclasses.dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def _flatten(segments) -> EncodedSample:
    input_ids, labels = [], []
    for ids, kind in segments:
        input_ids += ids
        labels += ids if kind in (RESPONSE, END) else [IGNORE_INDEX] * len(ids)
    return EncodedSample(input_ids, labels)


def _length(segments) -> int:
    return sum(len(ids) for ids, _ in segments)


def _cut(segments, index: int, keep: int):
    ids, kind = segments[index]
    return [*segments[:index], (ids[: max(keep, 0)], kind), *segments[index + 1:]]


def encode_sft(tokenizer, template, sample: Sample, max_length: int) -> EncodedSample:
    """Prompt tokens get label -100; responses and their end marker (EOS) are learned.

    Too long a sample is truncated keeping the response when it can: oldest history turns go first, then the tail
    of the last query (its beginning, usually the instruction, stays), and only then the tail of the response
    (which then loses its EOS: the model should not learn to stop at an arbitrary cut).
    """
    segments = encode_sample(tokenizer, template, sample)
    if _length(segments) <= max_length:
        return _flatten(segments)
    while sample.history and _length(segments) > max_length:
        sample = dataclasses.replace(sample, history=sample.history[1:])
        segments = encode_sample(tokenizer, template, sample)
    excess = _length(segments) - max_length
    kinds = [kind for _, kind in segments]
    if excess > 0 and QUERY in kinds:
        q = kinds.index(QUERY)
        # the query keeps at least a quarter of the budget (or all of itself if shorter); the response pays the rest
        query_len = len(segments[q][0])
        cut = min(excess, query_len - min(query_len, max_length // 4))
        segments = _cut(segments, q, query_len - cut)
        excess = _length(segments) - max_length
    if excess > 0:
        r = len(kinds) - 1 - kinds[::-1].index(RESPONSE) if RESPONSE in kinds else len(kinds) - 1
        segments = [s for i, s in enumerate(segments) if not (i > r and s[1] == END)]
        segments = _cut(segments, r, len(segments[r][0]) - (_length(segments) - max_length))
    encoded = _flatten(segments)
    # a response cut away entirely leaves a prompt longer than max_length: cut the prompt's tail as a last resort
    encoded.input_ids, encoded.labels = encoded.input_ids[:max_length], encoded.labels[:max_length]
    encoded.truncated = True
    return encoded


def encode_sft_dataset(tokenizer, template, samples, max_length: int, name: str = "training") -> list[dict]:
    """Encoded rows; samples that had to be cut are reported with the first one's file and line."""
    rows, cut, response_cut = [], [], []
    for sample in samples:
        encoded = encode_sft(tokenizer, template, sample, max_length)
        rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        if encoded.truncated:
            cut.append(sample)
            whole = encode_sft(tokenizer, template, sample, sys.maxsize)
            if _learned(encoded) < _learned(whole):
                response_cut.append((sample, len(whole.input_ids)))
    if response_cut:
        sample, length = response_cut[0]
        print(f"warning: {_where(sample)}: the sample is {length} tokens and its response does not fit "
              f"max_length={max_length}; {len(response_cut)} of {len(rows)} {name} samples lose the end of their "
              f"response (the model does not learn where those end). Raise MAX_LENGTH (--max_length) to keep them "
              f"whole", file=sys.stderr)
    elif cut:
        print(f"note: {len(cut)} of {len(rows)} {name} samples longer than max_length={max_length} had history or "
              f"prompt cut, responses kept (first: {_where(cut[0])})", file=sys.stderr)
    return rows


def _learned(encoded) -> int:
    return sum(label != IGNORE_INDEX for label in encoded.labels)


def _where(sample: Sample) -> str:
    return f"{sample.meta.get('path', '?')}:{sample.meta.get('line', '?')}"



@dataclasses.dataclass
class SFTCollator:
    """Right-pads a batch for training: pad id in inputs, -100 in labels, 0 in the attention mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            n = len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * (width - n))
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * (width - n))
            batch["attention_mask"].append([1] * n + [0] * (width - n))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def left_pad(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask for generation (new tokens append on the right)."""
    width = max(len(s) for s in sequences)
    ids = [[pad_token_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}


def pack_documents(documents: Iterable[list[int]], block_size: int, eos_token_id: int) -> Iterator[list[int]]:
    """Concatenate documents, each followed by EOS, and cut the stream into blocks of exactly block_size tokens.

    No token is lost except the final partial block, which is yielded too (shorter) so callers can decide."""
    buffer: list[int] = []
    for doc in documents:
        buffer.extend(doc)
        buffer.append(eos_token_id)
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            buffer = buffer[block_size:]
    if buffer:
        yield buffer
