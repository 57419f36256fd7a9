PYTHON ?= python3
SOURCE ?= https://www.gutenberg.org/cache/epub/829/pg829.txt

.PHONY: install test data

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

test: install
	$(PYTHON) -m pytest -q tests

data:
	$(PYTHON) prepare.py --source=$(SOURCE)
