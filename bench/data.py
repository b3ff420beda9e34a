"""Deterministic benchmark data: word reversal (short, uniform) plus list questions (prompts spread > 10x).

Both tasks are learnable from a few dozen steps, so the final eval loss says something; the second one has
prompt lengths like real instruction data (a few words up to a long context) so padding matters.
"""

from __future__ import annotations

import random

WORDS = ("red green blue amber cedar river stone cloud maple quartz violet ember harbor meadow copper lantern "
         "falcon willow summit coral thistle granite orchid tundra saffron canyon beacon glacier juniper marble "
         "nectar onyx pepper raven sierra topaz umber velvet walnut zephyr").split()


def reversal_row(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 8))
    return {"prompt": "Reverse the words: " + " ".join(words), "answer": " ".join(reversed(words))}


def list_question_row(rng: random.Random) -> dict:
    # 2..60 items: a prompt of ~15 to ~300 tokens, the answer a short sentence about the list.
    items = [rng.choice(WORDS) for _ in range(int(2 * 30 ** rng.random()))]
    ask = rng.choice(("first", "last", "count"))
    question = {"first": "Which item comes first?", "last": "Which item comes last?",
                "count": "How many items are there?"}[ask]
    answer = {"first": f"The first item is {items[0]}.", "last": f"The last item is {items[-1]}.",
              "count": f"There are {len(items)} items."}[ask]
    return {"prompt": f"Here is a list: {', '.join(items)}. {question}", "answer": answer}


def make_rows(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``num_train`` + ``num_eval`` rows, half reversal and half list questions, shuffled by ``seed``."""
    rng = random.Random(seed)
    total = num_train + num_eval
    rows = [reversal_row(rng) if k % 2 == 0 else list_question_row(rng) for k in range(total)]
    rng.shuffle(rows)
    return rows[:num_train], rows[num_train:]
