"""Evaluate a pretrained model on a held-out book: sliding-window perplexity, and continuations from N positions
scored against the true text (ROUGE on words and characters, plus repetition: distinct-n and repeated 4-grams).

Writes <output_dir>/metrics.json and continuations.jsonl, and prints a markdown table. Run through run_predict.sh.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.data.formats import Sample
from novelkit.data.pretraining import iter_corpus_books
from novelkit.data.templates import get_template
from novelkit.errors import exit_on_error
from novelkit.evaluation.lm_eval import continuation_points, merge_perplexity, sliding_window_perplexity
from novelkit.evaluation.repetition import corpus_distinct_n, repeated_ngram_rate
from novelkit.evaluation.rouge import corpus_rouge
from novelkit.generation.batch import generate_responses, generation_kwargs
from novelkit.models.loading import load_model, load_tokenizer, max_positions, resolve_model_path
from novelkit.outputs import write_json_atomic, write_jsonl_atomic
from novelkit.shards import gather_to_first, start_shards, stop_shards


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="", help="model folder; empty = the embedded default")
    p.add_argument("--book", required=True, help="held-out book: a .txt file (or a folder/JSONL of books)")
    p.add_argument("--output_dir", default="output/pretrain-eval")
    p.add_argument("--window", type=int, default=0, help="perplexity window; 0 = the model's positions (max 2048)")
    p.add_argument("--stride", type=int, default=0, help="0 = window / 2")
    p.add_argument("--positions", type=int, default=20, help="continuation points spread over the book")
    p.add_argument("--context_tokens", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--retrieval_index", default="", help="Baichuan-Embedding index holding this book: put a 前情提要 "
                                                         "block of related earlier passages before each context")
    p.add_argument("--retrieval_k", type=int, default=4)
    p.add_argument("--retrieval_tokens", type=int, default=512)
    return p.parse_args()


def table(m: dict) -> str:
    rows = [("perplexity (sliding window)", f"{m['perplexity']['perplexity']:.2f}")]
    for level in ("word", "char"):
        for metric in ("rouge-1", "rouge-2", "rouge-l"):
            rows.append((f"{metric} F ({level})", f"{100 * m[f'rouge-chinese/{level}'][metric]['f']:.2f}"))
    for who in ("generated", "reference"):
        r = m["repetition"][who]
        rows += [(f"distinct-1 / distinct-2 ({who})", f"{r['distinct-1']:.3f} / {r['distinct-2']:.3f}"),
                 (f"repeated 4-gram rate ({who})", f"{r['repeated-4gram-rate']:.3f}")]
    return "| metric | value |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def repetition(texts: list[str]) -> dict:
    return {"distinct-1": corpus_distinct_n(texts, 1), "distinct-2": corpus_distinct_n(texts, 2),
            "repeated-4gram-rate": sum(repeated_ngram_rate(t, 4) for t in texts) / max(1, len(texts))}


@exit_on_error
def main():
    args = parse_args()
    rank, world = start_shards()  # run_predict.sh: one process per GPU, each takes every world-th window and point
    model_path = resolve_model_path(args.model_path)
    tokenizer, model = load_tokenizer(model_path), load_model(model_path, dtype=args.dtype)
    text = "\n".join(book.text for book in iter_corpus_books(args.book))
    ids = tokenizer.encode(text, add_special_tokens=False)
    window = args.window or min(max_positions(model.config), 2048)
    print(f"[eval] {args.book}: {len(text):,} characters, {len(ids):,} tokens; window {window}"
          + (f"; process {rank} of {world}" if world > 1 else ""), flush=True)

    # 1. perplexity over the whole book
    part = sliding_window_perplexity(model, ids, window, args.stride or None, args.batch_size, shard=(rank, world))
    parts = gather_to_first(part)

    # 2. continuations: context before each point, generated text vs the true next tokens
    points = continuation_points(len(ids), args.context_tokens, args.new_tokens, args.positions)
    samples = [Sample(prompt=tokenizer.decode(ids[p - args.context_tokens:p]), response="") for p in points]
    if args.retrieval_index:  # only passages of this book that end before the context starts
        from novelkit.retrieval.recap import Retriever, recap_for

        retriever = Retriever(args.retrieval_index)
        samples = [Sample(prompt=recap_for(retriever, s.prompt, tokenizer, k=args.retrieval_k,
                                           token_budget=args.retrieval_tokens, book=Path(args.book).stem,
                                           before=len(tokenizer.decode(ids[:p - args.context_tokens]))) + s.prompt,
                          response="") for p, s in zip(points, samples)]
    references = [tokenizer.decode(ids[p:p + args.new_tokens]) for p in points]
    gen = generation_kwargs(model, max_new_tokens=args.new_tokens, repetition_penalty=args.repetition_penalty)
    gen.update(min_new_tokens=args.new_tokens)  # compare equal lengths: do not stop at an EOS
    mine = list(range(rank, len(samples), world))
    texts = generate_responses(model, tokenizer, get_template("plain"), [samples[k] for k in mine],
                               batch_size=args.batch_size, **gen)
    pieces = gather_to_first(dict(zip(mine, texts)))
    stop_shards()
    if pieces is None:
        return  # rank 0 scores and writes
    by_point = {k: t for piece in pieces for k, t in piece.items()}
    generated = [by_point[k] for k in range(len(samples))]
    metrics = {"book": args.book, "characters": len(text), "perplexity": merge_perplexity(parts)}
    for definition in ("rouge-chinese", "standard"):
        for level in ("word", "char"):
            metrics[f"{definition}/{level}"] = corpus_rouge(generated, references, level=level, definition=definition)
    metrics["repetition"] = {"generated": repetition(generated), "reference": repetition(references)}
    metrics["continuations"] = {"positions": len(points), "context_tokens": args.context_tokens,
                                "new_tokens": args.new_tokens, "retrieval_index": args.retrieval_index or None, **gen}

    out = Path(args.output_dir)
    write_jsonl_atomic(out / "continuations.jsonl", [
        {"position": p, "context_tail": s.prompt[-100:], "generated": g, "reference": r}
        for p, s, g, r in zip(points, samples, generated, references)])
    write_json_atomic(out / "metrics.json", metrics)
    print(f"\nwrote {out / 'metrics.json'} and {out / 'continuations.jsonl'}\n\n{table(metrics)}")


if __name__ == "__main__":
    main()
