"""What did training do: loss, eval loss, perplexity and learning-rate curves of one or more runs, on shared plots.

Each run is an output folder (TensorBoard event files anywhere below it, else its latest trainer_state.json), an
events.out.tfevents.* file, or a trainer_state.json. Writes <output_dir>/report.md, report.json and one PNG per
metric. Run through run_analysis.sh, or directly:
    python Baichuan-Analysis/analyze_logs.py --runs output/lora output/lora-r16 --output_dir output/analysis/logs
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.analysis.plots import curves
from novelkit.analysis.report import table, write_report
from novelkit.analysis.runlogs import read_runs
from novelkit.errors import DataError, exit_on_error

PLOTS = {  # file: (metric, title, y label, log scale)
    "loss.png": ("loss", "Training loss", "loss", False),
    "eval_loss.png": ("eval_loss", "Evaluation loss", "eval loss", False),
    "learning_rate.png": ("learning_rate", "Learning rate", "learning rate", False),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["output/lora"], help="run folders, event files or trainer_state.json")
    p.add_argument("--output_dir", default="output/analysis/logs")
    return p.parse_args()


def perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 50 else None  # past e^50 the number says nothing but "diverged"


def summary(run) -> dict:
    """Final and best values of one run."""
    steps, loss = run.series("loss")
    eval_steps, eval_loss = run.series("eval_loss")
    _, lr = run.series("learning_rate")
    out = {"run": run.name, "source": run.source, "last_step": max((max(v) for v in run.metrics.values() if v),
                                                                   default=0),
           "final_loss": loss[-1] if loss else None, "min_loss": min(loss) if loss else None,
           "final_perplexity": perplexity(loss[-1]) if loss else None, "final_learning_rate": lr[-1] if lr else None}
    if eval_loss:
        best = min(range(len(eval_loss)), key=eval_loss.__getitem__)
        out.update(best_eval_loss=eval_loss[best], best_eval_step=eval_steps[best], final_eval_loss=eval_loss[-1],
                   best_eval_perplexity=perplexity(eval_loss[best]))
    return out


@exit_on_error
def main():
    args = parse_args()
    runs = read_runs(args.runs)
    if not any(run.series("loss")[0] or run.series("eval_loss")[0] for run in runs):
        raise DataError(args.runs[0], None, "no loss logged in any run (is logging_steps larger than the run?)")
    print(f"[logs] {len(runs)} run(s): " + ", ".join(f"{r.name} ({r.source})" for r in runs), flush=True)

    figures = {}
    for file, (metric, title, ylabel, logy) in PLOTS.items():
        series = {r.name: r.series(metric) for r in runs if r.series(metric)[0]}
        if series:
            figures[file] = curves(series, title, "step", ylabel, logy)
    # perplexity = exp(mean token cross-entropy), training and evaluation of every run on one plot
    ppl = {}
    for r in runs:
        for metric, label in (("loss", "train"), ("eval_loss", "eval")):
            steps, values = r.series(metric)
            points = [(s, perplexity(v)) for s, v in zip(steps, values) if perplexity(v) is not None]
            if points:
                ppl[f"{r.name} ({label})"] = ([s for s, _ in points], [p for _, p in points])
    if ppl:
        figures["perplexity.png"] = curves(ppl, "Perplexity = exp(loss)", "step", "perplexity", logy=True)

    rows = [summary(r) for r in runs]
    data = {"runs": rows, "curves": {r.name: r.metrics for r in runs}, "plots": list(figures)}
    columns = ["run", "last_step", "final_loss", "final_perplexity", "best_eval_loss", "best_eval_step",
               "final_eval_loss", "best_eval_perplexity", "final_learning_rate"]
    md = "\n\n".join([
        "# Training logs report",
        table(["run", "read from"], [[r["run"], r["source"]] for r in rows]),
        "## Summary\n\n" + table(columns, [[r.get(c, "-") if r.get(c) is not None else "-" for c in columns]
                                          for r in rows]),
        "Perplexity is exp(loss), the loss being the mean cross-entropy per predicted token (nats).",
        *[f"![{name}]({name})" for name in figures],
    ])
    for f in write_report(args.output_dir, md, data, figures):
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
