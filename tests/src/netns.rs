//! A real, rate-limited link for tests and benchmarks: two network namespaces joined by a veth pair,
//! the source's way out shaped by `tc tbf`. These machines have no netem: delay and loss come from
//! [`crate::UdpProxy`]. Needs root and `ip`/`tc`.

use std::ffi::OsStr;
use std::io;
use std::process::Command;
use std::time::Duration;

/// Two namespaces and the veth between them, removed when dropped.
pub struct ShapedLink {
    source: String,
    dest: String,
    device: String,
}

impl ShapedLink {
    /// The source's address, in [`ShapedLink::source_ns`].
    pub const SOURCE_ADDR: &str = "10.77.0.1";
    /// The destination's address, in [`ShapedLink::dest_ns`].
    pub const DEST_ADDR: &str = "10.77.0.2";

    /// The link, the source's way out at `mbit` Mbit/s with a queue of `queue`. `Ok(None)` when this
    /// machine does not let us make a namespace (not root, or a container without the right).
    pub fn create(mbit: u32, queue: Duration) -> io::Result<Option<Self>> {
        let id = std::process::id();
        let link = Self { source: format!("ferry-{id}-s"), dest: format!("ferry-{id}-d"), device: format!("fs{id}") };
        let peer = format!("fd{id}");
        if !Command::new("ip").args(["netns", "add", &link.source]).status().is_ok_and(|s| s.success()) {
            return Ok(None);
        }
        // From here on, dropping `link` removes what was made.
        ip(&["netns", "add", &link.dest])?;
        ip(&["link", "add", &link.device, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &link.device, "netns", &link.source])?;
        ip(&["link", "set", &peer, "netns", &link.dest])?;
        for (ns, dev, addr) in [(&link.source, &link.device, Self::SOURCE_ADDR), (&link.dest, &peer, Self::DEST_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // The bucket holds 10 ms at the rate (at least 4 KiB): tbf needs at least a timer tick's worth.
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 100).max(4096).to_string();
        let (rate, latency) = (format!("{mbit}mbit"), format!("{}ms", queue.as_millis()));
        let tbf = ["rate", rate.as_str(), "burst", burst.as_str(), "latency", latency.as_str()];
        let qdisc = ["netns", "exec", &link.source, "tc", "qdisc", "add", "dev", &link.device, "root", "tbf"];
        ip(&[&qdisc[..], &tbf[..]].concat())?;
        Ok(Some(link))
    }

    /// The source's namespace.
    pub fn source_ns(&self) -> &str {
        &self.source
    }

    /// The destination's namespace.
    pub fn dest_ns(&self) -> &str {
        &self.dest
    }

    /// Takes the source's side of the link down, or up again.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        ip(&["-n", &self.source, "link", "set", &self.device, if up { "up" } else { "down" }])
    }

    /// `program`, to be run in namespace `ns` (`ip netns exec` execs it: the child's PID is the
    /// program's).
    pub fn exec(ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        for ns in [&self.source, &self.dest] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `ip` with `args`; its error output becomes the error.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(io::Error::other(format!("ip {}: {}", args.join(" "), why.trim())));
    }
    Ok(())
}
