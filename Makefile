# Confluo: `make test` runs every test suite; `make bench` prints the
# benchmark figures (RESULT lines).
CARGO ?= cargo

.PHONY: test test-rust test-kotlin test-swift test-packaging lint bench size instructions demo

test: lint test-rust test-kotlin test-swift test-packaging

test-rust:
	scripts/postgres.sh install
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

# The Kotlin API on the JVM (kotlinc + JUnit 5 + JNA, fetched by the script).
test-kotlin:
	scripts/test-kotlin.sh

# The Swift API with XCTest against the host library (natively, or in a
# Debian trixie chroot with Debian's swiftlang when no swift is on PATH).
test-swift:
	scripts/test-swift.sh

# The packaging invariants no build here can check (no Xcode, Android SDK
# or Gradle): names, paths, ABIs, page size, the privacy manifest.
test-packaging:
	scripts/check-packaging.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	scripts/lint-shell.sh

bench: size instructions
	$(CARGO) bench -p confluo-core
	scripts/postgres.sh install
	$(CARGO) bench -p confluo-server

# The shipped library's size (RESULT line).
size:
	scripts/size.sh

# Exact instruction counts of the engine's phases (callgrind; RESULT lines).
instructions:
	scripts/instructions.sh

demo:
	$(CARGO) run -p todo-cli -- demo
