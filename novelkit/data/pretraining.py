"""Pretraining corpus: clean web-novel dumps, split by whole books, tokenise once into a memory-mapped cache, and
serve fixed-length blocks of the token stream (documents separated by EOS).

The cache lives in `<cache_dir>/<fingerprint>/` (train.bin, eval.bin, meta.json). The fingerprint covers the corpus
files (path, size, mtime), the cleaning rules, the eval split and the tokenizer files, so an unchanged corpus is never
tokenised twice and any change builds a fresh cache. Books are read, cleaned and tokenised a few at a time, so a corpus
of hundreds of novels never sits in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from .chunking import split_chapters
from .readers import Book, iter_books, read_text

# Lines web-novel sites inject: links, "chapter end" marks, app ads, vote begging.
DEFAULT_BOILERPLATE = [
    r"https?://\S+", r"www\.[\w.-]+", r"[（(]?本章完[）)]?", r"手机阅读", r"手机用户请\S*", r"最新章节\S*",
    r"首发域名\S*", r"请记住本书\S*", r"天才一秒记住\S*", r"笔趣阁", r"求月票", r"求推荐票", r"求收藏",
    r"加入书签", r"[（(]?未完待续[）)]?",
]
PARALLEL_MIN_BYTES = 32 << 20
_HAS_CONTENT = re.compile(r"[\w\u4e00-\u9fff]")


@dataclass
class CleaningRules:
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    min_book_chars: int = 200  # books shorter than this after cleaning are dropped (and reported)
    dedupe_min_chars: int = 10  # paragraphs at least this long are deduplicated across the corpus


@dataclass
class CleaningReport:
    books_seen: int = 0
    books_kept: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed_by_pattern: Counter = field(default_factory=Counter)
    duplicate_paragraphs: int = 0
    dropped_books: list = field(default_factory=list)  # [name, reason]
    books_without_headings: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"books: {self.books_kept} kept of {self.books_seen}; characters {self.chars_out:,} of "
                 f"{self.chars_in:,} kept; {self.duplicate_paragraphs} duplicate paragraphs removed"]
        lines += [f"  removed {n} x {pattern!r}" for pattern, n in self.removed_by_pattern.most_common() if n]
        lines += [f"  dropped book {name}: {reason}" for name, reason in self.dropped_books]
        if self.books_without_headings:
            lines.append(f"  warning: {len(self.books_without_headings)} book(s) have no chapter headings "
                         f"(kept as one chapter): {', '.join(self.books_without_headings[:5])}")
        return "\n".join(lines)


class CorpusCleaner:
    """Removes boilerplate spans (a line left with no content goes), repeated paragraphs, and too-short books."""

    def __init__(self, rules: CleaningRules):
        self.rules = rules
        self.patterns = [(p, re.compile(p)) for p in rules.patterns]
        self.seen: set[bytes] = set()
        self.report = CleaningReport()

    def _clean_line(self, line: str) -> str | None:
        """The line without boilerplate spans; None when it was mostly boilerplate (an ad line keeps fragments
        such as "请访问" after its link is cut) or nothing with content is left."""
        original = line
        for source, pattern in self.patterns:
            line, n = pattern.subn("", line)
            self.report.removed_by_pattern[source] += n
        if line != original and len(line.strip()) <= len(original.strip()) / 3:
            return None
        return line if _HAS_CONTENT.search(line) else None

    def clean(self, book: Book) -> str | None:
        self.report.books_seen += 1
        self.report.chars_in += len(book.text)
        kept = []
        for line in book.text.split("\n"):
            if not line.strip():
                continue
            had_content = _HAS_CONTENT.search(line)
            line = self._clean_line(line) if had_content else None
            if line is None:
                continue
            key = hashlib.blake2b(line.strip().encode(), digest_size=8).digest()
            if len(line.strip()) >= self.rules.dedupe_min_chars:
                if key in self.seen:
                    self.report.duplicate_paragraphs += 1
                    continue
                self.seen.add(key)
            kept.append(line.rstrip())
        text = "\n".join(kept)
        if len(text) < self.rules.min_book_chars:
            self.report.dropped_books.append([book.name, f"{len(text)} characters after cleaning "
                                                         f"(min_book_chars={self.rules.min_book_chars})"])
            return None
        if all(not c.title for c in split_chapters(text)):
            self.report.books_without_headings.append(book.name)
        self.report.books_kept += 1
        self.report.chars_out += len(text)
        return text


def load_patterns(path: str | None) -> list[str]:
    """Boilerplate patterns: the defaults plus one regex per line of `path` (# comments allowed)."""
    patterns = list(DEFAULT_BOILERPLATE)
    if path:
        for number, line in enumerate(read_text(path).split("\n"), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                try:
                    re.compile(line)
                except re.error as e:
                    raise DataError(path, number, f"bad regular expression: {e}") from e
                patterns.append(line)
    return patterns


def corpus_files(corpus) -> list[Path]:
    path = Path(corpus)
    if not path.exists():
        raise DataError(corpus, None, "corpus not found")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".jsonl", ".json"))
        if not files:
            raise DataError(corpus, None, "no .txt / .jsonl files in this folder")
        return files
    return [path]


def iter_corpus_books(corpus, report: CleaningReport | None = None):
    """Books of a corpus, one at a time. An unreadable or empty file is reported and skipped, not fatal: one bad
    download should not stop a 500-book run."""
    for f in corpus_files(corpus):
        try:
            yield from iter_books(f)
        except DataError as e:
            if report is None:
                raise
            report.books_seen += 1
            report.dropped_books.append([f.stem, str(e)])


# ---------------------------------------------------------------- tokenisation cache

_worker_tokenizer = None


def _init_worker(load_tokenizer, tokenizer_dir: str):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def tokenize_document(text: str, tokenizer=None, piece_chars: int = 8192) -> list[int]:
    """Token ids of one document followed by EOS. Long texts are encoded in pieces cut after a newline, which keeps
    the tokenizer's memory small and changes nothing (no token spans a newline in our tokenizers' training)."""
    tokenizer = tokenizer or _worker_tokenizer
    ids, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= piece_chars else text.rfind("\n", start, start + piece_chars) + 1
        if end <= start:
            end = start + piece_chars
        ids += tokenizer.encode(text[start:end], add_special_tokens=False)
        start = end
    ids.append(tokenizer.eos_token_id)
    return ids


def _tokenizer_hash(tokenizer_dir) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(tokenizer_dir).glob("tokenizer*")) + sorted(Path(tokenizer_dir).glob("special_tokens*")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def cache_fingerprint(corpus, tokenizer_dir, rules: CleaningRules, eval_books: list[str]) -> str:
    h = hashlib.sha256()
    for f in corpus_files(corpus):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([asdict(rules), sorted(eval_books), _tokenizer_hash(tokenizer_dir)]).encode())
    return h.hexdigest()[:16]


@dataclass
class TokenCache:
    folder: Path
    meta: dict

    @property
    def dtype(self):
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        path = self.folder / f"{split}.bin"
        if self.meta["tokens"][split] == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")


def build_token_cache(corpus, tokenizer_dir, cache_dir, rules: CleaningRules | None = None,
                      eval_books: list[str] | None = None, num_proc: int | None = None, *,
                      load_tokenizer) -> TokenCache:
    """Clean and tokenise the corpus into `<cache_dir>/<fingerprint>/`, or reuse what is already there.
    `load_tokenizer(tokenizer_dir)` loads the tokenizer (novelkit.models.loading.load_tokenizer; a module-level
    function, as worker processes load it too): the data stage does not import the model stage."""
    rules, eval_books = rules or CleaningRules(), list(eval_books or [])
    folder = Path(cache_dir) / cache_fingerprint(corpus, tokenizer_dir, rules, eval_books)
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        print(f"[corpus] reusing token cache {folder} ({meta['tokens']['train']:,} train / "
              f"{meta['tokens']['eval']:,} eval tokens)", flush=True)
        return TokenCache(folder, meta)

    tokenizer = load_tokenizer(str(tokenizer_dir))
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    cleaner = CorpusCleaner(rules)
    counts, books = {"train": 0, "eval": 0}, {"train": [], "eval": []}
    if num_proc is None:  # worker processes take seconds to start: only worth it for a large corpus
        big = sum(f.stat().st_size for f in corpus_files(corpus)) > PARALLEL_MIN_BYTES
        num_proc = min(8, os.cpu_count() or 1) if big else 1
    files = {split: open(tmp / f"{split}.bin", "wb") for split in counts}
    try:
        documents = ((b.name, cleaner.clean(b)) for b in iter_corpus_books(corpus, cleaner.report))
        documents = ((name, text) for name, text in documents if text is not None)
        with _pool(num_proc, load_tokenizer, str(tokenizer_dir)) as pool, tqdm(desc="tokenize", unit="book") as bar:
            while window := [d for _, d in zip(range(num_proc * 2), documents)]:
                # a window at a time: Pool.imap would read the whole corpus ahead into its queue
                encoded = pool.map(tokenize_document, [text for _, text in window]) if pool else \
                    [tokenize_document(text, tokenizer) for _, text in window]
                for (name, _), ids in zip(window, encoded):
                    split = "eval" if name in eval_books else "train"
                    np.asarray(ids, dtype=dtype).tofile(files[split])
                    counts[split] += len(ids)
                    books[split].append(name)
                bar.update(len(window))
    finally:
        for f in files.values():
            f.close()
    if not any(counts.values()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(corpus, None, "no text left after cleaning:\n" + cleaner.report.summary())
    missing = sorted(set(eval_books) - set(books["eval"]))
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"EVAL_BOOKS {missing} not found in the corpus (books: {', '.join(books['train'][:20])})")
    report = cleaner.report
    print("[corpus] " + report.summary(), flush=True)
    meta = {"dtype": np.dtype(dtype).name, "tokens": counts, "books": books, "eos_token_id": tokenizer.eos_token_id,
            "cleaning": {**asdict(report), "removed_by_pattern": dict(report.removed_by_pattern)}}
    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process built the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache(folder, json.loads((folder / "meta.json").read_text()))


class _pool:
    """A worker pool for more than one process, else nothing (tokenise in this process)."""

    def __init__(self, num_proc: int, load_tokenizer, tokenizer_dir: str):
        self.num_proc, self.pool = num_proc, None
        self.worker_args = (load_tokenizer, tokenizer_dir)

    def __enter__(self):
        if self.num_proc > 1:
            ctx = multiprocessing.get_context("spawn")  # fork after torch threads start can deadlock
            self.pool = ctx.Pool(self.num_proc, initializer=_init_worker, initargs=self.worker_args)
        return self.pool

    def __exit__(self, *exc):
        if self.pool:
            self.pool.close()
            self.pool.join()


# ---------------------------------------------------------------- blocks


class PackedBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of `block_size` tokens from a token stream; the last partial block is left out."""

    def __init__(self, tokens: np.ndarray, block_size: int, indices=None):
        self.tokens, self.block_size = tokens, block_size
        self.indices = list(range(len(tokens) // block_size)) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        start = self.indices[i] * self.block_size
        ids = torch.from_numpy(np.asarray(self.tokens[start:start + self.block_size], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def train_eval_blocks(cache: TokenCache, block_size: int, eval_fraction: float = 0.0):
    """(train, eval) block datasets. With held-out books the eval set is their blocks; otherwise every k-th block
    of the stream (k = 1/eval_fraction) is held out, spread evenly over the corpus."""
    train_tokens = cache.tokens("train")
    n_blocks = len(train_tokens) // block_size
    if n_blocks == 0:
        raise DataError(cache.folder, None, f"the training corpus has {len(train_tokens):,} tokens, fewer than one "
                                            f"block of MAX_LENGTH={block_size}; lower MAX_LENGTH or add text")
    if cache.meta["tokens"]["eval"]:
        return PackedBlocks(train_tokens, block_size), PackedBlocks(cache.tokens("eval"), block_size)
    if eval_fraction <= 0:
        return PackedBlocks(train_tokens, block_size), None
    k = max(2, round(1 / eval_fraction))
    held = set(range(k - 1, n_blocks, k))
    return (PackedBlocks(train_tokens, block_size, [i for i in range(n_blocks) if i not in held]),
            PackedBlocks(train_tokens, block_size, sorted(held)) if held else None)
