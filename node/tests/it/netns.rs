//! Rounds over a real, shaped link: a source and a destination network namespace joined through a
//! router namespace whose way to the destination is limited by `tc tbf` (these machines have no
//! netem; delay and loss come from the UDP proxy in `faults.rs`). Needs root; without it the tests say
//! loudly that they skipped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_testkit::ShapedLink;

use crate::network::{Daemon, Node};
use crate::util::{assert_same_tree, finish_round, is_root, random_bytes, write};

/// A source node in the link's source namespace, a destination daemon in its destination namespace,
/// and a job `zimbra` between them. (Fields drop in this order: the daemon before its namespace.)
struct AcrossLink {
    _daemon: Daemon,
    link: ShapedLink,
    source: Node,
    tree: PathBuf,
    target: PathBuf,
    _dir: tempfile::TempDir,
}

impl AcrossLink {
    /// `None` (after saying why) where this machine cannot make namespaces.
    fn new(mbit: u32, queue: Duration) -> Option<Self> {
        if !is_root() || Command::new("tc").arg("-V").output().is_err() {
            eprintln!("SKIPPED: the network-namespace tests need root, ip and tc");
            return None;
        }
        let Some(link) = ShapedLink::create(mbit, queue).unwrap() else {
            eprintln!("SKIPPED: cannot create a network namespace here (ip netns add failed)");
            return None;
        };
        let dir = tempfile::Builder::new().prefix("ferry-netns-").tempdir().unwrap();
        let (source, dest) = (Node::init(dir.path(), "source-node"), Node::init(dir.path(), "dest-node"));
        dest.ok(&["trust", &source.id, "--name", "source"]);
        let addr = format!("{}:7373", ShapedLink::DEST_ADDR);
        let daemon = Daemon::start_wrapped(&dest, &["ip", "netns", "exec", link.dest_ns()], &["--listen", &addr]);
        assert_eq!(daemon.addr, addr);
        source.ok(&["trust", &dest.id, "--name", "dest", "--addr", &addr]);
        let (tree, target) = (dir.path().join("export"), dir.path().join("migration"));
        dest.ok(&["job", "add", "zimbra", "--path", target.to_str().unwrap(), "--peer", "source"]);
        source.ok(&["job", "add", "zimbra", "--path", tree.to_str().unwrap(), "--peer", "dest"]);
        Some(Self { _daemon: daemon, link, source, tree, target, _dir: dir })
    }

    /// Writes `mib` MiB of incompressible files under `folder` of the tree.
    fn add_files(&self, folder: &str, mib: u64, seed: u64) -> u64 {
        for i in 0..mib {
            write(&self.tree.join(format!("{folder}/{i:02}")), &random_bytes(1 << 20, seed + i));
        }
        mib << 20
    }

    /// `ferry sync --round zimbra --json` with `extra`, in the source's namespace.
    fn sync(&self, extra: &[&str]) -> Command {
        let mut command = ShapedLink::exec(self.link.source_ns(), crate::util::ferry_bin());
        command.arg("--config-dir").arg(&self.source.config);
        command.args(["sync", "--round", "zimbra", "--json"]).args(extra);
        command
    }

    /// Waits (at most two minutes) for a round started with [`Self::sync`], checks that it brought
    /// the target in step with the tree, and returns its report.
    fn finish(&self, child: Child) -> serde_json::Value {
        let report = finish_round(child, Duration::from_secs(120));
        assert_eq!(report["in_sync"], true);
        assert_same_tree(&self.tree, &self.target, |_| false);
        report
    }

    /// [`Self::sync`], started.
    fn spawn(&self, extra: &[&str]) -> Child {
        self.sync(extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }
}

#[test]
fn rounds_cross_a_shaped_veth_link_and_a_link_that_goes_down() {
    let Some(across) = AcrossLink::new(20, Duration::from_millis(100)) else { return };

    // 12 MiB of incompressible data through 20 Mbit/s: it crosses the shaped link, at most at its rate.
    let bytes = across.add_files("d", 12, 0);
    let started = Instant::now();
    across.finish(across.spawn(&[]));
    let took = started.elapsed();
    let mbit = bytes as f64 * 8.0 / took.as_secs_f64() / 1e6;
    println!("12 MiB over a 20 Mbit/s tbf link: {:.1} s, {mbit:.1} Mbit/s of file data", took.as_secs_f64());
    assert!(mbit < 21.0, "faster than the link: the round did not cross it ({mbit:.1} Mbit/s)");

    // The link goes down for 4 s in the middle of the next round; the round waits and completes.
    across.add_files("e", 12, 100);
    let child = across.spawn(&[]);
    std::thread::sleep(Duration::from_secs(2));
    across.link.set_up(false).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    across.link.set_up(true).unwrap();
    across.finish(child);
}

/// A round's connection leaves slow start when the round trip starts to grow (HyStart), not when the
/// bottleneck's queue overflows: through 20 Mbit/s with a 100 ms queue (250 KB), a round of 12 MiB
/// loses next to nothing. Without it (quinn's Cubic alone) slow start overflows the queue and about
/// 0.4 MB goes twice.
#[test]
fn a_round_leaves_slow_start_before_the_queue_overflows() {
    let Some(across) = AcrossLink::new(20, Duration::from_millis(100)) else { return };
    let bytes = across.add_files("d", 12, 0);
    let report = across.finish(across.spawn(&[]));
    let lost = report["bytes_lost"].as_u64().unwrap();
    println!("12 MiB through 20 Mbit/s with a 100 ms queue: {lost} bytes lost and sent again");
    assert!(lost < bytes / 200, "slow start overflowed the queue: {lost} bytes lost");
}

/// The operator's promise of `--low-priority`: a round that runs into the day's traffic gives the link
/// to it. A TCP flow (Cubic, as a server's own traffic) starts 2 s into a low-priority round through a
/// 20 Mbit/s link with a 100 ms queue and must get most of the link; beside a round at the default
/// controller it gets 6 to 11 Mbit/s (this test without the flag, and `tests/netns/low-priority.sh`).
#[test]
fn a_low_priority_round_leaves_a_shaped_link_to_other_traffic() {
    const MBIT: u32 = 20;
    let Some(across) = AcrossLink::new(MBIT, Duration::from_millis(100)) else { return };
    across.add_files("d", 16, 0);
    let round = across.spawn(&["--low-priority"]);
    std::thread::sleep(Duration::from_secs(2));
    let tcp = tcp_flow(&across.link, Duration::from_secs(6));
    across.finish(round);
    println!("TCP beside a --low-priority round through {MBIT} Mbit/s: {tcp:.1} Mbit/s");
    assert!(
        tcp > 0.7 * f64::from(MBIT),
        "the low-priority round kept the link: TCP beside it got {tcp:.1} of {MBIT} Mbit/s"
    );
}

/// Sends TCP from the link's source namespace to its destination namespace for `sending`, with Cubic
/// (what a mail server's own traffic uses; this machine's default may be another), and returns the
/// goodput the receiver saw, in Mbit/s.
fn tcp_flow(link: &ShapedLink, sending: Duration) -> f64 {
    const PORT: u16 = 5201;
    let (dest_ns, source_ns) = (link.dest_ns().to_owned(), link.source_ns().to_owned());
    let (listening, listen) = mpsc::channel();
    let sink = std::thread::spawn(move || {
        ShapedLink::enter(&dest_ns).unwrap();
        let listener = TcpListener::bind((ShapedLink::DEST_ADDR, PORT)).unwrap();
        listening.send(()).unwrap();
        let (mut flow, _) = listener.accept().unwrap();
        flow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (started, mut received, mut buf) = (Instant::now(), 0u64, vec![0; 1 << 16]);
        loop {
            match flow.read(&mut buf).unwrap() {
                0 => break,
                n => received += n as u64,
            }
        }
        received as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6
    });
    listen.recv().unwrap();
    std::thread::spawn(move || {
        ShapedLink::enter(&source_ns).unwrap();
        let mut flow = TcpStream::connect((ShapedLink::DEST_ADDR, PORT)).unwrap();
        if let Err(e) = rustix::net::sockopt::set_tcp_congestion(&flow, "cubic") {
            eprintln!("the TCP flow keeps this machine's congestion control: cannot choose cubic ({e})");
        }
        flow.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let (deadline, buf) = (Instant::now() + sending, vec![0x5a; 1 << 16]);
        while Instant::now() < deadline {
            flow.write_all(&buf).unwrap();
        }
        flow.shutdown(Shutdown::Write).unwrap();
    })
    .join()
    .unwrap();
    sink.join().unwrap()
}
