#!/bin/bash
# Runs a command (a profiler) for the length of one round of a ferry-bench run.
#
# usage: tests/profile/during-round.sh N COMMAND...
#
# Waits for the Nth `ferry sync --round` process to start (in a ferry-bench run: 1 initial, 2 no
# change, 3 one day, 4 fresh export), runs COMMAND with `{sync}` and `{serve}` replaced by the pids
# of that sync and of the `ferry serve` daemon, and stops COMMAND with SIGINT when the sync exits.
# Start it just before ferry-bench. Gives up after 30 minutes. Until the round starts it looks for it
# every 3 ms (a round with no change lasts half a second), which costs the rounds before it a few
# percent of the CPU; during the round it looks every 100 ms.
#
# Examples:
#   tests/profile/during-round.sh 3 perf record -F 1999 --call-graph dwarf,16384 -p {serve} -o /tmp/dest.data &
#   tests/profile/during-round.sh 3 perf record -e sched:sched_switch -e sched:sched_wakeup \
#       -e sched:sched_waking -e sched:sched_wakeup_new --call-graph dwarf,8192 -a -o /tmp/sched.data &
set -eu
n=$1
shift
seen=0
last=""
deadline=$((SECONDS + 1800))
while [ "$SECONDS" -lt "$deadline" ]; do
    pid=$(pgrep -f "ferry.* sync --round" | head -1 || true)
    if [ -n "$pid" ] && [ "$pid" != "$last" ]; then
        seen=$((seen + 1))
        last=$pid
        if [ "$seen" -eq "$n" ]; then
            serve=$(pgrep -f "ferry.* serve --listen" | head -1 || true)
            args=()
            for arg in "$@"; do
                arg=${arg//\{sync\}/$pid}
                args+=("${arg//\{serve\}/$serve}")
            done
            "${args[@]}" &
            command=$!
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
            kill -INT "$command" 2>/dev/null || true
            wait "$command" || true
            exit 0
        fi
    fi
    sleep 0.003
done
echo "during-round.sh: no round $n within 30 minutes" >&2
exit 1
