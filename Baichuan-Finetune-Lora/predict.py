"""Generate for a dev file with a base model (+ LoRA adapter), then score the responses with ROUGE.

Writes <output_dir>/predictions.jsonl (each input record plus "response") and <output_dir>/metrics.json, and prints
the ROUGE table. Run through run_predict.sh, or directly:
    python Baichuan-Finetune-Lora/predict.py --lora_model output/lora --data data_examples/sft/dev.jsonl
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.errors import exit_on_error
from novelkit.formats import detect_format, to_sample
from novelkit.generation import generate_responses, generation_kwargs
from novelkit.loading import adapter_base_path, load_model, load_tokenizer
from novelkit.outputs import write_json_atomic, write_jsonl_atomic
from novelkit.readers import iter_records
from novelkit.rouge import corpus_rouge, rouge_table
from novelkit.templates import default_template_name, get_template


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="", help="base model folder; empty = the adapter's base, else the default")
    p.add_argument("--lora_model", default="", help="PEFT adapter folder; empty = the base model alone")
    p.add_argument("--data", default="data_examples/sft/dev.jsonl")
    p.add_argument("--format", default="", help="data format; empty = detected")
    p.add_argument("--template", default="", help="chat template; empty = the model's own")
    p.add_argument("--output_dir", default="", help="where results go; default: the adapter folder")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--dtype", default="auto")
    return p.parse_args()


@exit_on_error
def main():
    args = parse_args()
    model_path = args.model_path or (adapter_base_path(args.lora_model) if args.lora_model else "")
    out_dir = Path(args.output_dir or args.lora_model or "output/predict")

    model = load_model(model_path, dtype=args.dtype, adapter=args.lora_model or None)
    tokenizer = load_tokenizer(model_path)
    template_name = args.template or default_template_name(tokenizer, model.config)
    template = get_template(template_name)

    records = list(iter_records(args.data))
    fmt = args.format or detect_format(records[0])
    samples = [to_sample(r, fmt) for r in records]
    gen = generation_kwargs(model, max_new_tokens=args.max_new_tokens or 256, do_sample=args.do_sample or None,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty)
    print(f"[predict] {len(samples)} samples from {args.data} ({fmt}), template {template_name}, {gen}", flush=True)

    start = time.time()
    responses = generate_responses(model, tokenizer, template, samples, batch_size=args.batch_size, **gen)
    seconds = time.time() - start
    write_jsonl_atomic(out_dir / "predictions.jsonl", [{**r.data, "response": t} for r, t in zip(records, responses)])

    scored = [(resp, s.response) for resp, s in zip(responses, samples) if s.response]
    metrics = {"samples": len(samples), "scored": len(scored), "generation_seconds": round(seconds, 2)}
    if scored:
        hyps, refs = zip(*scored)
        for definition in ("rouge-chinese", "standard"):
            for level in ("word", "char"):
                metrics[f"{definition}/{level}"] = corpus_rouge(list(hyps), list(refs), level=level,
                                                                 definition=definition)
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(f"\nwrote {out_dir / 'predictions.jsonl'} and {out_dir / 'metrics.json'}")
    if scored:
        print("\nROUGE (rouge-chinese definition, jieba words):\n")
        print(rouge_table(metrics["rouge-chinese/word"]))


if __name__ == "__main__":
    main()
