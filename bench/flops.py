"""FLOP accounting for the training benchmark: the model FLOPs each tool actually computes, and the classic 6N.

Two MFU figures sit side by side in ``bench/results/train.md`` and the README:

- **6N-MFU** (the classic, as most papers report it): ``6 x N x tokens`` for full fine-tuning and ``4 x N x tokens``
  for LoRA (no weight gradients for frozen weights), N = ALL parameters, embeddings included, whatever the tool
  skips.
- **MFU** (the FLOPs each tool does): every real token goes through the decoder's matmuls (q, k, v, o, gate, up,
  down: :attr:`ModelShape.body_matmul_params`), ``x 6`` for full fine-tuning (forward 2, input gradient 2, weight
  gradient 2) and ``x 4`` for LoRA (no weight gradient for frozen weights), plus the LM head (``vocab x hidden``)
  with the same factor, but ONLY for the positions the tool projects through it: easysft projects supervised
  positions only; TRL 1.16's fused LM head projects every position on CPU (it scores only labelled positions on
  CUDA/XPU with Triton). LoRA adds ``6 x adapter parameters`` per token. The embedding lookup, norms, rotary,
  softmax and attention scores are not counted (attention is O(length) per token; :func:`attention_flops` gives
  its share for a set of sample lengths, about 1% at this bench's 17-145-token samples). Padding is counted for
  neither tool: it is work, not model FLOPs.

Gradient checkpointing's recomputed forward is not counted either (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

# Per-token matmul FLOPs factor: forward (2), plus input gradient (2), plus weight gradient (2) when it trains.
FACTOR = {"full": 6, "lora": 4}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (SwiGLU MLP, grouped-query attention) that set its matmul FLOPs."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a transformers ``config.json`` dict (``head_dim`` defaults to hidden / heads)."""
        heads = config["num_attention_heads"]
        return cls(hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   intermediate=config["intermediate_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", True)))

    def to_dict(self) -> dict:
        return asdict(self)

    def projection_params(self, name: str) -> tuple[int, int]:
        """``(in, out)`` features of one decoder projection (``q_proj`` ... ``down_proj``)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[name]

    @property
    def body_matmul_params(self) -> int:
        """Weights of every decoder layer's seven projections (no embedding, no LM head, no norms)."""
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return self.layers * sum(i * o for i, o in map(self.projection_params, names))

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """All parameters (embedding, LM head unless tied, two norms per layer plus the final one): N of 6N."""
        norms = (2 * self.layers + 1) * self.hidden
        return self.body_matmul_params + self.lm_head_params * (1 if self.tied else 2) + norms

    def lora_params(self, rank: int, targets: Iterable[str]) -> int:
        """Adapter parameters of rank ``rank`` on the named projections of every layer (A: in x r, B: r x out)."""
        return self.layers * sum(rank * sum(self.projection_params(name)) for name in targets)


def model_flops(shape: ModelShape, mode: str, tokens: int, lm_head_positions: int, lora_params: int = 0) -> int:
    """Model FLOPs of a training run: ``tokens`` real tokens through the decoder, ``lm_head_positions`` through
    the LM head, and (LoRA) the adapters' forward and both gradients."""
    factor = FACTOR[mode]
    adapters = 6 * lora_params * tokens if mode == "lora" else 0
    return factor * (shape.body_matmul_params * tokens + shape.lm_head_params * lm_head_positions) + adapters


def classic_flops(num_params: int, mode: str, tokens: int) -> int:
    """The classic count: 6N per token (4N for LoRA), N = all parameters."""
    return FACTOR[mode] * num_params * tokens


def attention_flops(shape: ModelShape, mode: str, lengths: Iterable[int]) -> int:
    """Causal attention score and value FLOPs (QK^T and AV) for samples of ``lengths`` tokens: the token at
    position t attends to t + 1 tokens, 4 x (t + 1) x heads x head_dim FLOPs per layer forward; ``x 3`` with both
    gradients (full and LoRA alike: neither has weights here). Not part of :func:`model_flops`."""
    width = shape.heads * shape.head_dim
    per_layer_forward = sum(4 * width * n * (n + 1) // 2 for n in lengths)
    return 3 * shape.layers * per_layer_forward


def lm_head_positions(tool: str, tokens: int, supervised_tokens: int) -> int:
    """Positions the tool projects through the LM head: easysft only supervised ones, TRL (on CPU) all of them
    (its padding positions are not counted, like padding everywhere in this accounting)."""
    return supervised_tokens if tool.startswith("easysft") else tokens


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    """Achieved FLOP/s over the measured peak, as a fraction."""
    return flops / seconds / (peak_gflops * 1e9) if seconds > 0 and peak_gflops > 0 else 0.0
