# Convenience wrappers; the scripts are the source of truth.
.PHONY: install test lint demo clean
install: ; bash scripts/install.sh
test: ; bash scripts/test.sh
lint: ; .venv/bin/ruff check .
demo: ; bash scripts/run-demo.sh
clean: ; rm -rf .venv .venv-pypy .tox .pytest_cache .ruff_cache .benchmarks
