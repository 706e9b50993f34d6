#!/usr/bin/env bash
# Compares the claim path of two builds of the criterion bench, interleaved
# bench by bench on the same machine, and prints the median of the point
# estimates with the after/before ratio.
#
#   git worktree add /tmp/before <commit>
#   (cd /tmp/before && cargo bench --bench store --no-run)   # prints the binary
#   cargo bench --bench store --no-run
#   benches/side-by-side.sh /tmp/before/target/release/deps/store-<hash> \
#                           target/release/deps/store-<hash> [rounds]
#
# CRITERION_ARGS (default "--warm-up-time 1 --measurement-time 3
# --sample-size 30") shortens each criterion run, so that six rounds of the
# eight benches on two builds fit in about half an hour.
set -euo pipefail
before=$1 after=$2 rounds=${3:-6}
read -r -a criterion <<< "${CRITERION_ARGS:---warm-up-time 1 --measurement-time 3 --sample-size 30}"
out=$(mktemp)
benches=('claim/new/Periodic/1$' 'claim/new/Periodic/64$' 'claim/cycle/Periodic/1$'
         'claim/cycle/Periodic/64$' 'claim/new/Sync/1$' 'claim/new/Sync/64$'
         'claim/cycle/Sync/1$' 'claim/cycle/Sync/64$')
for round in $(seq "$rounds"); do
    for bench in "${benches[@]}"; do
        for side in before after; do
            bin=$before; [ "$side" = after ] && bin=$after
            "$bin" --bench --noplot "${criterion[@]}" "$bench" 2>/dev/null | grep -E '^claim.*time:' | sed "s|^|$side |" >> "$out"
        done
    done
done
python3 - "$out" "$rounds" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r'(\w+) (\S+)\s+time:\s+\[\S+ \S+ (\S+) (\S+)', line)
    if m:
        side, name, value, unit = m.groups()
        scale = {'ns': 1e-3, 'µs': 1.0, 'ms': 1e3}[unit]
        rows.setdefault(name, {}).setdefault(side, []).append(float(value) * scale)
print(f"| bench | before µs | after µs | after/before |  (median of {sys.argv[2]} interleaved runs)")
for name, sides in rows.items():
    b, a = statistics.median(sides['before']), statistics.median(sides['after'])
    print(f"| {name} | {b:.2f} | {a:.2f} | {a / b:.3f} |")
PY
rm -f "$out"
