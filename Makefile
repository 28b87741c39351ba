# Two entry points for a fresh machine (see README):  make run   |   make test
# Both create .venv on first use, install torch==2.14.1 and the package (building augkd._C:
# C++ CPU kernels always, CUDA kernels when nvcc is present), then run.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1
DEPS   := numpy scikit-learn mlxtend pillow tqdm pyyaml safetensors matplotlib pytest pytest-benchmark ninja
SOURCES := $(wildcard setup.py csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* kernels/*)

.PHONY: env build run test bench report clean

env: $(VENV)/.deps
$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH) $(DEPS)
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -m augkd.ops
	touch $@

run: build          ## the main job: AuG-KD on the embedded digits-shift default
	$(BIN)/augkd run $(ARGS)

test: build         ## the test suite (no GPU needed; GPU cases skip with a reason)
	$(BIN)/python -m pytest -q -rs tests $(ARGS)

bench: build        ## pytest-benchmark of the ops (CPU)
	$(BIN)/python -m pytest -q benchmarks $(ARGS)

report: build       ## markdown table of the ops' speed and memory, side by side
	$(BIN)/python -m benchmarks.report $(ARGS)

clean:
	rm -rf build $(VENV)/.built augkd/_C*.so
