"""Generate with a base model (+ LoRA adapter): a data file (predictions.jsonl, metrics.json with ROUGE, a submission
file) or interactively with streaming output.

Writes <output_dir>/predictions.jsonl (each input record plus "index" and "response"; a killed run resumes where it
stopped) and <output_dir>/metrics.json, and prints the ROUGE table. Run through run_predict.sh, or directly:
    python Baichuan-Finetune-Lora/predict.py --lora_model output/lora --data data_examples/sft/dev.jsonl
    python Baichuan-Finetune-Lora/predict.py --lora_model output/lora --interactive --with_prompt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.errors import exit_on_error
from novelkit.prediction import interactive, load_for_prediction, prediction_parser, predict_file, read_data
from novelkit.retrieval import Retriever, add_recaps


def parse_args():
    p = prediction_parser(__doc__.splitlines()[0])
    p.add_argument("--retrieval_index", default="", help="Baichuan-Embedding index: put a 前情提要 block of related "
                                                         "passages before each prompt; empty = none")
    p.add_argument("--retrieval_k", type=int, default=4, help="passages retrieved per sample")
    p.add_argument("--retrieval_tokens", type=int, default=512, help="token budget of the 前情提要 block")
    return p.parse_args()


@exit_on_error
def main():
    args = parse_args()
    model, tokenizer, template = load_for_prediction(args)
    if args.interactive:
        interactive(model, tokenizer, template, args)
        return
    records, samples, fmt = read_data(args.data, args.format)
    if args.retrieval_index:  # a record's `book` and `position` fields keep later passages out
        samples = add_recaps(samples, records, Retriever(args.retrieval_index), tokenizer, k=args.retrieval_k,
                             token_budget=args.retrieval_tokens)
        print(f"[predict] 前情提要 from {args.retrieval_index}: {args.retrieval_k} passages, "
              f"at most {args.retrieval_tokens} tokens", flush=True)
    predict_file(model, tokenizer, template, args, records, samples, fmt)


if __name__ == "__main__":
    main()
