"""Generate with a base model (+ LoRA adapter): a data file (predictions.jsonl, metrics.json with ROUGE, a submission
file) or interactively with streaming output.

Writes <output_dir>/predictions.jsonl (each input record plus "index" and "response"; a killed run resumes where it
stopped) and <output_dir>/metrics.json, and prints the ROUGE table. Run through run_predict.sh, or directly:
    python Baichuan-Finetune-DPO/predict.py --lora_model output/dpo --data data_examples/sft/dev.jsonl
    python Baichuan-Finetune-DPO/predict.py --lora_model output/dpo --interactive --with_prompt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.errors import exit_on_error
from novelkit.evaluation.prediction import interactive, load_for_prediction, prediction_parser, predict_file


@exit_on_error
def main():
    args = prediction_parser(__doc__.splitlines()[0]).parse_args()
    model, tokenizer, template = load_for_prediction(args)
    if args.interactive:
        interactive(model, tokenizer, template, args)
    else:
        predict_file(model, tokenizer, template, args)


if __name__ == "__main__":
    main()
