# evssd: the two README commands (`make demo`, `make test`) do all set-up on a fresh machine
# with Python 3.11 and pip. Everything installs from PyPI into .venv.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EVSSD  := $(VENV)/bin/evssd
# pytest workers: the machines have 2 cores
JOBS   ?= 2

.PHONY: demo test test-fast bench bitstream release docs clean help pyverbs

help:
	@echo "make demo       - set up .venv and run the main job on the device model"
	@echo "make test       - set up .venv with the test tools and run the whole suite"
	@echo "make test-fast  - the suite without Verilator/synthesis tests"
	@echo "make bench      - every benchmark (results/ + docs/benchmarks.md numbers)"
	@echo "make bitstream  - full ULX3S-85F bitstream into bitstreams/ulx3s-85f/"
	@echo "make release    - rebuild the committed bitstream only if its build digest is stale"
	@echo "make docs       - regenerate docs/registers.md from hw/regmap.py"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps: reinstall when pyproject.toml changes.
$(VENV)/.stamp-run: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	@touch $@

# torchrec 1.8.0 matches torch 2.13 / fbgemm-gpu-cpu 1.8.0, but its metadata requires the CUDA-only
# fbgemm-gpu, so it goes in without dependencies; the ones it imports come with the `torch` extra.
TORCHREC := torchrec==1.8.0

$(VENV)/.stamp-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(TORCHREC)"
	$(PY) -c "import torchrec, fbgemm_gpu, ray, theine"
	@touch $@ $(VENV)/.stamp-run

demo: $(VENV)/.stamp-run
	$(EVSSD) demo

# tests/test_serving_pyverbs_real.py checks the verbs stand-in against rdma-core's real pyverbs
# (a Debian package for /usr/bin/python3, not on PyPI). Installed when apt-get exists and the
# package is missing; if apt fails, that test fails and says how to install it.
pyverbs:
	@if command -v apt-get >/dev/null && ! dpkg -s python3-pyverbs >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pyverbs) \
	    || echo "warning: could not install python3-pyverbs; its test will fail"; fi

test: $(VENV)/.stamp-dev pyverbs
	$(PY) -m pytest -n $(JOBS) --dist loadgroup -q --durations=15

test-fast: $(VENV)/.stamp-dev pyverbs
	$(PY) -m pytest -n $(JOBS) -q -m "not rtl and not synth"

bench: $(VENV)/.stamp-dev
	$(EVSSD) bench cache
	$(EVSSD) bench store
	$(EVSSD) bench serve
	$(EVSSD) bench rtl
	$(EVSSD) bench synth
	$(EVSSD) bench dlrm
	$(EVSSD) bench model
	$(EVSSD) bench device

bitstream: $(VENV)/.stamp-dev
	$(EVSSD) synth --board ulx3s-85f

# The committed bitstream is current when its manifest's build digest (elaborated design without
# source attributes + build options + tool versions) equals the tree's; otherwise rebuild it
# (each board; the ECPIX-5 build also generates LiteDRAM and LiteEth, about 30 minutes).
release: $(VENV)/.stamp-dev
	$(EVSSD) synth --release --board ulx3s-85f
	$(EVSSD) synth --release --board ecpix5-85f

docs: $(VENV)/.stamp-run
	$(EVSSD) regmap --write

clean:
	rm -rf build results .pytest_cache
