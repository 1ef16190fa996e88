#!/bin/bash
# Counts the page faults (minor, as the kernel counts them in /proc/PID/stat) and the CPU time of both
# ferry processes during one round of a ferry-bench run.
#
# usage: tests/profile/round-faults.sh N
#
# Through during-round.sh: when the Nth `ferry sync --round` starts (in a ferry-bench run: 1 initial,
# 2 no change, 3 one day, 4 fresh export), reads the `ferry serve` daemon's counters, follows the
# sync's until it exits (its last reading is at most 50 ms before the end), reads the daemon's again
# and prints both. Start it just before ferry-bench, in the background.
#
# Example:
#   tests/profile/round-faults.sh 1 > /tmp/faults.txt &
#   target/release/ferry-bench --files 200000 --work /mnt/bench --no-rsync --fill-memory /var/tmp
set -eu
if [ "$1" != "--follow" ]; then
    exec "$(dirname "$0")/during-round.sh" "$1" "$0" --follow "$1" {serve} {sync}
fi
n=$2 serve=$3 sync=$4
# Fields 10 (minflt), 14 and 15 (utime, stime in clock ticks) of /proc/PID/stat; the command name,
# field 2, has no spaces for ferry's processes.
counters() { awk -v hz="$(getconf CLK_TCK)" '{printf "%d faults, %.2f CPU-seconds", $10, ($14 + $15) / hz}' "/proc/$1/stat"; }
before=$(counters "$serve")
last=""
finish() {
    echo "round $n, destination (ferry serve, pid $serve): before $before; after $(counters "$serve")"
    echo "round $n, source (ferry sync, pid $sync), last reading: $last"
    exit 0
}
# during-round.sh interrupts this once the sync has exited.
trap finish INT
while [ -e "/proc/$sync/stat" ]; do
    last=$(counters "$sync" 2>/dev/null || echo "$last")
    sleep 0.05
done
finish
