# Quick start: `make run` (set up, then the main job) and `make test` (set up, then every test).
.PHONY: setup run test lint bench clean

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/lattice demo

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
	.venv/bin/ruff check lattice tests bench examples

lint: setup
	.venv/bin/ruff check lattice tests bench examples

bench: setup
	.venv/bin/python bench/checkpoint.py

clean:
	rm -rf .venv demo-run .pytest_cache .hypothesis
