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
    MAX_JSONL_BYTES,
    METRICS,
    PREDICTIONS,
    TRAIN_CONFIG,
    MetricsCache,
    NotFound,
    Roots,
    checkpoints,
    finite,
    open_inside,
    parse_jsonl_line,
    prediction_steps,
    read_inside,
    read_json,
    summarize,
    unreadable,
)

MAX_PREDICTION_ROWS = 500
MAX_SERVED_BYTES = 64 << 20  # /api/file
# Keys of eval records that are bookkeeping, not curves.
NOT_CURVES = {"step", "epoch", "eval_num_tokens", "event"}


class Api:
    def __init__(self, roots: Roots) -> None:
        self.roots = roots
        self.cache = MetricsCache()

    def runs(self) -> list[dict]:
        """One row per run; a run whose files cannot be read (whatever the exception) is listed as unreadable
        instead of failing the whole list."""
        rows = []
        for run_id, folder in self.roots.discover():
            try:
                rows.append(summarize(run_id, folder, self.cache))
            except Exception as exc:  # noqa: BLE001 -- RecursionError from deep JSON, refused files, ...
                rows.append(unreadable(run_id, folder, exc))
        return rows

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
        relative = f"{PREDICTIONS}/step-{int(step)}.jsonl"
        try:
            handle = open_inside(self.roots.run_folder(run_id), relative, MAX_JSONL_BYTES)
        except OSError:
            raise NotFound(relative) from None
        rows, total, read = [], 0, 0
        with handle:
            for line in handle:
                read += len(line)
                if read > MAX_JSONL_BYTES:  # grew past the cap since it was opened
                    break
                record = parse_jsonl_line(line) if line.strip() else None
                if record is None:
                    continue
                total += 1
                if len(rows) < MAX_PREDICTION_ROWS:
                    rows.append({k: _text(record.get(k)) for k in ("prompt", "reference", "prediction")})
        return {"step": int(step), "rows": rows, "total": total}

    def run_file(self, run_id: str, relative: str) -> bytes:
        """The bytes of a file inside the run's folder (e.g. loss.png): Forbidden for paths leading out of it,
        Refused for anything but a regular file of at most :data:`MAX_SERVED_BYTES`."""
        try:
            return read_inside(self.roots.run_folder(run_id), relative, MAX_SERVED_BYTES)
        except OSError:
            raise NotFound(relative) from None

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
