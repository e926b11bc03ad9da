"""Generate with a QLoRA adapter: a data file (predictions.jsonl, metrics.json with ROUGE, a submission file) or
interactively with streaming output. The QLoRA seed's flags work as they did:

    python Baichuan-Finetune-QLora/predict.py --base_model /models/Baichuan2-7B-Base --lora_model output/qlora \
        --load_in_4bit --interactive --with_prompt
    python Baichuan-Finetune-QLora/predict.py --lora_model output/qlora --data_file data/csl/dev.json \
        --predictions_file output/qlora/predictions.jsonl --only_cpu
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
