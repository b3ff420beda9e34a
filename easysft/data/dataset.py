"""Examples -> tokenized samples with skip counts (MINIMAL VERSION; report, cache and validation are built
under issue 2)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from easysft.data.sources import load_examples
from easysft.data.templates import Template
from easysft.data.tokenize import Skip, tokenize_example
from easysft.errors import DataError


@dataclass
class PreparedData:
    """Tokenized train and eval samples (dicts with input_ids/labels), the data report and the template."""

    train: list[dict]
    eval: list[dict]
    report: dict = field(default_factory=dict)
    template: Template | None = None


def tokenize_examples(examples, tokenizer, data_cfg, template: Template) -> tuple[list[dict], Counter]:
    samples, skipped = [], Counter()
    for ex in examples:
        out = tokenize_example(
            tokenizer, ex.prompt, ex.answer, max_prompt_len=data_cfg.max_prompt_len,
            max_ans_len=data_cfg.max_ans_len, template=template, context=ex.context,
        )
        if isinstance(out, Skip):
            if data_cfg.strict:
                raise DataError(f"{ex.source}:{ex.row}: {out.reason} {out.detail}".strip())
            skipped[out.reason] += 1
            continue
        samples.append({"input_ids": out["input_ids"], "labels": out["labels"]})
    return samples, skipped


def prepare_data(data_cfg, tokenizer, *, seed: int = 1234, debug: bool = False, is_main: bool = True) -> PreparedData:
    template = Template.from_name(data_cfg.template)
    train_ex = load_examples(data_cfg.data_path, "train")
    eval_ex = load_examples(data_cfg.data_path, "eval")
    if debug:
        train_ex, eval_ex = train_ex[:64], eval_ex[:32]
    train, s1 = tokenize_examples(train_ex, tokenizer, data_cfg, template)
    evals, s2 = tokenize_examples(eval_ex, tokenizer, data_cfg, template)
    if not train:
        raise DataError("no training sample left after filtering")
    return PreparedData(train, evals, {"skipped": dict(s1 + s2)}, template)
