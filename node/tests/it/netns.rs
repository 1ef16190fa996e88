//! Rounds over a real, shaped link: two network namespaces joined by a veth pair, the source's side
//! limited by `tc tbf` (these machines have no netem; delay and loss come from the UDP proxy in
//! `faults.rs`). Needs root; without it the test says loudly that it skipped.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::ShapedLink;

use crate::network::{Daemon, Node};
use crate::util::{assert_same_tree, is_root, random_bytes, write};

#[test]
fn rounds_cross_a_shaped_veth_link_and_a_link_that_goes_down() {
    if !is_root() || Command::new("tc").arg("-V").output().is_err() {
        eprintln!("SKIPPED: the network-namespace test needs root, ip and tc");
        return;
    }
    let Some(link) = ShapedLink::create(20, Duration::from_millis(100)).unwrap() else {
        eprintln!("SKIPPED: cannot create a network namespace here (ip netns add failed)");
        return;
    };
    let dir = tempfile::Builder::new().prefix("ferry-netns-").tempdir().unwrap();
    let (source, dest) = (Node::init(dir.path(), "source-node"), Node::init(dir.path(), "dest-node"));
    dest.ok(&["trust", &source.id, "--name", "source"]);
    let addr = format!("{}:7373", ShapedLink::DEST_ADDR);
    let daemon = Daemon::start_wrapped(&dest, &["ip", "netns", "exec", link.dest_ns()], &["--listen", &addr]);
    assert_eq!(daemon.addr, addr);
    source.ok(&["trust", &dest.id, "--name", "dest", "--addr", &addr]);
    let (tree, target) = (dir.path().join("export"), dir.path().join("migration"));
    let mut bytes = 0;
    for i in 0..12 {
        let data = random_bytes(1 << 20, i);
        bytes += data.len() as u64;
        write(&tree.join(format!("d/{i:02}")), &data);
    }
    dest.ok(&["job", "add", "zimbra", "--path", target.to_str().unwrap(), "--peer", "source"]);
    source.ok(&["job", "add", "zimbra", "--path", tree.to_str().unwrap(), "--peer", "dest"]);
    let sync = |extra: &[&str]| {
        let mut command = ShapedLink::exec(link.source_ns(), crate::util::ferry_bin());
        command.arg("--config-dir").arg(&source.config);
        command.args(["sync", "--round", "zimbra", "--json"]).args(extra);
        command
    };

    // 12 MiB of incompressible data through 20 Mbit/s: it crosses the shaped link, at most at its rate.
    let started = Instant::now();
    let out = sync(&[]).output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true);
    assert_same_tree(&tree, &target, |_| false);
    let mbit = bytes as f64 * 8.0 / took.as_secs_f64() / 1e6;
    println!("12 MiB over a 20 Mbit/s tbf link: {:.1} s, {mbit:.1} Mbit/s of file data", took.as_secs_f64());
    assert!(mbit < 21.0, "faster than the link: the round did not cross it ({mbit:.1} Mbit/s)");

    // The link goes down for 4 s in the middle of the next round; the round waits and completes.
    for i in 0..12 {
        write(&tree.join(format!("e/{i:02}")), &random_bytes(1 << 20, 100 + i));
    }
    let mut child =
        sync(&[]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    link.set_up(false).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    link.set_up(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the round did not finish after the link came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(&tree, &target, |_| false);
    drop(daemon);
}
