//! `--wan`: ferry through the UDP proxy set to a lossy 100 Mbit/s, 50 ms link.

use std::time::Duration;

use crate::args::{Args, Result};
use crate::ferry::FerryPair;

/// ferry's initial round through a 100 Mbit/s link with 50 ms of round trip and 1% loss, and an
/// Ethernet MTU: the link drops datagrams of more than 1472 bytes, as a WAN path would.
pub(crate) fn wan(args: &Args, ferry: &FerryPair, files: u64, bytes: u64) -> Result<()> {
    const RATE: u64 = 100_000_000 / 8;
    let proxy = ferry_testkit::UdpProxy::start(ferry.daemon_addr.parse()?)?;
    proxy.set(ferry_testkit::Impairment {
        rate: Some(RATE),
        delay: Duration::from_millis(25),
        loss: args.loss / 100.0,
        queue: Duration::from_millis(50),
        max_datagram: Some(1472),
        ..ferry_testkit::Impairment::default()
    });
    ferry.point_at(&proxy.addr().to_string())?;
    rustix::fs::sync();
    // What reached the destination each second: where the link sat idle, or was not full.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (m, per_second) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut per_second = Vec::new();
            let mut last = proxy.bytes().0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let now = proxy.bytes().0;
                per_second.push((now - last) * 8 / 1_000_000);
                last = now;
            }
            per_second
        });
        let m = ferry.round();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (m, sampler.join().unwrap_or_default())
    });
    let m = m?;
    let per_second: Vec<String> = per_second.iter().map(u64::to_string).collect();
    let goodput = bytes as f64 * 8.0 / m.wall.as_secs_f64() / 1e6;
    // The link is idle while the source scans (reads and hashes) its tree: goodput after the scan.
    let after_scan = m.wall.saturating_sub(m.scan.unwrap_or_default());
    let transfer_goodput = bytes as f64 * 8.0 / after_scan.as_secs_f64() / 1e6;
    let (up, down) = proxy.bytes();
    let out = format!(
        "ferry's initial round through the UDP proxy as a 100 Mbit/s link, 50 ms RTT, {}% loss, 50 ms buffer \
         (`ferry-bench --wan --loss {} --congestion {} --files {}`): {files} files, {} MiB in {:.1} s: goodput {goodput:.1} Mbit/s, \
         {:.0}% of the link; after the scan ({:.1} s): {transfer_goodput:.1} Mbit/s, {:.0}% of the link; \
         {} bytes through the proxy (to the destination {up}, back {down}), bytes_on_wire {}.\n\
         Mbit/s to the destination, second by second: {}.\n",
        args.loss,
        args.loss,
        args.congestion,
        args.files,
        bytes >> 20,
        m.wall.as_secs_f64(),
        goodput,
        m.scan.unwrap_or_default().as_secs_f64(),
        transfer_goodput,
        up + down,
        m.wire,
        per_second.join(" ")
    );
    print!("{out}");
    if let Some(path) = &args.write {
        std::fs::write(path, out)?;
    }
    Ok(())
}
