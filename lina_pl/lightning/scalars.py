"""Scalars read back from a run's TensorBoard event files.

The ablation table and the inspection notebook both read a finished run's numbers from the same place the
researcher looks at (TensorBoard), so what they report is exactly what was logged, never recomputed.
"""

from __future__ import annotations

from pathlib import Path


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``run_dir`` (searched recursively for event files) -> its ``(step, value)``
    points in step order. Several event files (a resumed run) are merged; a later file wins a repeated
    step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(
            f"no TensorBoard event files under {run_dir}: is it a run directory (trainer.default_root_dir)?"
        )
    series: dict[str, dict[int, float]] = {}
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            points = series.setdefault(tag, {})
            for event in events.Scalars(tag):
                points[int(event.step)] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in series.items()}


def last_scalars(run_dir: str | Path) -> dict[str, float]:
    """Each scalar tag's value at its last logged step."""
    return {tag: points[-1][1] for tag, points in read_scalars(run_dir).items() if points}
