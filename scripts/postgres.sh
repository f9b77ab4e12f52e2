#!/usr/bin/env bash
# The PostgreSQL that the server's tests and benchmarks start for themselves
# (server/tests/support/postgres.rs runs a throwaway cluster from initdb,
# pg_ctl and psql; it starts no system service).
#   scripts/postgres.sh install
# makes those binaries available: when no initdb is on PATH or in
# /usr/lib/postgresql/*/bin, installs Debian's `postgresql` package with
# apt-get (as root, or through sudo). Prints one line, the folder of the
# binaries the tests will use; quiet otherwise, except for errors.
set -euo pipefail

# The folder of initdb, pg_ctl and psql, as the tests find it: PATH's initdb
# (symlinks resolved), else the newest /usr/lib/postgresql/*/bin.
bin_dir() {
  local initdb dir
  if initdb=$(command -v initdb 2>/dev/null); then
    dir=$(dirname "$(readlink -f "$initdb")")
    if [ -x "$dir/pg_ctl" ] && [ -x "$dir/psql" ]; then
      echo "$dir"
      return 0
    fi
  fi
  dir=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null |
    sort -V | tail -n 1)
  [ -n "$dir" ] || return 1
  dirname "$dir"
}

install() {
  local dir sudo=()
  if dir=$(bin_dir); then
    echo "postgres: using $dir"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
      echo "postgres: PostgreSQL is not installed and this is not root (no sudo): run 'apt-get install postgresql' as root" >&2
      exit 1
    }
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 || {
    echo "postgres: PostgreSQL is not installed and there is no apt-get: install PostgreSQL (initdb, pg_ctl, psql) and put its bin folder on PATH" >&2
    exit 1
  }
  echo "postgres: installing Debian's postgresql package" >&2
  log=$(mktemp) # global: the EXIT trap runs after this function returns
  trap 'rm -f "$log"' EXIT
  if ! { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "postgres: apt-get install postgresql failed (output above)" >&2
    exit 1
  fi
  dir=$(bin_dir) || {
    echo "postgres: postgresql is installed but no initdb was found in PATH or /usr/lib/postgresql/*/bin" >&2
    exit 1
  }
  echo "postgres: using $dir"
}

case "${1:-}" in
  install) install ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
