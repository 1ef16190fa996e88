#!/usr/bin/env python3
"""How long each of a ferry-bench run's connections took to open, from both nodes' logs:

  target/release/ferry-bench --files 200000 --work /mnt/bench --no-rsync --logs /tmp/logs
  tests/profile/connections.py /tmp/logs

Pairs the source's "connecting to" lines with the destination's "connection from" lines, in order
(both processes log on the same machine's clock), and prints the milliseconds between each pair.
Each round opens two connections: the readiness check before the scan, then the round itself; the
line after each on the destination's side says which.
"""
import datetime
import sys


def stamp(line):
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))


def main():
    logs = sys.argv[1]
    asked = [stamp(l) for l in open(f"{logs}/ferry-source.log", errors="replace") if "connecting to" in l]
    # Each accepted connection, and what it turned out to be: the line after it that says so.
    accepted = []
    for line in open(f"{logs}/ferry-dest.log", errors="replace"):
        if "connection from" in line:
            accepted.append([stamp(line), "?"])
        elif accepted and accepted[-1][1] == "?":
            if "checked job" in line:
                accepted[-1][1] = "check"
            elif "round from" in line:
                accepted[-1][1] = "round"
    if len(asked) != len(accepted):
        sys.exit(f"{len(asked)} connections asked for, {len(accepted)} accepted: the logs do not pair up")
    print("connection  ms")
    for n, (a, (b, what)) in enumerate(zip(asked, accepted), 1):
        print(f"{n:3d} {what:6s} {(b - a).total_seconds() * 1000:6.1f}")


if __name__ == "__main__":
    main()
