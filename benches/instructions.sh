#!/usr/bin/env bash
# Instructions per operation on the claim path, counted by Valgrind's
# callgrind (Debian package valgrind) inside `measured` of
# benches/instructions.rs only. Deterministic: use it for before/after
# claims of the claim path on this noisy machine.
#
#   benches/instructions.sh [N]                 # this tree
#   BEFORE=/tmp/before benches/instructions.sh  # and another checkout, side by side
#   SCENARIOS="protocol once" benches/instructions.sh  # Store::once against the protocol by hand
#
# Prints a markdown table: instructions per operation for each scenario
# (and, with BEFORE, the other tree's and the ratio).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }

binary() { # the bench binary of the checkout in $1
    (cd "$1" && cargo bench --bench instructions --no-run --message-format=json 2>/dev/null) |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "instructions":
        print(m["executable"])'
}

count() { # instructions per operation, median of three runs: binary, scenario
    local out
    out=$(mktemp -d)
    for run in 1 2 3; do
        valgrind --tool=callgrind --callgrind-out-file="$out/$run" --collect-atstart=no \
            --toggle-collect='instructions::measured' "$1" "$2" "$n" >/dev/null 2>&1
    done
    # The function's exact name: a pattern with a trailing wildcard also
    # matches its async block (`measured::{closure#0}`), and callgrind
    # toggles again on entering that, which switched collection off for
    # everything the block ran (24 instructions per operation counted).
    # sled's own threads touch the same locks and pages now and then, so
    # single runs differ by up to 2 % on new keys; the median steadies it.
    python3 - "$out" "$n" <<'PY'
import os, sys
totals = []
for name in os.listdir(sys.argv[1]):
    for line in open(os.path.join(sys.argv[1], name)):
        if line.startswith("summary:") or line.startswith("totals:"):
            total = int(line.split()[1])
    totals.append(total)
totals.sort()
print(f"{totals[len(totals) // 2] / int(sys.argv[2]):.0f}")
PY
    rm -rf "$out"
}

if [ -n "${BEFORE:-}" ] && [ ! -f "$BEFORE/benches/instructions.rs" ]; then
    # A checkout from before this benchmark: give it the same program.
    cp benches/instructions.rs "$BEFORE/benches/"
    printf '\n[[bench]]\nname = "instructions"\nharness = false\n' >> "$BEFORE/Cargo.toml"
fi
after=$(binary .)
before=${BEFORE:+$(binary "$BEFORE")}
echo "Instructions per operation (callgrind, $n operations, Periodic, one task):"
echo
if [ -n "$before" ]; then
    echo "| scenario | before | after | after ÷ before |"
    echo "|---|---:|---:|---:|"
else
    echo "| scenario | instructions |"
    echo "|---|---:|"
fi
for scenario in ${SCENARIOS:-new duplicate cycle}; do
    a=$(count "$after" "$scenario")
    if [ -n "$before" ]; then
        b=$(count "$before" "$scenario")
        echo "| $scenario | $b | $a | $(python3 -c "print(f'{$a / $b:.3f}')") |"
    else
        echo "| $scenario | $a |"
    fi
done
