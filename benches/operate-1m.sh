#!/usr/bin/env bash
# The command-line tool on a database of 1,000,000 records: import (from a
# generated JSON Lines file), stats, list --min-attempts 3, verify, export,
# sweep and compact, each timed. The figures in docs/operating.md and
# BENCHMARKS.md come from this script:
#
#   cargo build --release --features cli && bash benches/operate-1m.sh [DIR]
#
# Records (one namespace): 700,000 done and 100,000 pending (attempts 1 to
# 5), live for a day; 200,000 done records that expired an hour ago.
set -euo pipefail
cd "$(dirname "$0")/.."
tool="$PWD/target/release/sled-idempotency"
dir="${1:-$(mktemp -d)}"
mkdir -p "$dir"
db="$dir/db"
rm -rf "$db" "$db.compact"

python3 - "$dir/in.jsonl" <<'PY'
import sys, time, uuid
now = int(time.time() * 1000)
day, hour = 86_400_000, 3_600_000
with open(sys.argv[1], "w") as out:
    for n in range(1_000_000):
        # UUIDv7-shaped ids: a millisecond prefix, then the counter.
        ms = now - 2 * day + n
        key = uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0x8 << 60) | n)
        if n % 5 == 0:
            state, expires, attempts = "done", now - hour, 1
        elif n % 10 == 1:
            state, expires, attempts = "pending", now + day, 1 + (n // 10) % 5
        else:
            state, expires, attempts = "done", now + day, 1
        out.write(
            '{"schema":1,"format":2,"namespace":"default","id":"%s","state":"%s",'
            '"expires_at":%d,"token":%d,"attempts":%d,"ttl_ms":%d,'
            '"fingerprint":null,"result":null}\n'
            % (key, state, expires, n + 1, attempts, day)
        )
PY
echo "input: $(wc -l < "$dir/in.jsonl") lines, $(du -h "$dir/in.jsonl" | cut -f1)"

timed() {
    local label="$1"; shift
    local start end
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    printf '%s: %.2f s\n' "$label" "$(echo "$end - $start" | bc)" >&2
}

timed "import" "$tool" import "$db" "$dir/in.jsonl"
timed "stats" "$tool" stats "$db"
timed "list --min-attempts 3" "$tool" list "$db" --min-attempts 3 --limit 5
timed "verify" "$tool" verify "$db"
timed "export" "$tool" export "$db" --out "$dir/out.jsonl"
timed "sweep" "$tool" sweep "$db"
timed "compact" "$tool" compact "$db"
timed "stats after" "$tool" stats "$db"
