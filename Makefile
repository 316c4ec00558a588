# Two commands matter: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: serving needs the package only, everything else its dev extras too. The dev
# install stamps both, so `make serve` after `make test` installs nothing.
SERVING := $(VENV)/.installed-serving
DEV := $(VENV)/.installed-dev
# The tests start PostgreSQL servers of their own (devtools/private_postgres.py) from the
# machine's server binaries: looked for once, installed if missing where we can (root with
# apt-get, as on CI).
POSTGRES := $(VENV)/.postgres-found
# The web console's tests drive a real headless Chromium (Debian's, through Playwright):
# looked for once, installed if missing where we can, as PostgreSQL is.
CHROMIUM := $(VENV)/.chromium-found

.PHONY: install serve serve-cluster test fuzz stress protos lint bench bench-quick bench-compare profile clean

install: $(DEV) $(POSTGRES) $(CHROMIUM)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(SERVING): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $(SERVING)

$(DEV): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(DEV) $(SERVING)

# Without the distribution's own cluster: the tests use none, and it would run on 5432 for
# good. The last --check says why, if the binaries are still not found (a wrong PG_BINDIR).
$(POSTGRES): | $(DEV)
	$(PY) -m devtools.private_postgres --check 2>/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null || { \
	    echo "PostgreSQL's server binaries (initdb, postgres) are missing: install them" \
	      "(Debian: apt-get install postgresql) or set PG_BINDIR to their directory" >&2; \
	    exit 1; }; \
	  mkdir -p /etc/postgresql-common/createcluster.d && \
	  echo 'create_main_cluster = false' \
	    >/etc/postgresql-common/createcluster.d/no-main-cluster.conf && \
	  apt-get update && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y --no-install-recommends postgresql && \
	  $(PY) -m devtools.private_postgres --check; }
	touch $(POSTGRES)

$(CHROMIUM): | $(DEV)
	command -v chromium >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null || { \
	    echo "Chromium is missing: install it (Debian: apt-get install chromium)" >&2; \
	    exit 1; }; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y --no-install-recommends chromium; }
	touch $(CHROMIUM)

serve: $(SERVING)
	$(VENV)/bin/task-manager serve

# Replicas by hand: a private PostgreSQL (fsync on, gone when stopped) and two `task-manager
# serve` on it, 127.0.0.1:50051 and :50052, until ^C (python -m devtools.cluster --help).
# Needs the dev install: PostgreSQL's binaries are found (or installed) by that step.
serve-cluster: install
	$(PY) -m devtools.cluster

# Tests in TEST_WORKERS processes (pytest-xdist), each with its own private PostgreSQL.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

# The hostile-input tests at scale: 10,000 messages, 5,000 mutated valid requests and
# 5,000 byte strings.
fuzz: install
	FUZZ_EXAMPLES=10000 $(PY) -m pytest --timeout=3600 tests/test_fuzz.py

# The agent's cancellation storm at scale: 400 tasks a round, five rounds.
stress: install
	STRESS_TASKS=400 STRESS_ROUNDS=5 $(PY) -m pytest --timeout=1800 tests/test_agent_stress.py

protos: install
	$(PY) protos/generate.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Benchmarks are not tests: real server and client processes, JSON in bench/results/.
bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

# Another revision's server beside this one, in interleaved pairs: make bench-compare REV=6921684
# (ARGS="--pairs 5 --duration 10" for more; python -m bench.compare --help)
bench-compare: install
	@test -n "$(REV)" || { echo "usage: make bench-compare REV=<commit> [ARGS=...]"; exit 2; }
	$(PY) -m bench.compare $(REV) $(ARGS)

# Where the server's GIL goes under one scenario: make profile SCENARIO=lifecycle
SCENARIO ?= update-status
profile: install
	$(PY) -m bench.profile $(SCENARIO)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
