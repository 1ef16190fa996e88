#!/usr/bin/env python3
"""Where both cores went, second by second, from a whole-machine profile of one round:

  tests/profile/during-round.sh 1 perf record -a -F 999 -o /tmp/all.data &
  target/release/ferry-bench --files 200000 --work /mnt/bench --no-rsync --fill-memory /var/tmp
  perf script -i /tmp/all.data -F comm,pid,tid,time,ip,sym > /tmp/all.txt
  tests/profile/busy.py [--step SECONDS] [--from S] [--to S] /tmp/all.txt [SOURCE_PID DEST_PID]

`perf record -a` samples every CPU at the same rate, the idle ones too (as pid 0), so a share of the
samples is a share of the machine's time. For each second of the round it prints how much of it was
idle, ferry's source (`ferry sync`), its destination (`ferry serve`) and everything else (kernel
threads: writeback, the disk, softirqs) and the same over the whole, then each of ferry's threads,
with its four most sampled functions. `--step 0.1` prints tenths of a second instead (a round with
few changes lasts two); `--from` and `--to` keep only the samples between those seconds (counted
from the first sample), for one phase of the round. Without the pids the source is the process with a `ferry-examine`
thread (the scan) and the destination the one with a `ferry-make` or `ferry-manifests` thread.
"""
import argparse
import collections
import sys


def samples(path):
    """Yields (comm, pid, tid, seconds, symbol) for each line of a `perf script` without call graphs."""
    for line in open(path, errors="replace"):
        fields = line.split()
        slash = next((i for i, f in enumerate(fields) if "/" in f and f.split("/")[0].isdigit()), None)
        if slash is None or slash + 1 >= len(fields):
            continue
        pid, tid = fields[slash].split("/")
        time = float(fields[slash + 1].rstrip(":"))
        symbol = " ".join(fields[slash + 3 :]) or "?"
        yield (" ".join(fields[:slash]), pid, tid, time, symbol)


def main():
    parser = argparse.ArgumentParser(description="Where both cores went during one round.")
    parser.add_argument("--step", type=float, default=1.0, help="seconds per line (default 1)")
    parser.add_argument("--from", dest="start", type=float, default=0.0, help="first second kept")
    parser.add_argument("--to", dest="end", type=float, default=float("inf"), help="first second left out")
    parser.add_argument("script", help="`perf script -F comm,pid,tid,time,ip,sym` output")
    parser.add_argument("pids", nargs="*", help="SOURCE_PID DEST_PID")
    args = parser.parse_args()
    step = args.step
    rows = list(samples(args.script))
    if not rows:
        sys.exit("no samples: record with `perf record -a`, print with `perf script -F comm,pid,tid,time,ip,sym`")
    # The processes are told apart by threads of the whole profile, which one phase may lack.
    names = collections.defaultdict(set)
    for comm, pid, _, _, _ in rows:
        names[pid].add(comm)
    if len(args.pids) == 2:
        source, dest = args.pids
    else:
        source = next((p for p, n in names.items() if "ferry-examine" in n), None)
        dest = next((p for p, n in names.items() if n & {"ferry-make", "ferry-manifests"}), None)
    role = {source: "source", dest: "dest", "0": "idle"}
    first = min(r[3] for r in rows)
    rows = [r for r in rows if args.start <= r[3] - first < args.end]
    if not rows:
        sys.exit("no samples between --from and --to")

    per_step = collections.defaultdict(collections.Counter)
    others = collections.defaultdict(collections.Counter)
    threads = collections.Counter()
    symbols = collections.defaultdict(collections.Counter)
    for comm, pid, tid, time, symbol in rows:
        bucket = int((time - first) / step)
        who = role.get(pid, "other")
        per_step[bucket][who] += 1
        if who == "other":
            others[bucket][comm.split("/")[0].split("-")[0]] += 1
        if who in ("source", "dest"):
            threads[(who, comm, tid)] += 1
            symbols[(who, comm, tid)][symbol] += 1

    print(f"source pid {source}, destination pid {dest}; shares of both cores' time")
    print("  from  idle  source  dest  other (largest)")
    for bucket in sorted(per_step):
        counts = per_step[bucket]
        total = sum(counts.values())
        share = {k: 100 * counts[k] / total for k in ("idle", "source", "dest", "other")}
        largest = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in others[bucket].most_common(2))
        print(
            f"{bucket * step:6.1f} {share['idle']:5.1f} {share['source']:7.1f} {share['dest']:5.1f} {share['other']:6.1f}"
            f"  ({largest})"
        )
    whole = collections.Counter()
    for counts in per_step.values():
        whole.update(counts)
    total = len(rows)
    share = {k: 100 * whole[k] / total for k in ("idle", "source", "dest", "other")}
    print(f"{'whole':>6s} {share['idle']:5.1f} {share['source']:7.1f} {share['dest']:5.1f} {share['other']:6.1f}")
    span = max(r[3] for r in rows) - min(r[3] for r in rows)
    print(f"\nferry's threads, shares of both cores' time ({total} samples in {span:.2f} s)")
    for (who, comm, tid), n in threads.most_common(12):
        top = ", ".join(f"{s[:40]} {100 * k / n:.0f}%" for s, k in symbols[(who, comm, tid)].most_common(4))
        print(f"{100 * n / total:5.1f}%  {who:6s} {comm}#{tid}: {top}")


if __name__ == "__main__":
    main()
