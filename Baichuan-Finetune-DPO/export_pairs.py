"""Turn the web demo's ratings into preference pairs ({prompt, chosen, rejected} JSON lines) and say what was kept.

    python Baichuan-Finetune-DPO/export_pairs.py --ratings output/web_demo/ratings.sqlite --output data/pairs.jsonl
    python Baichuan-Finetune-DPO/export_pairs.py --by 文风 ...      # the response scored higher on one axis

ds_finetune.sh also reads ratings.sqlite directly (DATA=...sqlite BY=...); exporting first lets you read, edit or
merge the pairs with others. Each line keeps which models wrote the two responses and the votes behind the choice.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.training.preference_data import describe_counts, rating_pairs
from novelkit.errors import exit_on_error
from novelkit.evaluation.ratings import AXES
from novelkit.outputs import write_jsonl_atomic


@exit_on_error
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratings", default="output/web_demo/ratings.sqlite", help="web_demo.py's --ratings_db")
    p.add_argument("--by", default="overall", help=f"overall (the rater's choice) or one axis: {', '.join(AXES)}")
    p.add_argument("--output", default="output/dpo_pairs.jsonl")
    args = p.parse_args()

    pairs, counts = rating_pairs(args.ratings, args.by)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(args.output, pairs)
    print(f"{args.output}: {describe_counts(counts, args.by)}")


if __name__ == "__main__":
    main()
