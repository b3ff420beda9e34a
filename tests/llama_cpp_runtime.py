"""llama.cpp itself, driven through its C API, for the GGUF export tests (test support, not product code).

Why this binding: ``llama-cpp-cffi`` is the one PyPI release with a prebuilt llama.cpp for CPython 3.11 on Linux
x86_64 (``llama-cpp-python`` ships only a source release here, whose build had not finished after 78 min). Its
wheel holds cffi builds of llama.cpp's C API (llama.cpp build 4965, commit b3298fa4) for CPU, CUDA and Vulkan.

How it is loaded, and why not ``import llama``:

- Only the CPU extension ``llama/_llama_cpp_cpu*.so`` is opened, by file. ``import llama`` (and so any
  ``import llama._llama_cpp_cpu``) would run the package ``__init__``, which imports its chat formatter stack
  (written for transformers<5), may pick the CUDA/Vulkan build, and starts the backend at import.
- The extension was compiled with GCC 14 and names ``__cxa_call_terminate``, a libstdc++ 14 symbol that Debian
  12's libstdc++ (GCC 12) lacks; every other symbol resolves there. That function is only called when a C++
  exception escapes a ``noexcept`` function (the process terminates either way), so the module is opened with
  ``RTLD_LAZY``: the symbol is looked up only on that path, and a normal run never needs it.

API (this build's names; older builds used ``llama_load_model_from_file`` / ``llama_new_context_with_model`` and
vocabulary functions taking the model, newer ones keep these): ``llama_model_load_from_file``,
``llama_init_from_model``, ``llama_model_get_vocab``, ``llama_tokenize(vocab, ...)``, ``llama_batch_get_one``,
``llama_decode``, ``llama_get_logits_ith``, ``llama_vocab_is_eog``, ``llama_detokenize``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

PACKAGE = "llama-cpp-cffi"
VERSION = "0.4.42"  # pinned in the Makefile's setup (pip --no-deps)
REQUIRED = ("llama_model_load_from_file", "llama_init_from_model", "llama_model_get_vocab", "llama_tokenize",
            "llama_batch_get_one", "llama_decode", "llama_get_logits_ith", "llama_vocab_is_eog",
            "llama_vocab_n_tokens", "llama_detokenize", "llama_kv_self_clear", "llama_free", "llama_model_free",
            "llama_model_chat_template", "llama_model_quantize")
GGML_TYPE_F32 = 0
GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT

_loaded = None  # (lib, ffi) once opened: the extension is opened once per process
_errors: list[str] = []  # llama.cpp's error log lines, quoted when a load or decode fails


class Unavailable(RuntimeError):
    """The runtime cannot be used here; the message says why (tests skip with it)."""


def _extension_path() -> Path:
    spec = importlib.util.find_spec("llama")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"{PACKAGE} is not installed (make setup installs it: pip install --no-deps "
                          f"{PACKAGE}=={VERSION} cffi)")
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / f"_llama_cpp_cpu{suffix}"
            if path.is_file():
                return path
    raise Unavailable(f"the installed 'llama' package has no _llama_cpp_cpu extension (not {PACKAGE}?)")


def load() -> tuple:
    """``(lib, ffi)`` of llama.cpp's C API, opened once; raises :class:`Unavailable` with the reason."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = _extension_path()
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", path)
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)  # see the module docstring (__cxa_call_terminate)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:  # cffi missing, or a symbol this system cannot provide even lazily
        raise Unavailable(f"{path.name} does not load here: {exc}") from exc
    finally:
        sys.setdlopenflags(flags)
    lib, ffi = module.lib, module.ffi
    missing = [name for name in REQUIRED if not hasattr(lib, name)]
    if missing:
        raise Unavailable(f"this llama.cpp build lacks {', '.join(missing)} (expected {PACKAGE}=={VERSION})")

    @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
    def _log(level, text, user_data):  # keep errors for messages, drop the chatter
        if level == GGML_LOG_LEVEL_ERROR:
            _errors.append(ffi.string(text).decode("utf-8", "replace").strip())

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    _loaded = (lib, ffi)
    return _loaded


def build_info() -> str:
    """``llama.cpp build N (commit)`` of the opened extension."""
    import ctypes

    load()
    handle = ctypes.CDLL(str(_extension_path()), mode=os.RTLD_LAZY | os.RTLD_NOLOAD)
    number = ctypes.c_int.in_dll(handle, "LLAMA_BUILD_NUMBER").value
    commit = ctypes.c_char_p.in_dll(handle, "LLAMA_COMMIT").value.decode()
    return f"llama.cpp build {number} ({commit})"


def quantize(source: str | Path, target: str | Path, ftype: int, n_threads: int = 2) -> Path:
    """``llama-quantize`` in-process: ``source`` GGUF re-encoded as ``ftype`` (a ``llama_ftype`` number:
    1 MOSTLY_F16, 7 MOSTLY_Q8_0) into ``target``; llama.cpp's own choice of what stays f32."""
    lib, ffi = load()
    params = ffi.new("struct llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype, params.nthread = ftype, n_threads
    _errors.clear()
    if lib.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed: {' | '.join(_errors[-3:])}")
    return Path(target)


class LlamaCppModel:
    """One GGUF loaded in llama.cpp on the CPU, with one context; use as a context manager (frees both)."""

    def __init__(self, gguf_path: str | Path, n_ctx: int = 512, n_threads: int = 1, f32_kv_cache: bool = True):
        """``n_threads``: 1 by default. ggml's threads meet at a spinning barrier after every operation; on a
        shared machine (tests run at low priority) one preempted thread stalls the others: SmolLM2-135M f16, a
        37-token prompt and 7 new tokens, took 62 s with 2 threads and 3 s with 1 (2 cores, load average ~6).
        ``f32_kv_cache``: keys and values cached in f32 (llama.cpp's default is f16, which alone moves
        logits by ~1e-2 and would hide what the file itself changes); False keeps the runtime's default."""
        self.lib, self.ffi = load()
        lib = self.lib
        _errors.clear()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if self.model == self.ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}: {' | '.join(_errors[-3:])}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = ctx_params.n_threads_batch = n_threads
        if f32_kv_cache:
            ctx_params.type_k = ctx_params.type_v = GGML_TYPE_F32
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if self.ctx == self.ffi.NULL:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context: {' | '.join(_errors[-3:])}")

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def chat_template(self) -> str | None:
        """The ``tokenizer.chat_template`` llama.cpp read from the file (what ``llama-server --jinja`` renders)."""
        text = self.lib.llama_model_chat_template(self.model, self.ffi.NULL)
        return None if text == self.ffi.NULL else self.ffi.string(text).decode("utf-8")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's ids for ``text``; special-token text (``<|im_start|>``) is parsed as the special token.
        ``add_special`` adds BOS/EOS as the file's ``tokenizer.ggml.add_*_token`` flags say."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            ids = self.ffi.new("int32_t[]", size)
            count = self.lib.llama_tokenize(self.vocab, data, len(data), ids, size, add_special, True)
            if count >= 0:
                return list(ids[0:count])
            size = -count

    def detokenize(self, ids: list[int], remove_special: bool = True) -> str:
        """Text of ``ids``; ``remove_special`` drops BOS/EOS as the file's flags say (like skip_special_tokens)."""
        tokens = self.ffi.new("int32_t[]", ids or [0])
        size = 16 * len(ids) + 16
        while True:
            buffer = self.ffi.new("char[]", size)
            count = self.lib.llama_detokenize(self.vocab, tokens, len(ids), buffer, size, remove_special, False)
            if count >= 0:
                return self.ffi.unpack(buffer, count).decode("utf-8", "replace")
            size = -count

    def _decode(self, ids: list[int]) -> None:
        tokens = self.ffi.new("int32_t[]", ids)  # must outlive the call: the batch points into it
        code = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(ids)))
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}: {' | '.join(_errors[-3:])}")

    def _last_logits(self):
        import numpy as np

        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.frombuffer(self.ffi.buffer(logits, 4 * self.n_vocab), dtype=np.float32).copy()

    def prompt_logits(self, prompt_ids: list[int]):
        """Next-token logits after ``prompt_ids`` (fresh cache), as a float32 numpy vector."""
        self.lib.llama_kv_self_clear(self.ctx)
        self._decode(prompt_ids)
        return self._last_logits()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (fresh cache): argmax each step, at most ``max_new_tokens``
        ids, stopping before the first end-of-generation token (which is not returned)."""
        out: list[int] = []
        logits = self.prompt_logits(prompt_ids)
        while len(out) < max_new_tokens:
            token = int(logits.argmax())
            if self.lib.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            if len(out) < max_new_tokens:
                self._decode([token])
                logits = self._last_logits()
        return out
