#!/bin/bash
# Counts the page faults (minor, as the kernel counts them in /proc/PID/stat) and the CPU time of both
# ferry processes during one round of a ferry-bench run.
#
# usage: tests/profile/round-faults.sh N
#
# Waits for the Nth `ferry sync --round` process to start (in a ferry-bench run: 1 initial, 2 no
# change, 3 one day, 4 fresh export), reads the `ferry serve` daemon's counters then, follows the sync's
# until it exits (its last reading is at most 50 ms before the end), reads the daemon's again and
# prints both. Start it just before ferry-bench, in the background. Gives up after 30 minutes.
#
# Example (BENCHMARKS.md, "Buffers reused once let go (tried, not kept)"):
#   tests/profile/round-faults.sh 1 > /tmp/faults.txt &
#   target/release/ferry-bench --files 200000 --work /mnt/bench --no-rsync --fill-memory /var/tmp
set -eu
n=$1
seen=0
last=""
deadline=$((SECONDS + 1800))
# Fields 10 (minflt), 14 and 15 (utime, stime in clock ticks) of /proc/PID/stat; the command name,
# field 2, has no spaces for ferry's processes.
counters() { awk -v hz="$(getconf CLK_TCK)" '{printf "%d faults, %.2f CPU-seconds", $10, ($14 + $15) / hz}' "/proc/$1/stat"; }
while [ "$SECONDS" -lt "$deadline" ]; do
    pid=$(pgrep -f "ferry.* sync --round" | head -1 || true)
    if [ -n "$pid" ] && [ "$pid" != "$last" ]; then
        seen=$((seen + 1))
        last=$pid
        if [ "$seen" -eq "$n" ]; then
            serve=$(pgrep -f "ferry.* serve --listen" | head -1)
            before=$(counters "$serve")
            sync=""
            while [ -e "/proc/$pid/stat" ]; do
                sync=$(counters "$pid" 2>/dev/null || echo "$sync")
                sleep 0.05
            done
            echo "round $n, destination (ferry serve, pid $serve): before $before; after $(counters "$serve")"
            echo "round $n, source (ferry sync, pid $pid), last reading: $sync"
            exit 0
        fi
    fi
    if [ "$seen" -lt "$n" ]; then sleep 0.003; else sleep 0.1; fi
done
echo "no round $n within 30 minutes" >&2
exit 1
