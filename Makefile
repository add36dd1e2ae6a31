# The two commands at the top of README.md: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test bench-prepare clean

install: $(STAMP)

# Order matters: torch from the pinned CPU wheel first, then the CPU fbgemm build, then torchrec
# WITHOUT its dependencies (its wheel asks for the CUDA `fbgemm-gpu`, which overwrites fbgemm_gpu
# and fails to load libtorch_cuda.so), then this package and the rest of its requirements.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q fbgemm-gpu-cpu==1.8.0
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q -e '.[cpu,dev]'
	# torch-rechub: the peer of benchmarks/mtl_throughput.py, so its smoke test runs in CI; --no-deps (it would pull
	# another torch), its MTL models need only numpy, pandas, scikit-learn, torch and tqdm, installed above
	$(PIP) install -q --no-deps torch-rechub==0.9.0
	# recbole: the peer of benchmarks/sequence_throughput.py (NextItNet); --no-deps (it would pull ray 2.6.3, thop,
	# plotly, ...); its NextItNet + Interaction import path needs only colorlog, colorama (its exact pins) and texttable
	$(PIP) install -q --no-deps recbole==1.2.1 colorlog==4.7.2 colorama==0.4.4 texttable==1.7.2
	$(PY) -c "import torchrec, fbgemm_gpu, torch; print('installed torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recsys-transfer demo --output $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-prepare: $(STAMP)
	$(PY) benchmarks/prepare_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
