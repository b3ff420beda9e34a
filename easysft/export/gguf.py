"""``easysft export --format gguf``: one ``model.gguf`` for llama.cpp-family runtimes, plus ``Modelfile``.

    easysft export --model_name_or_path RUN --format gguf --gguf_type q8_0 --output_dir OUT
    -> OUT/model.gguf, OUT/Modelfile (Ollama), OUT/easysft.json

Written with the ``gguf`` package's ``GGUFWriter`` and its tensor-name map (HF name -> ``blk.N.attn_q.weight``);
no converter script is copied. Contract:

- Architectures: :data:`ARCHITECTURES` (Llama/SmolLM2, Qwen2, Qwen3). Anything else, rope scaling, biases the
  runtime would not read, or a non byte-level tokenizer is refused with one line BEFORE weights load or a byte
  is written (:func:`check_exportable`).
- A LoRA adapter is always merged first (in fp32), a GGUF has no place for an adapter.
- Llama q/k projections are permuted from HF's rotate-half layout to the interleaved-pairs layout llama.cpp's
  rope expects (:func:`interleave_rope_rows`); transformers' GGUF loader undoes exactly this. Qwen uses
  llama.cpp's NeoX rope, which is HF's layout: no permutation.
- 1-D tensors (norms, biases) stay f32 as llama.cpp keeps them; 2-D weights take ``--gguf_type``. q8_0 needs
  rows in blocks of 32; a tensor whose rows are not falls back to f16 (reported in the summary line).
- Metadata: architecture hyper-parameters, the tokenizer (:mod:`easysft.export.gguf_vocab`), the training
  template as ``tokenizer.chat_template`` (:mod:`easysft.export.modelfile`), and easysft's own ``easysft.json``
  under ``easysft.meta`` / ``easysft.template`` so the file alone says how it was trained.
- Atomic: every file goes to a hidden temporary next to its target, is fsynced, then renamed into place.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from easysft.config import ExportConfig, ModelConfig
from easysft.errors import ConfigError

GGUF_NAME = "model.gguf"


@dataclass(frozen=True)
class ArchSpec:
    """How one HF ``model_type`` maps onto a llama.cpp architecture."""

    gguf_arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's "normal" rope wants interleaved pairs; NeoX rope (Qwen) keeps HF's halves
    allowed_biases: bool  # Qwen2 has q/k/v biases; Llama/Qwen3 checkpoints with biases are refused


ARCHITECTURES = {
    "llama": ArchSpec("LLAMA", permute_qk=True, allowed_biases=False),
    "qwen2": ArchSpec("QWEN2", permute_qk=False, allowed_biases=True),
    "qwen3": ArchSpec("QWEN3", permute_qk=False, allowed_biases=False),
}


def check_exportable(config) -> ArchSpec:
    """The ArchSpec for a HF config, or a one-line ConfigError naming what is supported."""
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    if spec is None:
        raise ConfigError(
            f"--format gguf: architecture {getattr(config, 'model_type', '?')!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)} (Llama/SmolLM2, Qwen2, Qwen3). Use --format hf for others."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"--format gguf: rope scaling {rope.get('rope_type')!r} is not supported yet; only plain rope.")
    if not spec.allowed_biases and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ConfigError(f"--format gguf: {config.model_type} with attention/MLP biases is not supported.")
    return spec


def interleave_rope_rows(weight, n_heads: int):
    """HF rotate-half rows (per head: all first halves, then all second halves) -> llama.cpp's (x0, y0, x1, y1...).

    Shape stays ``(n_heads * head_dim, in)``; transformers' ``LlamaTensorProcessor`` applies the inverse.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def write_hparams(writer, config, file_type: int) -> None:
    """The ``{arch}.*`` keys a runtime builds the graph from."""
    import gguf

    head_dim = _head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's own converter and quantizer write


def _tensor_kind(gguf_type: str):
    import gguf

    kinds = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    files = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    return kinds[gguf_type], int(files[gguf_type])


def converted_tensors(model, spec: ArchSpec, gguf_type: str):
    """Yield ``(gguf_name, numpy array, GGMLQuantizationType)`` for every tensor the file stores."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.gguf_arch), config.num_hidden_layers)
    wanted, _ = _tensor_kind(gguf_type)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # absent output.weight is how GGUF (and transformers' loader) says "tied"
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"--format gguf: no GGUF name for tensor {hf_name}; this checkpoint is not exportable.")
        array = tensor.detach().to(dtype=torch.float32).cpu().numpy()
        if spec.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            array = interleave_rope_rows(array, heads)
        kind = wanted if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16
        if kind == gguf.GGMLQuantizationType.F32:
            yield name, np.ascontiguousarray(array), kind
        elif kind == gguf.GGMLQuantizationType.F16:
            yield name, array.astype(np.float16), kind
        else:
            yield name, gguf.quants.quantize(np.ascontiguousarray(array), kind), kind


def _write_atomically(target: Path, write) -> None:
    """``write(tmp_path)`` then fsync and rename over ``target``; the temporary is removed on any failure,
    SIGTERM included."""
    _write_all_atomically({target: write})


def _write_all_atomically(writers: dict) -> None:
    """Each ``writer(tmp_path)`` of ``{target: writer}`` into its own temporary, fsynced; only when every one is
    written are they renamed into place, so a failure (a full disk, SIGTERM, Ctrl-C) leaves the folder as it was
    and no temporary behind."""
    from easysft.files import fsync_file, temporary_path, terminate_raises

    temps = {target: temporary_path(target) for target in writers}
    with terminate_raises():
        try:
            for target, write in writers.items():
                write(temps[target])
                fsync_file(temps[target])
            for target, tmp in temps.items():
                os.replace(tmp, target)
        except BaseException:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
            raise


def write_gguf(path: Path, model, tokenizer, template, meta: dict, spec: ArchSpec, gguf_type: str,
               also: dict | None = None) -> dict:
    """Write the GGUF for ``model`` atomically (with the files of ``also``: {path: text}, renamed into place
    together with it); returns {tensor type name: count} for the summary."""
    import gguf

    from easysft.export.gguf_vocab import build_vocab, write_vocab
    from easysft.export.modelfile import gguf_chat_template

    vocab = build_vocab(tokenizer, int(model.config.vocab_size))
    chat_template = gguf_chat_template(template, tokenizer)
    _, file_type = _tensor_kind(gguf_type)
    counts: dict[str, int] = {}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.gguf_arch)])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(meta.get("name") or Path(str(getattr(model, "name_or_path", "")) or "model").name))
        write_hparams(writer, model.config, file_type)
        write_vocab(writer, vocab)
        if chat_template:
            writer.add_chat_template(chat_template)
        writer.add_string("easysft.template", json.dumps(template.to_dict(), ensure_ascii=False))
        writer.add_string("easysft.meta", json.dumps(meta, ensure_ascii=False, default=str))
        for name, array, kind in converted_tensors(model, spec, gguf_type):
            raw = None if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else kind
            writer.add_tensor(name, array, raw_dtype=raw)
            counts[kind.name] = counts.get(kind.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def text_writer(text: str):
        def write_text(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
        return write_text

    _write_all_atomically({path: write, **{Path(p): text_writer(t) for p, t in (also or {}).items()}})
    return counts


def export_gguf(model_cfg: ModelConfig, export_cfg: ExportConfig) -> str:
    """The whole command: check, load (merging any adapter), write model.gguf + Modelfile + easysft.json."""
    from transformers import AutoConfig

    from easysft.export.checkpoint import check_output_dir, disk_full_error, load_for_export
    from easysft.export.modelfile import modelfile_text
    from easysft.models.load import resolve_model_path
    from easysft.models.meta import resolve_settings

    out = check_output_dir(model_cfg, export_cfg)
    resolved = resolve_model_path(model_cfg.model_name_or_path)
    spec = check_exportable(AutoConfig.from_pretrained(resolved.path, trust_remote_code=model_cfg.trust_remote_code))
    started = time.perf_counter()
    model, tokenizer, meta, what = load_for_export(model_cfg, merge=True)
    from easysft.export.gguf_vocab import check_tokenizer

    check_tokenizer(tokenizer)
    settings = resolve_settings(meta, tokenizer, {})
    out.mkdir(parents=True, exist_ok=True)
    target = out / GGUF_NAME
    also = {out / "Modelfile": modelfile_text(GGUF_NAME, settings.template, tokenizer, settings.generation,
                                              settings.max_new_tokens),
            out / "easysft.json": json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n"}
    try:
        counts = write_gguf(target, model, tokenizer, settings.template, meta, spec, export_cfg.gguf_type, also)
    except Exception as exc:
        error = disk_full_error(out, exc)
        if error is None:
            raise
        raise error from None
    size_mb = target.stat().st_size / 1e6
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
    return (f"exported a {what} as GGUF {export_cfg.gguf_type} to {target} ({size_mb:.1f} MB; tensors: {kinds}) "
            f"in {time.perf_counter() - started:.1f} s, with {out / 'Modelfile'}")
