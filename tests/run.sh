#!/usr/bin/env bash
# Prepare this host for the whole test suite, check the tree with ruff and mypy, then run it.
#
# As root it installs the Debian packages the tests drive, reserves hugetlbfs
# pages and sets POSTCOPY_REQUIRE_ALL=1 so that a test whose prerequisite is
# missing fails instead of being skipped. As a normal user such tests skip
# with the reason printed in pytest's summary (-ra).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    need=()
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    command -v ip >/dev/null || need+=(iproute2)
    command -v promtool >/dev/null || need+=(prometheus)
    command -v xz >/dev/null || need+=(xz-utils)
    command -v cc >/dev/null || need+=(gcc libc6-dev)   # tests/handler builds its VMM stand-in
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    # 2 MiB pages for the hugetlbfs tests and demos (both roles of a 1 GiB
    # migration fit), and 1 GiB pages where the kernel can find them.
    want2m=${POSTCOPY_HUGEPAGES_2M:-1200}
    [ "$(cat /proc/sys/vm/nr_hugepages)" -ge "$want2m" ] || echo "$want2m" > /proc/sys/vm/nr_hugepages
    gig=/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages
    if [ -w "$gig" ] && [ "$(cat "$gig")" -lt 2 ]; then echo 2 > "$gig" || true; fi
    echo "hugepages: 2M=$(cat /proc/sys/vm/nr_hugepages) 1G=$(cat "$gig" 2>/dev/null || echo 0)"
    export POSTCOPY_REQUIRE_ALL=1
fi

python3 -m pip install -q --root-user-action=ignore --disable-pip-version-check -e '.[test]'
# Static checks first (configured in pyproject.toml): a lint or type error fails the run.
python3 -m ruff check .
python3 -m mypy
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
if [ "$rc" = 0 ] && [ $# = 0 ]; then
    # The sans-IO core ran compiled (mypyc, setup.py) above; its suites again on its Python
    # source, which is the fallback and what a stale or missing build loads.
    POSTCOPY_PURE_PYTHON=1 python3 -m pytest -q tests/wire tests/session || rc=$?
fi
exit "$rc"
