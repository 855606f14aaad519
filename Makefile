# Quick start: `make run` (set up, then the main job) and `make test` (set up, then every test).
.PHONY: setup run test lint bench clean

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/lattice demo

# TensorFlow and JAX start threads at import: their tests run in a pytest process of their own,
# so the other tests never fork (DataLoader workers, agents) a process that has them loaded.
test: setup
	.venv/bin/python -m pytest -q --ignore=tests/tf --ignore=tests/jax $(PYTEST_ARGS)
	.venv/bin/python -m pytest -q tests/tf tests/jax $(PYTEST_ARGS)
	.venv/bin/ruff check lattice tests bench examples operator

lint: setup
	.venv/bin/ruff check lattice tests bench examples operator

bench: setup
	.venv/bin/python bench/checkpoint.py

clean:
	rm -rf .venv demo-run .pytest_cache .hypothesis
