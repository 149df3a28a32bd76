#!/usr/bin/env bash
# Sanitizer fuzz of the C data path and the decoders (issue 14), for a bounded time.
#
# Builds an ASan/UBSan copy of the C core into a temporary directory (the
# in-place build the tests use is not touched), checks that the sanitizer
# catches a guard-page fault and a heap overflow in the C core, then runs
# tests/fuzz/fuzz_datapath.py on mutated QEMU captures for POSTCOPY_FUZZ_SECONDS
# (default 60). Any sanitizer report or broken invariant fails the run.
# Extra arguments go to the fuzzer (e.g. --seed 7, --targets dest,rp).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${POSTCOPY_FUZZ_SECONDS:-60}

asan=$(gcc -print-file-name=libasan.so)
if [ ! -e "$asan" ]; then       # gcc prints the bare name when its libasan is missing
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libasan8 libubsan1 >/dev/null
        asan=$(gcc -print-file-name=libasan.so)
    fi
    [ -e "$asan" ] || { echo "fuzz: no libasan for gcc (apt-get install libasan8 libubsan1)" >&2; exit 1; }
fi

build=$(mktemp -d "${TMPDIR:-/tmp}/postcopy-fuzz.XXXXXX")
trap 'rm -rf "$build"' EXIT
echo "fuzz: building the ASan/UBSan C core in $build"
python3 uffd/_build.py --sanitize "$build" >/dev/null

export LD_PRELOAD="$asan"
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
fuzz() { python3 tests/fuzz/fuzz_datapath.py --build "$build" "$@"; }

for canary in guard heap; do
    if fuzz --canary "$canary" >"$build/canary.log" 2>&1 || ! grep -q "ERROR: AddressSanitizer" "$build/canary.log"; then
        cat "$build/canary.log" >&2
        echo "fuzz: the $canary canary was not reported: the sanitizer is not working" >&2
        exit 1
    fi
done
echo "fuzz: canaries reported (guard-page fault, heap overflow in C)"

rc=0
fuzz --seconds "$seconds" --status "$build/current" "$@" || rc=$?
if [ "$rc" != 0 ]; then
    at=$(sed 's/ *$//' "$build/current" 2>/dev/null || true)
    echo "fuzz: FAILED (exit $rc)${at:+ at iteration: $at}" >&2
    [ -z "$at" ] || echo "fuzz: replay with: bash .ci/fuzz.sh <the arguments before the parenthesis>" >&2
fi
exit "$rc"
