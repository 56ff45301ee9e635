# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.fmn-installed
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# One torch thread is faster than two on a busy 2-core machine (see shared/PROBES.md).
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test lint world clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# Pinned builds that lie on local disk (a CUDA build of torch that also runs on CPU).
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# facenet-pytorch pins ancient torch/numpy/Pillow: install without its deps.
	$(PIP) install -q --no-deps facenet-pytorch==2.6.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# The whole build on crowd-world: 6 concepts forgotten (3 held out), merged, audited,
# reported (a Prefect flow; about 4 minutes on 2 CPU cores; a re-run reuses every finished
# stage). Exits 1 when one of the demo's own gates fails.
demo: setup
	$(PY) -m fmn.cli run manifests/demo.yaml

# Headless Chromium opens the HTML report in a test (Debian's package; needs root). Best
# effort: without it that one test is skipped with its reason, everything else runs.
CHROMIUM := .venv/.chromium-checked
$(CHROMIUM): | $(STAMP)
	command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
	  || echo "chromium not installed: the HTML report test will be skipped"
	touch $(CHROMIUM)

# Two workers (the 2-core machines CI and this project run on), each a whole test file at a
# time, so a module's fixtures are built once (times: docs/performance.md). `pytest` alone
# still runs serially, for debugging.
test: setup $(CHROMIUM)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Rebuild both embedded concept worlds from scratch (about 3 hours on 2 CPU cores; shipped
# prebuilt, so nobody needs to).
world: setup
	$(PY) -m fmn.cli world build --world tiny-world --out build/world --ship
	$(PY) -m fmn.cli world build --world crowd-world --out build/crowd --ship

clean:
	rm -rf build .pytest_cache
