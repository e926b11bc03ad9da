"""Prediction for a data file: batched generation, a predictions file that survives kills, ROUGE, a submission file.

predictions.jsonl holds one line per input record: the record's fields plus "index" (its position in the data file)
and "response". Prompts are sorted by length and cut into fixed batches (left padding); each finished batch is
appended and fsynced, so a kill loses at most the batch in flight. A rerun reconciles the file (a torn last line is
dropped, every line is checked against the data) and generates only the missing records, in the same batches as an
uninterrupted run, so the result is the same. Several processes (run_predict.sh with NUM_GPUS, one per GPU) split
the records and write a part each (PredictionLog); a killed run resumes on any number of processes. At the end the
file is rewritten in input order, and metrics.json gets ROUGE-1/2/L P/R/F (both definitions, jieba words and
characters), entity-level P/R/F1 when the references are NER answers (`实体_类型` lines), the markdown table, and
what copying the input scores on the same references (`baselines`: lead-N and the whole source document; `verdict`:
does the model beat them).

Submission mode (--submit_file): the test file's records ({instruction, input, output: ""} lines) come back with
their response field filled, in input order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..data.formats import Sample, detect_format, to_sample
from ..data.readers import iter_records
from ..data.templates import default_template_name, get_template
from ..errors import ConfigError, DataError
from ..generation.batch import generate_each, generation_kwargs
from ..models.loading import adapter_base_path, load_model, load_tokenizer
from ..outputs import write_json_atomic, write_jsonl_atomic
from .ner_metrics import entity_scores, is_ner_answer
from .rouge import DEFINITIONS, LEVELS, METRICS, corpus_rouge, rouge_l_f, rouge_table
from ..shards import gather_to_first, process_shard, start_shards, stop_shards

RESPONSE_FIELDS = {"alpaca": "output", "instruct": "answer", "input_label": "label"}  # filled in submission mode


def prediction_parser(description: str) -> argparse.ArgumentParser:
    """The flags every predict.py takes; the QLoRA seed's names (--base_model, --data_file …) are aliases."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model_path", "--base_model", default="",
                   help="model folder; empty = the adapter's recorded base, else the embedded default")
    p.add_argument("--lora_model", default="", help="PEFT adapter folder; empty = the model alone")
    p.add_argument("--tokenizer_path", default="", help="tokenizer folder; empty = the model's")
    p.add_argument("--data", "--data_file", default="data_examples/sft/dev.jsonl", help="records to generate for")
    p.add_argument("--format", default="", help="data format; empty = detected")
    p.add_argument("--template", default="", help="chat template; empty = the model's own")
    p.add_argument("--output_dir", default="", help="where results go; default: the adapter folder, else "
                                                    "output/predict")
    p.add_argument("--predictions_file", default="", help="default: <output_dir>/predictions.jsonl; metrics.json "
                                                          "is written beside it")
    p.add_argument("--submit_file", default="", help="submission mode: write the data's records with the response "
                                                     "field filled to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --submit_file")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the model's generation_config, "
                                                                     "else 256")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None, help="above 1 discourages every token already "
                                                                          "seen, the prompt's included")
    p.add_argument("--encoder_repetition_penalty", type=float, default=None,
                   help="above 1 favours the prompt's tokens only (a copy bias for summaries and titles)")
    p.add_argument("--no_prompt_penalty", action="store_true",
                   help="the repetition penalty counts generated tokens only (against loops, not against copying)")
    p.add_argument("--mbr", type=int, default=1, metavar="N",
                   help="choose each response among N candidates, the greedy one and N - 1 samples (--temperature, "
                        "--top_p, --top_k), by minimum Bayes risk: the candidate with the highest mean character "
                        "ROUGE-L F against the others (for titles and summaries; N times the generation)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--load_in_4bit", action="store_true", help="load the model in NF4 (bitsandbytes), as QLoRA "
                                                               "trained it")
    p.add_argument("--only_cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--interactive", action="store_true", help="type prompts, see responses stream")
    p.add_argument("--with_prompt", action="store_true", help="interactive: wrap what you type in the chat "
                                                              "template (else the model continues the raw text)")
    p.add_argument("--retrieval_index", default="", help="Baichuan-Embedding index: put a 前情提要 block of related "
                                                         "earlier passages before each prompt; empty = none")
    p.add_argument("--retrieval_k", type=int, default=4, help="passages retrieved per sample")
    p.add_argument("--retrieval_tokens", type=int, default=512, help="token budget of the 前情提要 block")
    return p


def load_for_prediction(args):
    """(model, tokenizer, template) for the flags: base model, optional adapter (checked to fit), 4-bit or not."""
    model_path = args.model_path or (adapter_base_path(args.lora_model) if args.lora_model else "")
    device = "cpu" if args.only_cpu else None
    if process_shard()[1] > 1:
        if args.interactive:
            raise ConfigError("--interactive runs in one process: NUM_GPUS=1 bash run_predict.sh --interactive")
        start_shards(use_gpu=not args.only_cpu)  # this process's GPU before the model goes to "cuda"
    adapter = args.lora_model or None
    if args.load_in_4bit:
        from ..models.quantization import load_4bit_model

        model = load_4bit_model(model_path, device=device, adapter=adapter)
    else:
        model = load_model(model_path, dtype=args.dtype, device=device, adapter=adapter)
    model.eval()
    tokenizer = load_tokenizer(args.tokenizer_path or model_path)
    name = args.template or default_template_name(tokenizer, model.config)
    print(f"[predict] model {model_path or 'default'}{f' + adapter {adapter}' if adapter else ''}, template {name}",
          flush=True)
    return model, tokenizer, get_template(name)


def generation_settings(model, args) -> dict:
    """The model's generation_config.json, overridden by the flags given."""
    gen = generation_kwargs(model, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample or args.mbr > 1 or None,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty,
                            encoder_repetition_penalty=args.encoder_repetition_penalty,
                            penalize_prompt=False if args.no_prompt_penalty else None)
    gen.setdefault("max_new_tokens", 256)  # transformers' own default would stop at 20 tokens
    if args.mbr > 1:
        gen["mbr"] = args.mbr
    return gen


def read_data(path, fmt: str = ""):
    """(records, samples, format) of a data file, the format detected from the first record unless given."""
    records = list(iter_records(path))
    fmt = fmt or detect_format(records[0])
    return records, [to_sample(r, fmt) for r in records], fmt


class PredictionLog:
    """predictions.jsonl as the record of what is done: reconciled on open, appended batch by batch.

    Several processes (`shard` = (rank, world size)) split the records by index (record i is rank i % world's) and
    each appends to its own `predictions.jsonl.parts/part-RANK.jsonl`; what any file holds, the main file's or a part's
    of a run on any number of processes, counts as done, so a killed run resumes on any number of processes with no
    record lost or written twice. `finish` merges everything into the main file, in input order."""

    def __init__(self, path, records, shard: tuple[int, int] = (0, 1)):
        self.path, self.records = Path(path), records
        self.rank, self.world = shard
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.own = self.path if self.world == 1 else self.parts / f"part-{self.rank}.jsonl"
        self.done: dict[int, dict] = {}
        for other in self._files():
            if other != self.own:  # another process may be appending to it: read, never rewrite
                for index, row in self._read(other)[0].items():
                    self.done.setdefault(index, row)
        if self.own.exists():
            self._reconcile()
        if self.done:
            print(f"[predict] {self.path}: {len(self.done)} of {len(records)} records already done", flush=True)

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def row(self, index: int, response: str) -> dict:
        return {**self.records[index].data, "index": index, "response": response}

    def _files(self) -> list[Path]:
        return [f for f in [self.path, *sorted(self.parts.glob("part-*.jsonl"))] if f.exists()]

    def _read(self, path: Path) -> tuple[dict[int, dict], bool, str]:
        """(rows by index, a torn last line seen, the text) of one file; a bad line is a DataError naming it."""
        text = path.read_bytes().decode("utf-8", errors="replace")
        pieces = text.split("\n")
        rows: dict[int, dict] = {}
        torn = False
        for number, line in enumerate(pieces, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(pieces):  # no newline after it: the write in flight when the run was killed
                    torn = True
                    continue
                raise DataError(path, number, "not a JSON line; delete the file or choose another output")
            index = row.get("index") if isinstance(row, dict) else None
            if not (isinstance(index, int) and 0 <= index < len(self.records) and isinstance(row.get("response"), str)
                    and row == self.row(index, row["response"])):
                raise DataError(path, number, f"does not match record {index} of {self.records[0].path}: the "
                                              "file was written for other data; delete it or choose another output")
            rows.setdefault(index, row)
        return rows, torn, text

    def _reconcile(self) -> None:
        rows, torn, text = self._read(self.own)
        rows = {i: r for i, r in rows.items() if i not in self.done}  # already in another file: not twice
        if text != "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()):
            write_jsonl_atomic(self.own, list(rows.values()))  # appends must start on a clean line
        self.done.update(rows)
        if torn:
            print(f"[predict] {self.own}: a torn last line dropped", flush=True)

    def append(self, rows: list[dict]) -> None:
        self.own.parent.mkdir(parents=True, exist_ok=True)
        with open(self.own, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            self.done[row["index"]] = row

    def finish(self) -> list[str]:
        """Every file merged into the main one in input order (the parts removed after); the responses in that
        order. With several processes, rank 0 calls it once all have finished."""
        done = dict(self.done)  # what this process wrote or saw at the start; the others' files may have grown since
        for path in self._files():
            if path != self.own:
                for index, row in self._read(path)[0].items():
                    done.setdefault(index, row)
        missing = [i for i in range(len(self.records)) if i not in done]
        if missing:
            raise ConfigError(f"{self.path}: records {missing[:5]} have no prediction after every process finished")
        rows = [done[i] for i in range(len(self.records))]
        write_jsonl_atomic(self.path, rows)
        if self.parts.exists():
            for part in self.parts.glob("part-*.jsonl"):
                part.unlink()
            self.parts.rmdir()
        return [r["response"] for r in rows]


def choose_by_consensus(candidates: list[str]) -> str:
    """Minimum Bayes risk: the candidate with the highest mean character ROUGE-L F against the others (the expected
    score if one of them were the reference), the first of equals."""
    chars = [list(c) for c in candidates]
    totals = [0.0] * len(chars)
    for i in range(len(chars)):
        for j in range(i + 1, len(chars)):  # the F is symmetric: each pair once
            f = rouge_l_f(chars[i], chars[j])
            totals[i] += f
            totals[j] += f
    return candidates[totals.index(max(totals))]


def generate_by_consensus(model, tokenizer, template, samples, on_response, mbr: int, *, batch_size: int,
                          **gen) -> None:
    """generate_each's on_response(index, response) with each response chosen among `mbr` candidates by
    choose_by_consensus: the decoding without sampling and mbr - 1 samples drawn with the sampling settings given.
    Two passes through the engine; the samples' pass decodes the samples repeated, continuously batched."""
    found: list[list[str]] = [[] for _ in samples]

    def collect(i, text):
        i %= len(samples)
        found[i].append(text)
        if len(found[i]) == mbr:
            on_response(i, choose_by_consensus(found[i]))

    plain = {k: v for k, v in gen.items() if k not in ("temperature", "top_p", "top_k")}
    generate_each(model, tokenizer, template, samples, collect, batch_size=batch_size, progress=False,
                  **{**plain, "do_sample": False})
    generate_each(model, tokenizer, template, list(samples) * (mbr - 1), collect, batch_size=batch_size,
                  progress=False, **{**gen, "do_sample": True})


def generate_missing(model, tokenizer, template, samples, log: PredictionLog, *, batch_size: int, mbr: int = 1,
                     **gen) -> int:
    """Generate this process's records that `log` lacks, each written to it as soon as it is finished. The engine
    gives every sequence its own cache slot and positions, so a response does not depend on which records share its
    batch (tests/test_engine.py: the same tokens alone and batched): a resumed or split run gives the uninterrupted
    run's result."""
    mine = [i for i in range(len(samples)) if log.mine(i)]
    missing = [i for i in mine if i not in log.done]
    with tqdm(total=len(mine), initial=len(mine) - len(missing), desc="predict",
              position=log.rank) as bar:
        def record(k, response):
            log.append([log.row(missing[k], response)])
            bar.update(1)

        todo = [samples[i] for i in missing]
        if mbr > 1:
            generate_by_consensus(model, tokenizer, template, todo, record, mbr, batch_size=batch_size, **gen)
        else:
            generate_each(model, tokenizer, template, todo, record, batch_size=batch_size, progress=False, **gen)
    return len(missing)


def score_responses(responses: list[str], references: list[str]) -> dict:
    """ROUGE under both definitions on words and characters, over the pairs with a reference; entity-level scores
    too when every reference is an NER answer."""
    pairs = [(h, r) for h, r in zip(responses, references) if r.strip()]
    scores: dict = {"scored": len(pairs)}
    if not pairs:
        return scores
    hyps, refs = (list(x) for x in zip(*pairs))
    for definition in DEFINITIONS:
        for level in LEVELS:
            scores[f"{definition}/{level}"] = corpus_rouge(hyps, refs, level=level, definition=definition)
    if all(is_ner_answer(r) for r in refs):
        scores["ner"] = entity_scores(hyps, refs)
    return scores


def score_baselines(samples, references: list[str]) -> dict:
    """What copying the input scores on the same references: lead-N (the first N characters of each sample's source
    text, N = the references' median length in characters) and the whole source. A model that does not beat these
    has learned less than copying."""
    pairs = [(s.source, r) for s, r in zip(samples, references) if r.strip()]
    if not pairs:
        return {}
    n = int(statistics.median(len(r.strip()) for _, r in pairs))
    baselines = {}
    for name, hyps in ((f"lead-{n}", [src[:n] for src, _ in pairs]), ("source", [src for src, _ in pairs])):
        baselines[name] = {f"{d}/{level}": corpus_rouge(hyps, [r for _, r in pairs], level=level, definition=d)
                           for d in DEFINITIONS for level in LEVELS}
    return baselines


def baseline_table(metrics: dict) -> str:
    """The model's ROUGE F beside the copying baselines', in words (jieba) and characters (rouge-chinese)."""
    columns = [(level, m) for level in ("word", "char") for m in METRICS]
    lines = ["| | " + " | ".join(f"{m} F ({'words' if level == 'word' else 'chars'})" for level, m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    rows = [("model", metrics)] + [(f"{name} (copy the input)" if name == "source" else
                                    f"{name} (copy its first {name[5:]} characters)", scores)
                                   for name, scores in metrics["baselines"].items()]
    for name, scores in rows:
        lines.append(f"| {name} | " + " | ".join(f"{scores[f'rouge-chinese/{level}'][m]['f'] * 100:.2f}"
                                               for level, m in columns) + " |")
    return "\n".join(lines)


def baseline_verdict(metrics: dict) -> str:
    """One line: does the model beat the best copying baseline on ROUGE-L F (characters)?"""
    model = metrics["rouge-chinese/char"]["rouge-l"]["f"]
    name, best = max(((n, b["rouge-chinese/char"]["rouge-l"]["f"]) for n, b in metrics["baselines"].items()),
                     key=lambda x: x[1])
    gap = (model - best) * 100
    return (f"the model {'beats' if gap > 0 else 'does NOT beat'} copying ({name}) by {gap:+.2f} points of "
            f"ROUGE-L F (characters): {model * 100:.2f} against {best * 100:.2f}")


def check_submission(path: str, fmt: str, overwrite: bool) -> str:
    """The field to fill; refuses to replace an existing file unless asked (checked before any generation)."""
    if fmt not in RESPONSE_FIELDS:
        raise ConfigError(f"submission mode needs records with one response field "
                          f"({', '.join(f'{k}: {v}' for k, v in RESPONSE_FIELDS.items())}); the data is '{fmt}'")
    if Path(path).exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it")
    return RESPONSE_FIELDS[fmt]


def predict_file(model, tokenizer, template, args, records=None, samples=None, fmt: str = "") -> dict:
    """The data-file mode: predictions.jsonl, metrics.json (and submit file), printed table; returns the metrics.
    `records`/`samples` default to the --data file's; a caller may pass them (e.g. with prompts augmented)."""
    if records is None:
        records, samples, fmt = read_data(args.data, args.format)
    if args.retrieval_index:  # a record's `book` and `position` fields keep later passages out
        from ..retrieval.recap import Retriever, add_recaps

        samples = add_recaps(samples, records, Retriever(args.retrieval_index), tokenizer, k=args.retrieval_k,
                             token_budget=args.retrieval_tokens)
        print(f"[predict] 前情提要 from {args.retrieval_index}: {args.retrieval_k} passages, "
              f"at most {args.retrieval_tokens} tokens", flush=True)
    out_dir = Path(args.output_dir or args.lora_model or "output/predict")
    predictions = Path(args.predictions_file) if args.predictions_file else out_dir / "predictions.jsonl"
    field = check_submission(args.submit_file, fmt, args.overwrite) if args.submit_file else None
    gen = generation_settings(model, args)
    print(f"[predict] {len(samples)} records from {args.data} ({fmt}), {gen}", flush=True)

    rank, world = start_shards(use_gpu=not args.only_cpu)
    if world > 1:
        print(f"[predict] process {rank} of {world}: records i with i % {world} == {rank}", flush=True)
    log = PredictionLog(predictions, records, shard=(rank, world))
    start = time.time()
    generated = generate_missing(model, tokenizer, template, samples, log, batch_size=args.batch_size, **gen)
    seconds = time.time() - start
    counts = gather_to_first(generated)  # also the wait: every part is complete after it
    stop_shards()
    if counts is None:
        return {}  # rank 0 merges, scores and prints
    generated = sum(counts)
    responses = log.finish()

    metrics = {"samples": len(samples), "generated": generated, "generation_seconds": round(seconds, 2),
               **score_responses(responses, [s.response for s in samples])}
    if "rouge-chinese/word" in metrics:
        metrics["table"] = rouge_table(metrics["rouge-chinese/word"])
        if "ner" not in metrics:  # copying the input is no answer to NER
            metrics["baselines"] = score_baselines(samples, [s.response for s in samples])
            metrics["baseline_table"], metrics["verdict"] = baseline_table(metrics), baseline_verdict(metrics)
    write_json_atomic(predictions.parent / "metrics.json", metrics)
    if field:
        write_jsonl_atomic(args.submit_file, [{**r.data, field: t} for r, t in zip(records, responses)])
        print(f"wrote {args.submit_file}")
    print(f"\nwrote {predictions} and {predictions.parent / 'metrics.json'}")
    if "table" in metrics:
        print("\nROUGE (rouge-chinese definition, jieba words):\n")
        print(metrics["table"])
    if "baselines" in metrics:
        print("\nAgainst copying the input (ROUGE F):\n")
        print(metrics["baseline_table"])
        print(f"\n{metrics['verdict']}")
    if "ner" in metrics:
        ner = metrics["ner"]
        print(f"\nentities: P {ner['precision'] * 100:.2f}  R {ner['recall'] * 100:.2f}  F1 {ner['f1'] * 100:.2f}  "
              f"exact match {ner['exact_match'] * 100:.2f}")
    return metrics


def interactive(model, tokenizer, template, args, read=input) -> None:
    """Prompts from the terminal, responses streamed as they are generated. An empty line or Ctrl-D ends."""
    from ..generation.worker import stream_generate
    from ..data.templates import encode_prompt, stop_token_ids

    if args.mbr > 1:
        raise ConfigError("--mbr chooses among finished responses: it does not apply to --interactive")
    gen = generation_settings(model, args)
    chat = template if args.with_prompt else get_template("plain")
    how = "wrapped in the chat template" if args.with_prompt else "continued as raw text (--with_prompt: chat)"
    print(f"Type a prompt and press Enter; it is {how}. An empty line or Ctrl-D ends.", flush=True)
    while True:
        try:
            text = read("Input: ")
        except EOFError:
            break
        if not text.strip():
            break
        print("Response: ", end="", flush=True)
        stream_generate(model, tokenizer, encode_prompt(tokenizer, chat, Sample(prompt=text, response="")),
                        stop_ids=stop_token_ids(tokenizer, chat), on_text=lambda t: print(t, end="", flush=True),
                        **gen)
        print(flush=True)
