#!/bin/bash
# The destination's work alone: a first local round (`ferry sync --round SRC DEST`, no network, no
# source daemon on the other core) of a generated tree, for each build given, in turn, ROUNDS times.
#
# usage: tests/profile/local-rounds.sh WORK ROUNDS FERRY...
#
# WORK is a scratch folder on the filesystem to measure (the benchmarks use /mnt/bench, a journaled
# ext4); the tree (200,000 files, seed 1, as `ferry-bench --files 200000` makes) is written to
# WORK/src once, if missing, with `cargo run --release -p ferry-testkit --example generate_tree`.
# Before each round WORK/dst and WORK/state are removed and the disk synced. Prints for each round
# the wall time and, from the round's `--json` report, the apply's duration and its waits (seconds).
#
# Example:
#   tests/profile/local-rounds.sh /mnt/bench 4 /tmp/ferry-before target/release/ferry
set -eu
work=$1
rounds=$2
shift 2
if [ ! -d "$work/src" ]; then
    cargo run -q --release -p ferry-testkit --example generate_tree -- "$work/src" 200000 1
fi
for _ in $(seq "$rounds"); do
    for ferry in "$@"; do
        rm -rf "$work/dst" "$work/state"
        sync
        sleep 2
        started=$(date +%s.%N)
        "$ferry" sync --round "$work/src" "$work/dst" --state-dir "$work/state" --json > "$work/report.json"
        ended=$(date +%s.%N)
        python3 - "$ferry" "$started" "$ended" "$work/report.json" <<'PY'
import json, sys
ferry, started, ended, report = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
apply = json.load(open(report))["apply"]
waits = " ".join(f"{k} {apply.get(k, 0) / 1000:.2f}" for k in ("sync_wait", "make_wait", "place_wait"))
print(f"{ferry}: wall {ended - started:.2f} s, apply {apply['duration'] / 1000:.2f} s ({waits})")
PY
    done
done
rm -rf "$work/dst" "$work/state" "$work/report.json"
