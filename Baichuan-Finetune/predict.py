"""Generate with a fine-tuned model: a data file (predictions.jsonl, metrics.json with ROUGE, a submission file) or
interactively with streaming output.

Run through run_predict.sh, or directly:
    python Baichuan-Finetune/predict.py --model_path output/full --data data/csl/dev.json --output_dir output/full
    python Baichuan-Finetune/predict.py --model_path output/full --interactive --with_prompt
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
