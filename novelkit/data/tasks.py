"""The seeds' three fine-tuning tasks as Alpaca records, made from the raw files a user has
(the formats of ../shared/data/README.md):

- csl: paper title → abstract from CSL TSV (title, abstract; or the 3-column `to title` file). The instruction is
  `根据标题生成中文学位论文摘要：` + title, the same prompt the csl_title2abstract format gives the raw file.
- ner: MSRA instruction NER ({instruct, query, answer}, answers `实体_类型` lines or `没有`) as instruction = instruct,
  input = query: the same prompt text as the instruct format.
- novel: writing from a short prompt. Each passage of up to 800 characters (chapters cut at sentence ends by
  novelkit.data.chunking) is an output; its prompt names the book and chapter and gives the passage's first words.
"""

from __future__ import annotations

import random
import re

from ..errors import ConfigError
from .chunking import chunk_book
from .formats import load_samples, to_sample
from .readers import iter_books, iter_records

TASKS = ("csl", "ner", "novel")
NOVEL_INSTRUCTION = "根据提示写一段约{chars}字的小说正文。"
_OPENING = re.compile(r"^.{4,30}?[，。！？；：…]")


def csl_records(path) -> list[dict]:
    return [{"instruction": s.prompt, "input": "", "output": s.response}
            for s in load_samples(path, "csl_title2abstract")]


def ner_records(path) -> list[dict]:
    rows = []
    for record in iter_records(path):
        to_sample(record, "instruct")  # checks the fields, naming file and line
        data = record.data
        rows.append({"instruction": data["instruct"], "input": data["query"], "output": data["answer"]})
    return rows


def opening(text: str) -> str:
    """A passage's first words: its first clause when that is short, else its first 20 characters."""
    text = text.strip()
    found = _OPENING.match(text)
    return found.group(0)[:-1] if found else text[:20]


def novel_records(path, max_chars: int = 800) -> list[dict]:
    """One record per passage of a .txt novel, a folder of them, or {name, text} lines. Passages shorter than half
    of max_chars (chapter ends) are left out: the prompt asks for a passage of about max_chars."""
    rows = []
    for book in iter_books(path):
        for chunk in chunk_book(book.text, max_chars):
            if len(chunk.text) < max_chars // 2:
                continue
            chapter = " ".join(chunk.chapter_title.split()) + "，" if chunk.chapter_title else ""
            rows.append({"instruction": NOVEL_INSTRUCTION.format(chars=max_chars),
                         "input": f"《{book.name}》{chapter}开头：{opening(chunk.text)}", "output": chunk.text})
    return rows


def task_records(task: str, paths, max_chars: int = 800) -> list[dict]:
    """Alpaca records of `task` from one or more raw files."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rows = []
    for path in paths:
        if task == "csl":
            rows += csl_records(path)
        elif task == "ner":
            rows += ner_records(path)
        else:
            rows += novel_records(path, max_chars)
    return rows


def unique_records(rows: list[dict]) -> list[dict]:
    """The first record of each prompt (instruction + input), so that no prompt lands in two splits."""
    seen: dict[tuple, dict] = {}
    for row in rows:
        seen.setdefault((row["instruction"], row["input"]), row)
    return list(seen.values())


def split_records(rows: list[dict], dev: int, test: int, seed: int = 0) -> tuple[list, list, list]:
    """(train, dev, test) after a seeded shuffle; test records have their output blanked (the submission input)."""
    if dev + test >= len(rows):
        raise ConfigError(f"only {len(rows)} records: too few for {dev} dev + {test} test and some training")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    test_rows = [{**r, "output": ""} for r in rows[dev:dev + test]]
    return rows[dev + test:], rows[:dev], test_rows
