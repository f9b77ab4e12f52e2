# Confluo: `make test` runs every test suite; `make bench` prints the
# benchmark figures (RESULT lines).
CARGO ?= cargo

.PHONY: test test-rust lint bench demo

test: lint test-rust

test-rust:
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench:
	$(CARGO) bench -p confluo-core
