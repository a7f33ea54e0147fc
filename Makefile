# Two commands set everything up on a fresh machine (Python 3.10+; no GPU, no network beyond the package index):
#   make run    # the main job on the bundled default models
#   make test   # the test suite (what .ci/run calls)
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: run test browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch + torchvision first, pinned to a pair that imports together (open_clip needs torchvision)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench,ray]'
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mmspec caption assets/images --out runs/sample_captions.jsonl --compare --max-new-tokens 48 --redo-other-target

# Debian's chromium for the browser test (never a browser downloaded by a test tool).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs
