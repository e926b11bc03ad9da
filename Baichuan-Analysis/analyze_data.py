"""How big is a dataset or a novel corpus, how long are its samples in tokens, and what does each MAX_LENGTH cut off.

Any supported dataset (JSONL / JSON / TSV in any format of novelkit.data.formats) or novels (.txt file, folder of .txt,
{name, text} JSON lines with --kind novels) → <output_dir>/report.md, report.json and histograms. Streams its input:
a multi-GB corpus is read once, in bounded memory. Run through run_analysis.sh, or directly:
    python Baichuan-Analysis/analyze_data.py --data data_examples/sft/train.jsonl --output_dir output/analysis/data
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from tqdm import tqdm

from novelkit.data.bookstream import book_files, file_encoding, stream_chapters
from novelkit.errors import DataError, exit_on_error
from novelkit.data.formats import detect_format, to_sample
from novelkit.models.loading import load_tokenizer, resolve_model_path
from novelkit.analysis.memory import load_config
from novelkit.analysis.plots import histogram
from novelkit.data.readers import RecordStream, detect_encoding
from novelkit.analysis.report import human_count, table, write_report
from novelkit.analysis.stats import DEFAULT_MAX_LENGTHS, DuplicateFinder, Fingerprint, LengthStats, text_problems, \
    truncation_table
from novelkit.data.templates import default_template_name, encode_sample, get_template

TOKEN_BATCH = 256


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data_examples/sft/train.jsonl", help="dataset file, or novel .txt / folder")
    p.add_argument("--kind", choices=["auto", "samples", "novels"], default="auto",
                   help="auto: novels for a .txt file or a folder, samples otherwise")
    p.add_argument("--format", default="", help="dataset format; empty = detected")
    p.add_argument("--model_path", default="", help="model or tokenizer folder; empty = the embedded default")
    p.add_argument("--template", default="", help="chat template for sample lengths; empty = the model's own")
    p.add_argument("--max_lengths", default=",".join(map(str, DEFAULT_MAX_LENGTHS)), help="candidate MAX_LENGTHs")
    p.add_argument("--max_truncated", type=float, default=0.01, help="share a recommended MAX_LENGTH may truncate")
    p.add_argument("--token_every", type=int, default=1, help="tokenize 1 sample / chapter in N (huge corpora)")
    p.add_argument("--output_dir", default="output/analysis/data")
    return p.parse_args()


def count_lines(path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))


def length_section(title: str, stats: dict[str, LengthStats]) -> str:
    rows = [[name, *stats[name].summary().values()] for name in stats if stats[name].n]
    return f"## {title}\n\n" + table(["", "count", "total", "mean", "min", "p50", "p90", "p95", "p99", "max"], rows)


def truncation_section(stats: LengthStats, args, what: str) -> tuple[str, dict]:
    shares, best = truncation_table(stats, [int(x) for x in args.max_lengths.split(",")], args.max_truncated)
    rows = [[length, f"{share:.2%}"] for length, share in shares.items()]
    advice = (f"Recommended MAX_LENGTH: **{best}** (the smallest candidate truncating at most "
              f"{args.max_truncated:.0%} of {what})." if best else
              f"Every candidate truncates more than {args.max_truncated:.0%} of {what}.")
    md = f"## Truncated at each MAX_LENGTH\n\n{table(['MAX_LENGTH', f'{what} truncated'], rows)}\n\n{advice}"
    return md, {"truncated_share": shares, "recommended_max_length": best}


def analyze_samples(args, tokenizer, template_name) -> tuple[str, dict, dict]:
    template = get_template(template_name)
    records = RecordStream(args.data, skip_bad=True, warn=False)  # bad records are counted and reported, not fatal
    names = ["prompt_chars", "response_chars", "prompt_tokens", "response_tokens", "sample_tokens"]
    lengths = {name: LengthStats() for name in names}
    empty, problems, problem_lines, dups = Counter(), Counter(), [], DuplicateFinder()
    fmt, batch, kept, history_turns, tokenized_chars = None, [], 0, 0, 0

    def tokenize(samples):
        nonlocal tokenized_chars
        texts = [s.prompt for s in samples] + [s.response for s in samples]
        tokenized_chars += sum(map(len, texts))
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for s, prompt, response in zip(samples, ids, ids[len(samples):]):
            lengths["prompt_tokens"].add(len(prompt))
            lengths["response_tokens"].add(len(response))
            # what fine-tuning truncates: system, history, template markers, prompt, response and end marker
            lengths["sample_tokens"].add(sum(len(i) for i, _ in encode_sample(tokenizer, template, s)))

    with tqdm(total=count_lines(args.data), unit="line", desc="[data] samples") as bar:
        for record in records:
            bar.update(record.line - bar.n)
            fmt = fmt or args.format or detect_format(record)
            try:
                s = to_sample(record, fmt)
            except DataError as e:
                records.reject(e)
                continue
            lengths["prompt_chars"].add(len(s.prompt))
            lengths["response_chars"].add(len(s.response))
            history_turns += len(s.history)
            empty.update(f for f in ("prompt", "response") if not getattr(s, f).strip())
            dups.add(Fingerprint.of(json.dumps([s.system, s.history, s.prompt, s.response])), record.line)
            found = text_problems("\n".join([s.system, s.prompt, s.response, *(t for turn in s.history for t in turn)]))
            problems.update(found)
            if found and len(problem_lines) < 5:
                problem_lines.append(record.line)
            kept += 1
            if kept % args.token_every == 0:
                batch.append(s)
            if len(batch) == TOKEN_BATCH:
                tokenize(batch)
                batch = []
    tokenize(batch)
    if not kept:
        raise DataError(args.data, 1, f"no usable records: all {records.skipped} were bad")

    n_dups, examples = dups.duplicates()
    tokens = lengths["prompt_tokens"].total + lengths["response_tokens"].total
    trunc_md, trunc = truncation_section(lengths["sample_tokens"], args, "samples")
    data = {
        "kind": "samples", "path": str(args.data), "format": fmt, "template": template_name,
        "encoding": detect_encoding(args.data), "samples": kept, "bad_records": records.skipped, "first_bad_record": str(records.first_error or ""),
        "history_turns": history_turns, "empty_fields": dict(empty), "duplicates": n_dups,
        "duplicate_examples": [{"line": d, "same_as_line": f} for f, d in examples],
        "encoding_problems": dict(problems), "encoding_problem_lines": problem_lines,
        "tokens_per_char": round(tokens / tokenized_chars, 4) if tokenized_chars else None,
        "token_every": args.token_every, "lengths": {k: v.summary() for k, v in lengths.items()}, **trunc,
    }
    best, figures = trunc["recommended_max_length"], {}
    titles = {"prompt_tokens": "prompt", "response_tokens": "response", "sample_tokens": "whole sample (template)"}
    for k, title in titles.items():
        markers = {f"recommended MAX_LENGTH {best}": best} if k == "sample_tokens" and best else None
        figures[f"{k}.png"] = histogram(lengths[k].counts, f"Tokens per sample: {title}", "tokens", "samples",
                                        markers=markers)
    md = "\n\n".join([
        f"# Data report: {args.data}",
        f"{kept} samples ({fmt}, {data['encoding']}); {records.skipped} bad records skipped"
        + (f" (first: {data['first_bad_record']})" if records.skipped else "")
        + f"; {history_turns} history turns. Tokens by `{tokenizer.name_or_path}`"
        + (f", counted on 1 sample in {args.token_every}" if args.token_every > 1 else "")
        + f" ({data['tokens_per_char']} per character); sample_tokens = the whole sample under the template "
          f"`{template_name}` (system, history, markers, prompt, response, end marker): what fine-tuning truncates.",
        length_section("Lengths", lengths), trunc_md,
        "## Problems\n\n" + table(["what", "found"], [
            ["empty prompt", empty["prompt"]], ["empty response", empty["response"]],
            ["exact duplicates", f"{n_dups}" + "".join(f"; line {d} = line {f}" for f, d in examples)],
            *[[k.replace("_", " "), f"{v} (lines {problem_lines})"] for k, v in problems.items()]]),
        *[f"![{name}]({name})" for name in figures],
    ])
    return md, data, figures


def analyze_novels(args, tokenizer) -> tuple[str, dict, dict]:
    files = book_files(args.data)
    books, chars, tokens, dups, names = {}, LengthStats(), LengthStats(), DuplicateFinder(), []
    problems, empty_chapters = Counter(), 0
    sampled = {"chars": 0, "tokens": 0}
    chapter = None  # the chapter being read: its book entry, length, tokens, fingerprint

    def finish(c):
        nonlocal empty_chapters
        chars.add(c["chars"])
        c["book"]["chapters"] += 1
        if c["tokens"] is not None:
            tokens.add(c["tokens"])
            sampled["chars"] += c["chars"]
            sampled["tokens"] += c["tokens"]
        if c["fingerprint"].empty:
            empty_chapters += 1
        else:
            dups.add(c["fingerprint"].value(), len(names))
        names.append(f"{c['book']['name']}: {c['title'] or '(before the first heading)'}")

    sizes = {str(f): f.stat().st_size for f in files}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="[data] novels") as bar:
        finished_bytes, current_path = 0, None
        for part in stream_chapters(args.data, errors="replace"):
            if part.path != current_path:
                finished_bytes += sizes.get(current_path, 0)
                current_path = part.path
            bar.update(finished_bytes + part.bytes_read - bar.n)
            key = part.path + "\0" + part.book
            if key not in books:
                books[key] = {"name": part.book, "path": part.path, "chapters": 0, "chars": 0, "tokens_counted": 0,
                              "encoding": file_encoding(part.path, "replace") if part.path.endswith(".txt") else "json"}
            book = books[key]
            if part.part == 0:
                if chapter:
                    finish(chapter)
                chapter = {"book": book, "title": part.title, "chars": 0,
                           "fingerprint": Fingerprint(ignore_whitespace=True),
                           "tokens": 0 if len(names) % args.token_every == 0 else None}
            chapter["chars"] += len(part.text)
            chapter["fingerprint"].update(part.text)
            book["chars"] += len(part.text)
            problems.update(text_problems(part.text))
            if chapter["tokens"] is not None:
                n = len(tokenizer(part.text, add_special_tokens=False)["input_ids"])
                chapter["tokens"] += n
                book["tokens_counted"] += n
        if chapter:
            finish(chapter)

    ratio = sampled["tokens"] / sampled["chars"] if sampled["chars"] else 0.0
    n_dups, examples = dups.duplicates()
    trunc_md, trunc = truncation_section(tokens, args, "chapters")
    estimated = round(chars.total * ratio)
    blocks = {length: -(-estimated // length) for length in trunc["truncated_share"]}
    data = {
        "kind": "novels", "path": str(args.data), "books": len(books), "chapters": chars.n, "chars": chars.total,
        "tokens_per_char": round(ratio, 4), "tokens": estimated if args.token_every > 1 else sampled["tokens"],
        "token_every": args.token_every, "empty_chapters": empty_chapters, "duplicate_chapters": n_dups,
        "duplicate_examples": [{"chapter": names[d], "same_as": names[f]} for f, d in examples],
        "encoding_problems": dict(problems), "chapter_chars": chars.summary(), "chapter_tokens": tokens.summary(),
        "pretraining_blocks": blocks, "per_book": list(books.values()), **trunc,
    }
    figures = {"chapter_chars.png": histogram(chars.counts, f"characters per chapter ({chars.n} chapters)",
                                              "characters", "chapters"),
               "chapter_tokens.png": histogram(tokens.counts, f"tokens per chapter ({tokens.n} chapters)",
                                               "tokens", "chapters")}
    book_rows = [[b["name"], b["encoding"], b["chapters"], b["chars"], b["tokens_counted"]] for b in books.values()]
    md = "\n\n".join([
        f"# Novel corpus report: {args.data}",
        f"{len(books)} books, {chars.n} chapters, {human_count(chars.total)} characters, "
        f"{human_count(data['tokens'])} tokens ({ratio:.3f} tokens per character with `{tokenizer.name_or_path}`"
        + (f", counted on 1 chapter in {args.token_every} and extrapolated" if args.token_every > 1 else "") + ").",
        length_section("Chapter lengths", {"characters": chars, "tokens": tokens}), trunc_md,
        "## Packed for pretraining\n\n" + table(["block length", "blocks"], [[k, v] for k, v in blocks.items()]),
        "## Problems\n\n" + table(["what", "found"], [
            ["empty chapters (a heading and no text)", empty_chapters],
            ["duplicate chapters (same text up to whitespace)",
             f"{n_dups}" + "".join(f"; {e['chapter']} = {e['same_as']}" for e in data["duplicate_examples"])],
            *[[k.replace("_", " "), v] for k, v in problems.items()]]),
        "## Books\n\n" + table(["book", "encoding", "chapters", "characters", "tokens counted"], book_rows[:100])
        + (f"\n\n… and {len(book_rows) - 100} more in report.json" if len(book_rows) > 100 else ""),
        *[f"![{name}]({name})" for name in figures],
    ])
    return md, data, figures


@exit_on_error
def main():
    args = parse_args()
    if args.token_every < 1:
        raise DataError(args.data, None, "--token_every must be at least 1")
    model_path = args.model_path or resolve_model_path(None)
    tokenizer = load_tokenizer(model_path)
    path = Path(args.data)
    if not path.exists():
        raise DataError(path, None, "file not found")
    kind = args.kind if args.kind != "auto" else "novels" if path.is_dir() or path.suffix.lower() == ".txt" else \
        "samples"
    if kind == "novels":
        md, data, figures = analyze_novels(args, tokenizer)
    else:
        config = load_config(model_path) if Path(model_path, "config.json").exists() else None
        md, data, figures = analyze_samples(args, tokenizer, args.template or default_template_name(tokenizer, config))
    for f in write_report(args.output_dir, md, data, figures):
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
