"""The tokenizer as GGUF metadata: vocabulary, token types, merges, special ids, add-BOS flag, pre-tokenizer name.

GGUF files carry no ``tokenizer.json``. llama.cpp (and transformers' GGUF loader) rebuild the tokenizer from
``tokenizer.ggml.*`` keys, so everything that decides how text becomes ids must be written here:

- ``tokenizer.ggml.model`` is ``gpt2`` (byte-level BPE: SmolLM2, Qwen2/3, Llama 3). SentencePiece-style
  vocabularies are refused with one line (:func:`check_tokenizer`) before anything is written.
- ``tokenizer.ggml.pre`` names the split regex the merges were learned on. It is read off the tokenizer's own
  pre-tokenizer (:func:`pre_tokenizer_name`), never guessed; one the runtimes do not know is refused.
- token types: an added special token is CONTROL (a runtime matches it whole and hides it when decoding), an
  added plain token USER_DEFINED, padding rows past the tokenizer's length UNUSED.
- ``add_bos_token`` / ``add_eos_token`` are measured: what the tokenizer actually adds to a plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from easysft.errors import ConfigError

# The GPT-2 split (ByteLevel with use_regex=True) with digits split one by one first, as SmolLM2 ships it.
_SINGLE_DIGITS_THEN_GPT2 = "smollm"


@dataclass
class GGUFVocab:
    """Everything :func:`write_vocab` puts into the file, computed before the writer opens."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("--format gguf needs a fast (tokenizer.json) tokenizer; this model has only a slow one.")
    return json.loads(backend.to_str())


def _split_regex_names() -> dict[str, str]:
    """regex -> pre-tokenizer name, the inverse of the table transformers' GGUF loader reads the name with.

    Inverting the loader's own table guarantees the exported file loads back with the same split. The first
    name per regex wins (the table lists llama.cpp's canonical names first: ``llama3``, ``qwen2``).
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older/newer transformers layout: only the plain GPT-2 split is recognised then
        return {}
    names: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(regex, name)
    return names


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for this tokenizer's split (``tokenizer.ggml.pre``); ConfigError when it has none."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return _SINGLE_DIGITS_THEN_GPT2
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        name = _split_regex_names().get(regex)
        if name:
            return name
    raise ConfigError(
        f"--format gguf: this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
        "name; supported: GPT-2 byte-level splits (SmolLM2, Qwen2/3, Llama 3)."
    )


def check_tokenizer(tokenizer) -> dict:
    """The tokenizer.json of a byte-level BPE tokenizer; a one-line ConfigError for any other kind."""
    data = _tokenizer_json(tokenizer)
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ConfigError(
            f"--format gguf: tokenizer type {model.get('type')}/{decoder} is not supported yet; only byte-level BPE "
            "tokenizers (SmolLM2, Qwen2/3, Llama 3) export."
        )
    pre_tokenizer_name(data)
    return data


def _merges(tokenizer_json: dict) -> list[str]:
    merges = tokenizer_json["model"].get("merges") or []
    # tokenizers >= 0.20 stores pairs as lists; GGUF keeps the older "left right" strings.
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def _adds(tokenizer, token_id: int | None, where: str) -> bool:
    """Whether the tokenizer adds ``token_id`` at ``where`` ('start'/'end') of a plain text."""
    if token_id is None:
        return False
    ids = tokenizer("easysft", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0 if where == "start" else -1] == token_id


def build_vocab(tokenizer, n_vocab: int) -> GGUFVocab:
    """The metadata for a model whose embedding has ``n_vocab`` rows (may exceed the tokenizer's length)."""
    import gguf

    data = check_tokenizer(tokenizer)
    if len(tokenizer) > n_vocab:
        raise ConfigError(f"--format gguf: the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab}.")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(n_vocab):
        if token_id >= len(tokenizer):
            tokens.append(f"[PAD{token_id}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(tokenizer.convert_ids_to_tokens(token_id))
        if token_id in added:
            types.append(int(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    special_ids = {
        kind: token_id
        for kind in ("bos", "eos", "unk", "pad")
        if (token_id := getattr(tokenizer, f"{kind}_token_id", None)) is not None
    }
    return GGUFVocab(
        tokens=tokens, token_types=types, merges=_merges(data), pre=pre_tokenizer_name(data),
        special_ids=special_ids, add_bos=_adds(tokenizer, special_ids.get("bos"), "start"),
        add_eos=_adds(tokenizer, special_ids.get("eos"), "end"),
    )


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add the ``tokenizer.ggml.*`` keys of ``vocab`` to an open GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
