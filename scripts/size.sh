#!/usr/bin/env bash
# Prints the size of the shipped library (the release build of confluo-ffi,
# stripped by the release profile) as a RESULT line, in MB (2^20 bytes).
# The host's x86_64 (or arm64) build stands in for the mobile ABIs; on
# Linux it packs its relocations as the Android build does (bindings/build.rs),
# in a target folder of its own so the flag rebuilds nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
case "$(uname -s)" in
  Darwin)
    cargo build -q --release -p confluo-ffi
    lib=target/release/libconfluo_ffi.dylib ;;
  *)
    RUSTFLAGS="-C link-arg=-Wl,-z,pack-relative-relocs" CARGO_TARGET_DIR=target/size \
      cargo build -q --release -p confluo-ffi
    lib=target/size/release/libconfluo_ffi.so ;;
esac
bytes=$(wc -c < "$lib")
awk -v b="$bytes" 'BEGIN { printf "RESULT {\"name\":\"ffi_library_stripped_size\",\"value\":%.4f,\"unit\":\"MB\",\"ratio_to_plain\":null}\n", b / 1048576 }'
