#!/usr/bin/env bash
# Does `ferry sync --low-priority` yield to other traffic? A source and a destination network namespace
# joined through a router namespace, whose way to the destination is shaped by `tc tbf` (default
# 20 Mbit/s, a 100 ms queue); a ferry round starts, and a TCP flow (the production traffic, Cubic unless
# told otherwise) starts beside it 3 s later. Prints the TCP flow's throughput alone, beside a normal
# round and beside a low-priority round, and each round's time. Needs root (ip netns, tc); removes what
# it creates.
#
# The queue is in the router, as on a real path. A queue on the sending host itself holds only about a
# millisecond of a TCP flow (the kernel's TCP small queues) however much UDP stands in it: there a TCP
# flow gets almost nothing beside any UDP sender, low priority or not.
#
#   sudo tests/netns/low-priority.sh [RATE_MBIT] [TREE_MIB] [TCP_CONGESTION]
set -euo pipefail

rate_mbit=${1:-20}
tree_mib=${2:-40}
tcp_cc=${3:-cubic}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/ferry-lowprio.XXXXXX)
ns_a=ferry-lp-a-$$
ns_b=ferry-lp-b-$$
ns_r=ferry-lp-r-$$

cleanup() {
    set +e
    [ -n "${serve_pid:-}" ] && kill "$serve_pid" 2>/dev/null
    ip netns del "$ns_a" 2>/dev/null
    ip netns del "$ns_b" 2>/dev/null
    ip netns del "$ns_r" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ]; then
    echo "low-priority.sh: needs root (network namespaces and tc); skipped" >&2
    exit 0
fi

cargo build --release -q -p ferry --manifest-path "$here/Cargo.toml"
ferry="$here/target/release/ferry"

for ns in "$ns_a" "$ns_r" "$ns_b"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip link add "va$$" netns "$ns_a" type veth peer name "ra$$" netns "$ns_r"
ip link add "vb$$" netns "$ns_b" type veth peer name "rb$$" netns "$ns_r"
ip -n "$ns_a" addr add 10.77.1.1/24 dev "va$$"
ip -n "$ns_r" addr add 10.77.1.254/24 dev "ra$$"
ip -n "$ns_r" addr add 10.77.0.254/24 dev "rb$$"
ip -n "$ns_b" addr add 10.77.0.2/24 dev "vb$$"
ip -n "$ns_a" link set "va$$" up
ip -n "$ns_r" link set "ra$$" up
ip -n "$ns_r" link set "rb$$" up
ip -n "$ns_b" link set "vb$$" up
ip -n "$ns_a" route add default via 10.77.1.254
ip -n "$ns_b" route add default via 10.77.0.254
ip netns exec "$ns_r" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
# The bottleneck: the router's way to B, with a queue of 100 ms.
ip netns exec "$ns_r" tc qdisc add dev "rb$$" root tbf rate "${rate_mbit}mbit" burst 32kbit latency 100ms

# A TCP sink in B; a sender in A that prints its throughput over a period.
cat >"$work/sink.py" <<'EOF'
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.77.0.2", 5201)); s.listen(8)
while True:
    c, _ = s.accept()
    while c.recv(1 << 16):
        pass
    c.close()
EOF
cat >"$work/send.py" <<'EOF'
import socket, sys, time
seconds, congestion = float(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
s.connect(("10.77.0.2", 5201))
buf = b"x" * 65536
sent, start = 0, time.time()
while time.time() - start < seconds:
    sent += s.send(buf)
s.close()
print(f"{sent * 8 / (time.time() - start) / 1e6:.1f}")
EOF
ip netns exec "$ns_b" python3 "$work/sink.py" &
sink_pid=$!
sleep 0.5

# Two nodes, a job per variant.
src="$work/src-node" dst="$work/dst-node"
src_id=$("$ferry" --config-dir "$src" init 2>/dev/null | head -1)
dst_id=$("$ferry" --config-dir "$dst" init 2>/dev/null | head -1)
"$ferry" --config-dir "$dst" trust "$src_id" --name source >/dev/null
"$ferry" --config-dir "$src" trust "$dst_id" --name dest --addr 10.77.0.2:7373 >/dev/null
mkdir -p "$work/tree"
for i in $(seq 1 "$tree_mib"); do head -c 1048576 /dev/urandom >"$work/tree/blob-$i"; done
for job in normal low; do
    "$ferry" --config-dir "$dst" job add "$job" --path "$work/target-$job" --peer source >/dev/null
    "$ferry" --config-dir "$src" job add "$job" --path "$work/tree" --peer dest >/dev/null
done
ip netns exec "$ns_b" "$ferry" --config-dir "$dst" serve --listen 10.77.0.2:7373 >/dev/null 2>&1 &
serve_pid=$!
sleep 1

seconds=15
alone=$(ip netns exec "$ns_a" python3 "$work/send.py" "$seconds" "$tcp_cc")

round() { # job, extra flags: prints the round's seconds
    local started=$(date +%s.%N)
    ip netns exec "$ns_a" "$ferry" --config-dir "$src" sync --round "$1" ${2:-} --json >/dev/null 2>"$work/$1.err" ||
        { cat "$work/$1.err" >&2; exit 1; }
    python3 -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(date +%s.%N)" "$started"
}

# The round starts first (overnight, the link is quiet); 3 s later production traffic (the TCP flow)
# starts, for $seconds s, while the round goes on.
for job in normal low; do
    flags=""; [ "$job" = low ] && flags="--low-priority"
    round "$job" "$flags" >"$work/time-$job" &
    sync=$!
    sleep 3
    ip netns exec "$ns_a" python3 "$work/send.py" "$seconds" "$tcp_cc" >"$work/tcp-$job"
    wait "$sync"
done
"$ferry" --config-dir "$src" job add solo --path "$work/tree" --peer dest >/dev/null
"$ferry" --config-dir "$dst" job add solo --path "$work/target-solo" --peer source >/dev/null
solo=$(round solo --low-priority)
kill "$sink_pid" 2>/dev/null || true

echo "link: ${rate_mbit} Mbit/s tbf in a router, 100 ms queue; tree: ${tree_mib} MiB incompressible; TCP flow: ${seconds} s, $tcp_cc"
printf '%-40s %10s\n' "TCP alone (Mbit/s)" "$alone"
printf '%-40s %10s   round %.1f s\n' "TCP beside a normal round (Mbit/s)" "$(cat "$work/tcp-normal")" "$(cat "$work/time-normal")"
printf '%-40s %10s   round %.1f s\n' "TCP beside a --low-priority round" "$(cat "$work/tcp-low")" "$(cat "$work/time-low")"
printf '%-40s %10s   round %.1f s\n' "--low-priority round alone" "-" "$solo"
