"""Render the benchmark blocks of ``docs/benchmarks.md`` and ``bench/results/*.md`` from ``bench/results/*.json``; or check them.

    python -m bench.readme_tables           # rewrite the docs/benchmarks.md blocks and the results .md files
    python -m bench.readme_tables --check   # exit 1 (and say which) when any of them differs from its JSON

A block is the text between ``<!-- BENCH:name -->`` and ``<!-- /BENCH:name -->`` in docs/benchmarks.md; :data:`BLOCKS`
says which results file and which renderer (:mod:`bench.tables`) make it. The suite runs the check
(``tests/unit/test_bench_accounting.py``), so a documented figure cannot drift from the results files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench.bench_lora import lora_table
from bench.tables import infer_markdown, lora_markdown, release_memory_markdown, train_markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "docs" / "benchmarks.md"  # the page holding the BENCH blocks (the README links to it)

# block name -> (results file stem, renderer)
BLOCKS = {
    "train": ("train", train_markdown),
    "lora": ("train", lora_markdown),
    "infer": ("infer", infer_markdown),
    "release_memory": ("release_memory", release_memory_markdown),
}
# results file stem -> (title of its .md, renderer)
RESULT_PAGES = {
    "train": ("easysft vs TRL SFTTrainer: training speed", train_markdown),
    "infer": ("Inference: easysft infer vs transformers generate (batch 1 and batched)", infer_markdown),
    "lora": ("LoRA vs full fine-tuning with easysft train (bench/bench_lora.py)", lora_table),
}


def load(stem: str) -> dict:
    return json.loads((RESULTS / f"{stem}.json").read_text(encoding="utf-8"))


def render_block(name: str) -> str:
    stem, render = BLOCKS[name]
    return render(load(stem))


def _block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- BENCH:{re.escape(name)} -->\n)(.*?)(<!-- /BENCH:{re.escape(name)} -->)", re.S)


def readme_blocks(text: str) -> dict[str, str]:
    """The current content of every BENCH block in ``text``."""
    return {name: m.group(2) for name in BLOCKS if (m := _block_pattern(name).search(text))}


def render_readme(text: str) -> str:
    """``text`` with every BENCH block it contains replaced by the block rendered from its results file."""
    for name in readme_blocks(text):
        text = _block_pattern(name).sub(lambda m, n=name: m.group(1) + render_block(n) + m.group(3), text)
    return text


def results_page(stem: str) -> str:
    """``bench/results/<stem>.md``; a training run saved under another name (``--results_name``) renders as one."""
    title, render = RESULT_PAGES.get(stem, (f"easysft vs TRL SFTTrainer: training speed ({stem})", train_markdown))
    return f"# {title}\n\n" + render(load(stem))


def write_results_markdown(stem: str) -> Path:
    """Write ``bench/results/<stem>.md`` from ``<stem>.json``; returns its path."""
    path = RESULTS / f"{stem}.md"
    path.write_text(results_page(stem), encoding="utf-8")
    return path


def rendered_pages() -> list[str]:
    """The results pages this script renders: :data:`RESULT_PAGES` and every saved training run (other benches,
    such as bench_data, write their own ``.md``)."""
    return sorted({*RESULT_PAGES, *(p.stem for p in RESULTS.glob("*.json") if _is_training_run(p))})


def _is_training_run(path: Path) -> bool:
    """A bench_train results file (saved under any --results_name); other benches write their own pages."""
    return "peak_gflops" in json.loads(path.read_text(encoding="utf-8"))


def differences() -> list[str]:
    """What differs from the results files: README blocks, missing blocks, and results .md files."""
    problems = []
    text = README.read_text(encoding="utf-8")
    current = readme_blocks(text)
    for name, (stem, _) in BLOCKS.items():
        have_json = (RESULTS / f"{stem}.json").exists()
        if name in current and not have_json:
            problems.append(f"docs/benchmarks.md block BENCH:{name} has no bench/results/{stem}.json to be rendered from")
        elif have_json and name not in current:
            problems.append(f"docs/benchmarks.md has no <!-- BENCH:{name} --> block for bench/results/{stem}.json")
        elif have_json and current[name] != render_block(name):
            problems.append(f"docs/benchmarks.md block BENCH:{name} differs from bench/results/{stem}.json")
    for stem in rendered_pages():
        json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
        if json_path.exists() and (not md_path.exists() or md_path.read_text(encoding="utf-8") != results_page(stem)):
            problems.append(f"bench/results/{stem}.md differs from {stem}.json")
        if md_path.exists() and not json_path.exists():
            problems.append(f"bench/results/{stem}.md has no {stem}.json to be rendered from")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when anything differs")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences()
        for problem in problems:
            print(f"bench.readme_tables: {problem}; run `python -m bench.readme_tables`", file=sys.stderr)
        return 1 if problems else 0
    text = README.read_text(encoding="utf-8")
    missing = [f"bench/results/{BLOCKS[name][0]}.json" for name in readme_blocks(text)
               if not (RESULTS / f"{BLOCKS[name][0]}.json").exists()]
    if missing:
        print(f"bench.readme_tables: missing {', '.join(sorted(set(missing)))}: run its benchmark first", file=sys.stderr)
        return 1
    for stem in rendered_pages():
        if (RESULTS / f"{stem}.json").exists():
            write_results_markdown(stem)
    README.write_text(render_readme(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
