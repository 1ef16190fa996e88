#!/bin/bash
# Prints a process's resident memory (VmRSS, VmHWM) and thread count every 10 ms until it exits.
#
# usage: tests/profile/rss.sh PID > rss.log
#
# With during-round.sh, for the source of a ferry-bench run's no-change round:
#   tests/profile/during-round.sh 2 tests/profile/rss.sh {sync} > /tmp/rss.log &
# The scan's threads end when the thread count drops; what follows is the round's connection.
set -eu
pid=$1
while [ -e "/proc/$pid/status" ]; do
    echo "$(date +%s.%N | cut -c7-14) $(grep -E 'VmRSS|VmHWM' "/proc/$pid/status" | tr -s ' \n' ' ') threads=$(ls "/proc/$pid/task" 2>/dev/null | wc -l)"
    sleep 0.01
done
