"""Turn novels into instruction data through any OpenAI-compatible chat API: Alpaca JSON lines out.

    export SYNTH_API_KEY=...        # or OPENAI_API_KEY; read from the environment only, never written anywhere
    python -m novelkit.synthesize --input novels/ --output data/novel_sft.jsonl \
        --base_url https://api.example.com/v1 --model some-model

Every accepted summary goes into <output stem>.cache.jsonl the moment it arrives, so a killed run resumes where it
stopped. The output is written at the end, atomically, in passage order. Passages that still failed after the
retries are listed in <output stem>.failures.jsonl and the command exits 1: rerunning it retries only those.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from novelkit.data.readers import iter_books
from novelkit.errors import ConfigError, DataError, exit_on_error
from novelkit.outputs import write_jsonl_atomic
from novelkit.synthesize.passages import (DEFAULT_INSTRUCTION, DEFAULT_MAX_CLASSICAL, DEFAULT_REQUEST, DEFAULT_SYSTEM,
                                DEFAULT_FEW_SHOT, Settings, book_passages, check_settings, load_few_shot, report,
                                synthesize)

KEY_VARIABLES = ("SYNTH_API_KEY", "OPENAI_API_KEY")  # the first one set is used


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="a novel .txt, a folder of them, or JSON lines of {name, text}")
    p.add_argument("--output", required=True, help="Alpaca JSON lines {instruction, input, output}")
    p.add_argument("--cache", default="", help="result cache; default: <output stem>.cache.jsonl")
    p.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                   help="the API root (…/v1); default $OPENAI_BASE_URL, else a local `python -m novelkit.serve`")
    p.add_argument("--model", required=True, help="model name at that API")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max_attempts", type=int, default=6, help="per passage, the first call included")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    p.add_argument("--retry_base", type=float, default=1.0, help="seconds before the first retry, doubled each time")
    p.add_argument("--max_consecutive_failures", type=int, default=50, help="stop when this many fail in a row")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max_tokens", type=int, default=64, help="for the summary")
    p.add_argument("--chunk_chars", type=int, default=800, help="passage length")
    p.add_argument("--min_chars", type=int, default=100, help="shorter passages (chapter tails) are left out")
    p.add_argument("--max_prompt_chars", type=int, default=30, help="longer summaries are retried, then failed")
    p.add_argument("--max_classical_score", type=float, default=DEFAULT_MAX_CLASSICAL,
                   help="books scoring higher (文言, 之乎者也 vs 的了是) are skipped; 1 keeps every book")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="the instruction field of every record")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system message of the summary request")
    p.add_argument("--request", default=DEFAULT_REQUEST, help="summary request, with {passage} and {max_chars}")
    p.add_argument("--few_shot", default="", help="JSON lines of {passage, prompt}; empty = built-in, none = zero-shot")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output)
    cache = Path(args.cache) if args.cache else output.with_name(output.stem + ".cache.jsonl")
    failures_file = output.with_name(output.stem + ".failures.jsonl")
    key_variable = next((v for v in KEY_VARIABLES if os.environ.get(v)), "")
    few_shot = {"": DEFAULT_FEW_SHOT, "none": []}.get(args.few_shot)
    few_shot = load_few_shot(args.few_shot) if few_shot is None else few_shot
    settings = Settings(
        base_url=args.base_url, model=args.model, api_key=os.environ.get(key_variable, ""), system=args.system,
        request=args.request, few_shot=few_shot, max_prompt_chars=args.max_prompt_chars,
        temperature=args.temperature, max_tokens=args.max_tokens, concurrency=args.concurrency,
        max_attempts=args.max_attempts, timeout=args.timeout, retry_base=args.retry_base,
        max_consecutive_failures=args.max_consecutive_failures)

    check_settings(settings)
    if not Path(args.input).exists():
        raise DataError(args.input, None, "not found")
    print(f"[synthesize] books from {args.input}; 文言 threshold {args.max_classical_score}", flush=True)
    passages = book_passages(iter_books(args.input), args.chunk_chars, args.min_chars, args.max_classical_score)
    if not passages:
        raise ConfigError(f"no passages: every book scored over --max_classical_score {args.max_classical_score} "
                          f"or every passage is under --min_chars {args.min_chars}")
    print(f"[synthesize] {len(passages)} passages → {args.model} at {args.base_url}, concurrency {args.concurrency}, "
          f"key: {'$' + key_variable if key_variable else 'none'}, cache: {cache}", flush=True)

    start = time.time()
    records, stats = synthesize(passages, settings, cache, instruction=args.instruction,
                                progress=not args.no_progress)
    write_jsonl_atomic(output, records)
    print(f"[synthesize] {report(passages, records, stats, time.time() - start)}")
    print(f"[synthesize] wrote {len(records)} records to {output}")
    failures_file.unlink(missing_ok=True)
    if stats.failures:
        write_jsonl_atomic(failures_file, stats.failures)
        for row in stats.failures[:5]:
            print(f"  failed: {row['book']} passage {row['index']}: {row['error']}", file=sys.stderr)
        print(f"[synthesize] {len(stats.failures)} passage(s) failed, listed in {failures_file}; rerun the same "
              "command to retry them (done passages come from the cache)", file=sys.stderr)
        sys.exit(1)
