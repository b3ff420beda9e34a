"""Generation progress on stderr (prompts/s and generated tokens/s)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar on stderr showing prompts/s and generated tokens/s; silent when ``enabled`` is False."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "generating"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)
        self.started = time.perf_counter()
        self.num_prompts = 0
        self.num_tokens = 0

    def __call__(self, num_prompts: int, num_tokens: int) -> None:
        self.num_prompts += num_prompts
        self.num_tokens += num_tokens
        self.bar.update(num_prompts)
        self.bar.set_postfix_str(f"{self.num_tokens / self.seconds:.1f} tok/s", refresh=True)

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def close(self) -> None:
        self.bar.close()
