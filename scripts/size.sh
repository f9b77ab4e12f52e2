#!/usr/bin/env bash
# Prints the size of the shipped library (the release build of confluo-ffi,
# stripped by the release profile) as a RESULT line, in MB (2^20 bytes).
# The host's x86_64 (or arm64) build stands in for the mobile ABIs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p confluo-ffi
case "$(uname -s)" in
  Darwin) lib=target/release/libconfluo_ffi.dylib ;;
  *) lib=target/release/libconfluo_ffi.so ;;
esac
bytes=$(wc -c < "$lib")
awk -v b="$bytes" 'BEGIN { printf "RESULT {\"name\":\"ffi_library_stripped_size\",\"value\":%.4f,\"unit\":\"MB\",\"ratio_to_plain\":null}\n", b / 1048576 }'
