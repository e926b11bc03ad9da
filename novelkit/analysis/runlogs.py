"""Training curves of a run from its TensorBoard event files or a transformers trainer_state.json.

Metric names follow trainer_state.json: `loss`, `eval_loss`, `learning_rate`, `grad_norm`, `epoch` … (TensorBoard's
`train/loss` becomes `loss`, `eval/loss` becomes `eval_loss`). A run resumed from a checkpoint writes a new event file;
all of a run's files are merged in time order, the later value winning at a step logged twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

EVENTS_GLOB = "events.out.tfevents.*"
STATE_FILE = "trainer_state.json"


@dataclass
class Run:
    name: str
    source: str  # the files the curves were read from, for the report
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {step: value}

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        points = sorted(self.metrics.get(metric, {}).items())
        return [s for s, _ in points], [v for _, v in points]


def _metric_name(tag: str) -> str:
    prefix, _, name = tag.partition("/")
    if not name:
        return tag
    return name if prefix == "train" else f"{prefix}_{name}"


def read_events(files: list[Path]) -> dict[str, dict[int, float]]:
    """Scalars of TensorBoard event files, merged by wall time."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    points = []
    for f in files:
        events = EventAccumulator(str(f), size_guidance={SCALARS: 0})
        try:
            events.Reload()
        except Exception as e:  # a truncated or foreign file: say which one
            raise DataError(f, None, f"cannot read TensorBoard events: {e}") from e
        for tag in events.Tags()["scalars"]:
            points += [(e.wall_time, _metric_name(tag), e.step, e.value) for e in events.Scalars(tag)]
    metrics: dict[str, dict[int, float]] = {}
    for _, name, step, value in sorted(points):
        metrics.setdefault(name, {})[step] = value
    return metrics


def read_trainer_state(path: Path) -> dict[str, dict[int, float]]:
    """Scalars of trainer_state.json's log_history (the end-of-training summary, with no step of its own, included
    at the final step)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        history = state["log_history"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(path, None, f"not a trainer_state.json with a log_history: {e}") from None
    metrics: dict[str, dict[int, float]] = {}
    for entry in history:
        step = entry.get("step", state.get("global_step", 0))
        for name, value in entry.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(name, {})[step] = float(value)
    return metrics


def _latest_state(folder: Path) -> Path | None:
    """The trainer_state.json with the most steps: the folder's own or its newest checkpoint-N's."""
    candidates = [folder / STATE_FILE, *folder.glob(f"checkpoint-*/{STATE_FILE}")]
    found = [p for p in candidates if p.is_file()]

    def steps(p: Path) -> int:
        m = re.fullmatch(r"checkpoint-(\d+)", p.parent.name)
        return int(m.group(1)) if m else 1 << 62  # a state saved at the end of training is the latest
    return max(found, key=steps) if found else None


def read_run(path, name: str | None = None) -> Run:
    """A run from a folder (its event files anywhere below, else its latest trainer_state.json), an event file, or a
    trainer_state.json."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "not found")
    name = name or (path.name if path.is_dir() else path.parent.name)
    if path.is_file():
        if path.name == STATE_FILE or path.suffix == ".json":
            return Run(name, str(path), read_trainer_state(path))
        if path.name.startswith("events.out.tfevents."):
            return Run(name, str(path), read_events([path]))
        raise DataError(path, None, f"expected a folder, an {EVENTS_GLOB} file or a {STATE_FILE}")
    events = sorted(path.rglob(EVENTS_GLOB))
    if events:
        metrics = read_events(events)
        if metrics:
            return Run(name, ", ".join(str(e.relative_to(path)) for e in events), metrics)
    state = _latest_state(path)
    if state is None:
        raise DataError(path, None, f"no TensorBoard event files ({EVENTS_GLOB}) or {STATE_FILE} in this folder")
    return Run(name, str(state), read_trainer_state(state))


def read_runs(paths) -> list[Run]:
    """Runs named after their folders; a name used twice gets the path instead."""
    runs = [read_run(p) for p in paths]
    names = [r.name for r in runs]
    for run, path in zip(runs, paths):
        if names.count(run.name) > 1:
            run.name = str(path)
    return runs
