# Two commands for a fresh machine:
#   make run    install into .venv and start the app on the built-in offline dataset
#   make test   install into .venv and run the whole test suite (what CI runs)
PY ?= python3

.PHONY: run test install

.venv/bin/python:
	$(PY) -m venv .venv

install: .venv/bin/python
	.venv/bin/python -m pip install -q -r requirements.txt

run: install
	.venv/bin/python -m studio

test:
	bash scripts/test.sh
