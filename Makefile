# knowtuning: `make demo` and `make test` are the two setup commands (see README).
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.knowtuning-installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-slow bench docs export

$(STAMP): requirements.txt setup.py settings.ini tools/install.sh
	bash tools/install.sh
	touch $(STAMP)

install: $(STAMP)
	@$(BIN)/knowtuning setup --quiet   # cheap when everything is materialized

demo: install       ## the main job on embedded defaults (tiny preset, CPU, offline)
	$(BIN)/knowtuning reproduce --preset tiny

test: install       ## every test: notebook tests and pytest (fast tier)
	bash tools/test.sh

test-slow: install
	KNOWTUNING_SLOW=1 bash tools/test.sh

bench: install      ## benchmarks, reported as ratios measured in one run
	$(BIN)/python -m knowtuning.bench

docs: install       ## docs site in _docs/: nbdev + quarto where quarto exists, else Sphinx (offline)
	$(BIN)/knowtuning docs

export:             ## notebooks -> package and README
	$(BIN)/nbdev_export && $(BIN)/knowtuning readme
