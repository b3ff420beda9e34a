"""The JSON the page reads: the runs list, one run's details, eval predictions, and a comparison of runs.

Every function takes run ids (see :mod:`easysft.dashboard.runs`) and returns plain JSON-ready dicts (NaN/inf
already replaced by None). Files are read on each call (they change while a run trains); metrics.jsonl goes
through the shared incremental :class:`~easysft.dashboard.runs.MetricsCache`.
"""

from __future__ import annotations

import json
from pathlib import Path

from easysft.dashboard.runs import (
    DATA_REPORT,
    METRICS,
    PREDICTIONS,
    TRAIN_CONFIG,
    MetricsCache,
    NotFound,
    Roots,
    checkpoints,
    finite,
    parse_jsonl_line,
    prediction_steps,
    read_json,
    resolve_inside,
    summarize,
)

MAX_PREDICTION_ROWS = 500
# Keys of eval records that are bookkeeping, not curves.
NOT_CURVES = {"step", "epoch", "eval_num_tokens", "event"}


class Api:
    def __init__(self, roots: Roots) -> None:
        self.roots = roots
        self.cache = MetricsCache()

    def runs(self) -> list[dict]:
        return [summarize(run_id, folder, self.cache) for run_id, folder in self.roots.discover()]

    def summary(self, run_id: str) -> dict:
        return summarize(run_id, self.roots.run_folder(run_id), self.cache)

    def metrics(self, run_id: str, start: int = 0) -> list[dict]:
        """Records of the run's metrics.jsonl from index ``start`` on (malformed lines already skipped)."""
        return self.cache.records(self.roots.run_folder(run_id) / METRICS)[start:]

    def run(self, run_id: str) -> dict:
        from easysft.dashboard.chat_host import model_choices

        folder = self.roots.run_folder(run_id)
        return {
            "summary": summarize(run_id, folder, self.cache),
            "config": finite(read_json(folder / TRAIN_CONFIG)),
            "data_report": finite(read_json(folder / DATA_REPORT)) or None,
            "checkpoints": checkpoints(folder),
            "prediction_steps": prediction_steps(folder),
            "chat_models": model_choices(folder),
        }

    def predictions(self, run_id: str, step: int) -> dict:
        """Rows of ``eval_predictions/step-N.jsonl`` (prompt, reference, prediction; malformed lines skipped)."""
        path = self.roots.run_folder(run_id) / PREDICTIONS / f"step-{int(step)}.jsonl"
        if not path.is_file():
            raise NotFound(str(path))
        rows, total = [], 0
        with open(path, "rb") as handle:
            for line in handle:
                record = parse_jsonl_line(line) if line.strip() else None
                if record is None:
                    continue
                total += 1
                if len(rows) < MAX_PREDICTION_ROWS:
                    rows.append({k: _text(record.get(k)) for k in ("prompt", "reference", "prediction")})
        return {"step": int(step), "rows": rows, "total": total}

    def run_file(self, run_id: str, relative: str) -> Path:
        """A file inside the run's folder (e.g. loss.png); Forbidden for paths leading out of it."""
        path = resolve_inside(self.roots.run_folder(run_id), relative)
        if not path.is_file():
            raise NotFound(relative)
        return path

    def compare(self, run_ids: list[str]) -> dict:
        """Each run's records, and the config keys whose values differ between the runs."""
        runs, configs = [], []
        for run_id in run_ids:
            folder = self.roots.run_folder(run_id)
            runs.append({"id": run_id, "name": folder.name, "records": self.metrics(run_id)})
            configs.append(read_json(folder / TRAIN_CONFIG))
        return {"runs": runs, "config_diff": config_diff(configs)}


def _text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def config_diff(configs: list[dict]) -> list[dict]:
    """``[{"key", "values": [one per config, None where absent]}]`` for keys not equal across all configs (a key
    absent from one config differs from one set to null: a flag added in a later version shows up)."""
    keys = sorted(set().union(*configs)) if configs else []
    out = []
    for key in keys:
        seen = {json.dumps([key in c, c.get(key)], sort_keys=True, default=str) for c in configs}
        if len(seen) > 1:
            out.append({"key": key, "values": [finite(c.get(key)) for c in configs]})
    return out


def static_file(folder: Path, name: str) -> Path:
    """A file shipped in ``easysft/dashboard/static`` (flat: no subfolders, no escapes)."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise NotFound(name)
    path = folder / name
    if not path.is_file():
        raise NotFound(name)
    return path
