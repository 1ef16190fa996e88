//! A real, rate-limited link for tests and benchmarks: a source and a destination namespace, and a
//! router namespace between them whose way to the destination is shaped by `tc tbf`. The queue is in
//! the router, as on a real path, not in the source's own stack: a queue on the sending host holds
//! only about a millisecond of a TCP flow (the kernel's TCP small queues) however much UDP stands in
//! it, which starves any TCP flow beside a UDP one and says nothing of the network. These machines
//! have no netem: delay and loss come from [`crate::UdpProxy`]. Needs root and `ip`/`tc`.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The three namespaces and the two veth pairs between them, removed when dropped.
pub struct ShapedLink {
    source: String,
    router: String,
    dest: String,
    /// The router's end of the veth pair to the source.
    router_device: String,
}

impl ShapedLink {
    /// The source's address, in [`ShapedLink::source_ns`].
    pub const SOURCE_ADDR: &str = "10.77.1.1";
    /// The destination's address, in [`ShapedLink::dest_ns`].
    pub const DEST_ADDR: &str = "10.77.0.2";
    /// The router's addresses on the source's side and on the destination's.
    const ROUTER_ADDRS: [&str; 2] = ["10.77.1.254", "10.77.0.254"];

    /// The link, from the source to the destination at `mbit` Mbit/s with a queue of `queue` in the
    /// router (the way back is not shaped). `Ok(None)` when this machine does not let us make a
    /// namespace (not root, or a container without the right).
    pub fn create(mbit: u32, queue: Duration) -> io::Result<Option<Self>> {
        // Unique on this machine: the process, and which of its links.
        static LINKS: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}x{}", std::process::id(), LINKS.fetch_add(1, Ordering::Relaxed));
        let link = Self {
            source: format!("ferry-{id}-s"),
            router: format!("ferry-{id}-r"),
            dest: format!("ferry-{id}-d"),
            router_device: format!("rs{id}"),
        };
        let (source_device, router_dest, dest_device) = (format!("fs{id}"), format!("rd{id}"), format!("fd{id}"));
        let router_source = &link.router_device;
        if !Command::new("ip").args(["netns", "add", &link.source]).status().is_ok_and(|s| s.success()) {
            return Ok(None);
        }
        // From here on, dropping `link` removes what was made.
        ip(&["netns", "add", &link.router])?;
        ip(&["netns", "add", &link.dest])?;
        for (end, ns, router_end) in
            [(&source_device, &link.source, router_source), (&dest_device, &link.dest, &router_dest)]
        {
            ip(&["link", "add", end, "type", "veth", "peer", "name", router_end])?;
            ip(&["link", "set", end, "netns", ns])?;
            ip(&["link", "set", router_end, "netns", &link.router])?;
        }
        let [router_to_source, router_to_dest] = Self::ROUTER_ADDRS;
        for (ns, dev, addr) in [
            (&link.source, &source_device, Self::SOURCE_ADDR),
            (&link.router, router_source, router_to_source),
            (&link.router, &router_dest, router_to_dest),
            (&link.dest, &dest_device, Self::DEST_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &link.source, "route", "add", "default", "via", router_to_source])?;
        ip(&["-n", &link.dest, "route", "add", "default", "via", router_to_dest])?;
        ip(&["netns", "exec", &link.router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        // The bucket holds 10 ms at the rate (at least 4 KiB): tbf needs at least a timer tick's worth.
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 100).max(4096).to_string();
        let (rate, latency) = (format!("{mbit}mbit"), format!("{}ms", queue.as_millis()));
        let tbf = ["rate", rate.as_str(), "burst", burst.as_str(), "latency", latency.as_str()];
        let qdisc = ["netns", "exec", &link.router, "tc", "qdisc", "add", "dev", &router_dest, "root", "tbf"];
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

    /// Cuts the link in the network (the router's side toward the source goes down), or mends it. The
    /// source's own interface and routes stay as they are, as when a line between two sites breaks.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        ip(&["-n", &self.router, "link", "set", &self.router_device, if up { "up" } else { "down" }])
    }

    /// `program`, to be run in namespace `ns` (`ip netns exec` execs it: the child's PID is the
    /// program's).
    pub fn exec(ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }

    /// Moves the calling thread into namespace `ns`: the sockets it makes from then on are there (for
    /// a flow of other traffic beside a round, say). Only this thread moves.
    pub fn enter(ns: &str) -> io::Result<()> {
        let handle = std::fs::File::open(format!("/run/netns/{ns}"))?;
        rustix::thread::move_into_link_name_space(handle.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
        Ok(())
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and with them their peers.
        for ns in [&self.source, &self.router, &self.dest] {
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
