# Two entry points for a fresh machine (see README):  make run   |   make test
# Both create .venv on first use, install torch==2.14.1 and the package with the method's extra
# (`.[method]`, building augkd._C: C++ CPU kernels always, CUDA kernels when nvcc is present), then run.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1
# build and test tools; the package's own dependencies are declared in pyproject.toml
DEPS   := ninja pytest pytest-benchmark ruff
SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* kernels/*)

.PHONY: env build run lint test bench report clean

env: $(VENV)/.deps
$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH) $(DEPS)
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install -q --no-build-isolation -e ".[method]"
	$(BIN)/python -m augkd.ops
	touch $@

run: build          ## the main job: AuG-KD on the embedded digits-shift default
	$(BIN)/augkd run $(ARGS)

lint: $(VENV)/.deps  ## pyflakes and import order (settings in pyproject.toml)
	$(BIN)/ruff check .

test: lint build    ## the linter, then the test suite (no GPU needed; GPU cases skip with a reason)
	$(BIN)/python -m pytest -q -rs tests $(ARGS)

bench: build        ## pytest-benchmark of the ops (CPU)
	$(BIN)/python -m pytest -q benchmarks $(ARGS)

report: build       ## markdown table of the ops' speed and memory, side by side
	$(BIN)/python -m benchmarks.report $(ARGS)

clean:
	rm -rf build $(VENV)/.built augkd/_C*.so
