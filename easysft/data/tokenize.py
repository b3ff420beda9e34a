"""The ONLY place that truncates and labels prompt/answer pairs (conversations: :mod:`easysft.data.chat_render`).

Rules (docs/ARCHITECTURE.md, correctness rules):

- ``labels`` is ``-100`` (:data:`IGNORE_INDEX`) wherever a token is not supervised: the prompt, the template
  and (later, in the collator) padding. The supervised tokens are exactly the answer's tokens, plus EOS when
  the answer is complete.
- The prompt keeps its END (the tokens next to the answer); a leading BOS the tokenizer adds is kept too.
- The answer keeps its START. ``max_ans_len`` counts the EOS: an answer of at most ``max_ans_len - 1`` tokens
  keeps all of them and gets EOS; a longer one keeps its first ``max_ans_len`` tokens and gets no EOS (the model
  must not learn to stop where the answer did not end).
- A row that cannot make a sample returns a :class:`Skip` with a reason from :data:`SKIP_REASONS`.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100

# Every reason a row can be skipped; the data report counts each one.
SKIP_REASONS = (
    "invalid_json_line",  # a .jsonl line that does not parse
    "missing_key",  # the row lacks the prompt or answer column
    "non_string_prompt",  # prompt is null, a number, a list ...
    "non_string_answer",  # answer is null, a number, a list ...
    "empty_prompt",  # prompt is empty or whitespace (every template needs one)
    "empty_answer",  # answer is empty or whitespace
    "no_supervised_tokens",  # nothing left to supervise after tokenization/truncation
    "unparseable_dialogue",  # a dialogue/chat row with no final assistant turn
    "too_long",  # a conversation whose last round does not fit --max_seq_len
    "control_token_in_text",  # data text spelling a control token of the tokenizer (it would become that token)
)


@dataclass(frozen=True)
class Skip:
    """A row that makes no sample, and why (``reason`` is one of :data:`SKIP_REASONS`)."""

    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        assert self.reason in SKIP_REASONS, self.reason


def tokenize_example(
    tokenizer,
    prompt,
    answer,
    *,
    max_prompt_len: int,
    max_ans_len: int,
    template="qa",
    context: list[dict] | None = None,
) -> dict | Skip:
    """Tokenize one prompt/answer pair into a training sample.

    Returns a dict with ``input_ids`` and ``labels`` (equal-length lists of ints, ``-100`` = not supervised)
    plus bookkeeping for the data report: ``num_prompt_tokens``, ``num_answer_tokens`` (before truncation),
    ``prompt_truncated``, ``answer_truncated``. Returns :class:`Skip` when the row cannot make a sample.

    >>> sample = tokenize_example(tok, "hi", "Paris", max_prompt_len=64, max_ans_len=8)  # doctest: +SKIP
    >>> tok.decode([t for t in sample["labels"] if t != -100])  # doctest: +SKIP
    'Paris<|im_end|>'
    """
    return tokenize_examples(tokenizer, [(prompt, answer, context)], max_prompt_len=max_prompt_len,
                             max_ans_len=max_ans_len, template=template)[0]


def tokenize_examples(
    tokenizer,
    rows: list[tuple[object, object, list[dict] | None]],
    *,
    max_prompt_len: int,
    max_ans_len: int,
    template="qa",
) -> list[dict | Skip]:
    """:func:`tokenize_example` for many ``(prompt, answer, context)`` rows, in order, with one batched tokenizer
    call for the prompts and one for the answers (what makes 100k rows fast: the per-call overhead of the
    tokenizer, not the tokenization itself, dominated the one-row-at-a-time loop)."""
    from easysft.data.templates import Template

    if max_prompt_len < 1 or max_ans_len < 1:
        raise ValueError(f"max_prompt_len and max_ans_len must be >= 1, got {max_prompt_len}, {max_ans_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before tokenizing")
    results: list[dict | Skip | None] = [_invalid_pair(prompt, answer) for prompt, answer, _ in rows]
    valid = [i for i, result in enumerate(results) if result is None]
    if valid:
        prompt_ids = Template.from_name(template).prompt_ids_batch(
            tokenizer, [rows[i][0] for i in valid], [rows[i][2] for i in valid])
        answer_ids = tokenizer([rows[i][1] for i in valid], add_special_tokens=False)["input_ids"]
        for i, prompt_part, answer_part in zip(valid, prompt_ids, answer_ids, strict=True):
            results[i] = build_sample(list(prompt_part), list(answer_part), tokenizer, max_prompt_len=max_prompt_len,
                                      max_ans_len=max_ans_len)
    return results  # type: ignore[return-value]


def _invalid_pair(prompt, answer) -> Skip | None:
    """Why a raw prompt/answer pair cannot be tokenized at all, or None."""
    if not isinstance(prompt, str):
        return Skip("non_string_prompt", f"prompt is {type(prompt).__name__}")
    if not isinstance(answer, str):
        return Skip("non_string_answer", f"answer is {type(answer).__name__}")
    if not prompt.strip():
        return Skip("empty_prompt")
    if not answer.strip():
        return Skip("empty_answer")
    return None


def build_sample(prompt_ids: list[int], answer_ids: list[int], tokenizer, *, max_prompt_len: int,
                 max_ans_len: int) -> dict | Skip:
    """Truncate (the rules in the module docstring) and label already-tokenized prompt and answer ids."""
    num_prompt_tokens, num_answer_tokens = len(prompt_ids), len(answer_ids)
    prompt_ids, prompt_truncated = keep_prompt_end(prompt_ids, max_prompt_len, tokenizer)
    if len(answer_ids) + 1 <= max_ans_len:
        supervised = answer_ids + [tokenizer.eos_token_id]
        answer_truncated = False
    else:
        supervised = answer_ids[:max_ans_len]
        answer_truncated = True
    if not supervised or not answer_ids:
        return Skip("no_supervised_tokens")
    if not prompt_ids:
        return Skip("empty_prompt", "no prompt token left after truncation")

    return {
        "input_ids": prompt_ids + supervised,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + supervised,
        "num_prompt_tokens": num_prompt_tokens,
        "num_answer_tokens": num_answer_tokens,
        "prompt_truncated": prompt_truncated,
        "answer_truncated": answer_truncated,
    }


def keep_prompt_end(ids: list[int], max_len: int, tokenizer) -> tuple[list[int], bool]:
    """Keep the last ``max_len`` ids; a leading BOS survives truncation (models expect it first).

    Public because inference (easysft.generate) must truncate prompts exactly as training did.
    Returns ``(ids, truncated)``.
    """
    if len(ids) <= max_len:
        return ids, False
    bos = tokenizer.bos_token_id
    if bos is not None and ids and ids[0] == bos and max_len > 1 and getattr(tokenizer, "add_bos_token", False):
        return [bos] + ids[len(ids) - (max_len - 1):], True
    return ids[len(ids) - max_len:], True


_keep_prompt_end = keep_prompt_end  # old private name, kept for callers that use it
