//! A UDP impairment proxy for tests: sits between a QUIC client and a server and delays, drops,
//! duplicates and reorders datagrams, blacks the link out, rebinds its server-side port (what a NAT
//! does), and counts every byte it forwards. `tc netem` is not available on the machines ferry is
//! tested on; this is its stand-in, set per test and changeable while traffic flows.
//!
//! One client at a time: the last address a datagram came from is where replies go.

use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

/// What the link does to datagrams, per direction alike.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Extra random delay, up to this much (datagrams overtake each other when it exceeds their gap).
    pub jitter: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Bursty loss: once a datagram is lost, the next ones are lost with this probability.
    pub burst: f64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by an extra `delay + 10 ms`, behind later ones.
    pub reorder: f64,
    /// The link's rate in bytes per second, each way (`None`: as fast as loopback): datagrams leave
    /// one after the other, each taking its size over the rate.
    pub rate: Option<u64>,
    /// With a rate: how long a datagram may wait for the link before it is dropped, as a router's
    /// buffer would (zero: 100 ms).
    pub queue: Duration,
    /// The largest datagram payload the link carries (`None`: any, as loopback); larger ones are
    /// dropped, as a router drops a packet that may not be fragmented. 1472 is an Ethernet path's.
    pub max_datagram: Option<usize>,
}

struct Packet {
    due: Instant,
    seq: u64,
    to_server: bool,
    data: Vec<u8>,
}

impl PartialEq for Packet {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Packet {}
impl PartialOrd for Packet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Packet {
    // The earliest first out of the max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

struct Shared {
    impairment: Mutex<Impairment>,
    upstream: Mutex<SocketAddr>,
    client: Mutex<Option<SocketAddr>>,
    /// The server-side socket; replaced by [`UdpProxy::rebind`].
    server_side: Mutex<Arc<UdpSocket>>,
    generation: AtomicU64,
    blackout: AtomicBool,
    stop: AtomicBool,
    queue: Mutex<(BinaryHeap<Packet>, u64)>,
    /// With a rate: when the link is free again, to the server and to the client.
    link_free: Mutex<[Instant; 2]>,
    queued: Condvar,
    to_server_bytes: AtomicU64,
    to_client_bytes: AtomicU64,
    rng: Mutex<(rand_chacha::ChaCha8Rng, bool)>,
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    shared: Arc<Shared>,
    client_side: Arc<UdpSocket>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, unimpaired until told otherwise.
    pub fn start(upstream: SocketAddr) -> io::Result<Self> {
        let client_side = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        client_side.set_read_timeout(Some(Duration::from_millis(50)))?;
        let shared = Arc::new(Shared {
            impairment: Mutex::new(Impairment::default()),
            upstream: Mutex::new(upstream),
            client: Mutex::new(None),
            server_side: Mutex::new(Arc::new(server_socket()?)),
            generation: AtomicU64::new(0),
            blackout: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            queue: Mutex::new((BinaryHeap::new(), 0)),
            link_free: Mutex::new([Instant::now(); 2]),
            queued: Condvar::new(),
            to_server_bytes: AtomicU64::new(0),
            to_client_bytes: AtomicU64::new(0),
            rng: Mutex::new((rand_chacha::ChaCha8Rng::seed_from_u64(7), false)),
        });
        let mut proxy = Self { shared, client_side, threads: Vec::new() };
        let (shared, socket) = (proxy.shared.clone(), proxy.client_side.clone());
        proxy.threads.push(std::thread::spawn(move || from_client(&shared, &socket)));
        let (shared, socket) = (proxy.shared.clone(), proxy.client_side.clone());
        proxy.threads.push(std::thread::spawn(move || scheduler(&shared, &socket)));
        proxy.spawn_server_reader();
        Ok(proxy)
    }

    fn spawn_server_reader(&mut self) {
        let shared = self.shared.clone();
        let generation = shared.generation.load(Ordering::SeqCst);
        self.threads.push(std::thread::spawn(move || from_server(&shared, generation)));
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.client_side.local_addr().expect("a bound socket has an address")
    }

    /// Changes what the link does, from the next datagram on.
    pub fn set(&self, impairment: Impairment) {
        if let Ok(mut current) = self.shared.impairment.lock() {
            *current = impairment;
        }
    }

    /// Points the proxy at another server (a restarted daemon on a new port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        if let Ok(mut current) = self.shared.upstream.lock() {
            *current = upstream;
        }
    }

    /// Drops everything, both ways, while on.
    pub fn blackout(&self, on: bool) {
        self.shared.blackout.store(on, Ordering::SeqCst);
    }

    /// Sends to the server from a new port from now on, as a NAT that forgot the mapping would.
    pub fn rebind(&mut self) -> io::Result<()> {
        let socket = Arc::new(server_socket()?);
        if let Ok(mut current) = self.shared.server_side.lock() {
            *current = socket;
        }
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.spawn_server_reader();
        Ok(())
    }

    /// Bytes forwarded so far (UDP payloads): to the server, to the client.
    pub fn bytes(&self) -> (u64, u64) {
        (self.shared.to_server_bytes.load(Ordering::SeqCst), self.shared.to_client_bytes.load(Ordering::SeqCst))
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.queued.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn server_socket() -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(socket)
}

fn from_client(shared: &Shared, socket: &UdpSocket) {
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else { continue };
        if let Ok(mut client) = shared.client.lock() {
            *client = Some(from);
        }
        impair(shared, true, &buf[..len]);
    }
}

fn from_server(shared: &Shared, generation: u64) {
    let Ok(socket) = shared.server_side.lock().map(|s| s.clone()) else { return };
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::SeqCst) && shared.generation.load(Ordering::SeqCst) == generation {
        let Ok((len, _)) = socket.recv_from(&mut buf) else { continue };
        impair(shared, false, &buf[..len]);
    }
}

/// Decides a datagram's fate and queues its copies.
fn impair(shared: &Shared, to_server: bool, data: &[u8]) {
    if shared.blackout.load(Ordering::SeqCst) {
        return;
    }
    let Ok(impairment) = shared.impairment.lock().map(|i| i.clone()) else { return };
    if impairment.max_datagram.is_some_and(|max| data.len() > max) {
        return;
    }
    let Ok(mut rng) = shared.rng.lock() else { return };
    let (rng, in_burst) = &mut *rng;
    let p_loss = if *in_burst { impairment.burst.max(impairment.loss) } else { impairment.loss };
    let lost = p_loss > 0.0 && rng.random_bool(p_loss.min(1.0));
    *in_burst = lost && impairment.burst > 0.0;
    if lost {
        return;
    }
    let copies = if impairment.duplicate > 0.0 && rng.random_bool(impairment.duplicate.min(1.0)) { 2 } else { 1 };
    let mut now = Instant::now();
    if let Some(rate) = impairment.rate.filter(|r| *r > 0) {
        // The datagram waits for the link, then takes its time on it; a full buffer drops it.
        let Ok(mut link_free) = shared.link_free.lock() else { return };
        let free = &mut link_free[usize::from(to_server)];
        let start = (*free).max(now);
        let limit = if impairment.queue.is_zero() { Duration::from_millis(100) } else { impairment.queue };
        if start - now > limit {
            return;
        }
        *free = start + Duration::from_secs_f64(data.len() as f64 / rate as f64);
        now = *free;
    }
    let Ok(mut queue) = shared.queue.lock() else { return };
    for _ in 0..copies {
        let mut due = now + impairment.delay;
        if !impairment.jitter.is_zero() {
            due += impairment.jitter.mul_f64(rng.random::<f64>());
        }
        if impairment.reorder > 0.0 && rng.random_bool(impairment.reorder.min(1.0)) {
            due += impairment.delay + Duration::from_millis(10);
        }
        queue.1 += 1;
        let seq = queue.1;
        queue.0.push(Packet { due, seq, to_server, data: data.to_vec() });
    }
    shared.queued.notify_one();
}

/// Sends queued datagrams when they are due.
fn scheduler(shared: &Shared, client_side: &UdpSocket) {
    let Ok(mut queue) = shared.queue.lock() else { return };
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let wait = match queue.0.peek() {
            Some(packet) if packet.due <= now => Duration::ZERO,
            Some(packet) => packet.due - now,
            None => Duration::from_millis(50),
        };
        if !wait.is_zero() {
            queue = match shared.queued.wait_timeout(queue, wait) {
                Ok((queue, _)) => queue,
                Err(_) => return,
            };
            continue;
        }
        let Some(packet) = queue.0.pop() else { continue };
        drop(queue);
        // Counted before the send, so that whoever receives the datagram sees it counted.
        let len = packet.data.len() as u64;
        if packet.to_server {
            let upstream = shared.upstream.lock().map(|u| *u);
            let socket = shared.server_side.lock().map(|s| s.clone());
            if let (Ok(upstream), Ok(socket)) = (upstream, socket) {
                shared.to_server_bytes.fetch_add(len, Ordering::SeqCst);
                if socket.send_to(&packet.data, upstream).is_err() {
                    shared.to_server_bytes.fetch_sub(len, Ordering::SeqCst);
                }
            }
        } else if let Ok(Some(client)) = shared.client.lock().map(|c| *c) {
            shared.to_client_bytes.fetch_add(len, Ordering::SeqCst);
            if client_side.send_to(&packet.data, client).is_err() {
                shared.to_client_bytes.fetch_sub(len, Ordering::SeqCst);
            }
        }
        queue = match shared.queue.lock() {
            Ok(queue) => queue,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (SocketAddr, std::thread::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let addr = socket.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = socket.recv_from(&mut buf) {
                let mut reply = from.port().to_be_bytes().to_vec();
                reply.extend_from_slice(&buf[..len]);
                socket.send_to(&reply, from).unwrap();
            }
        });
        (addr, thread)
    }

    #[test]
    fn forwards_counts_delays_drops_and_rebinds() {
        let (server, _thread) = echo_server();
        let mut proxy = UdpProxy::start(server).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let to = proxy.addr();
        // Sends 100 bytes through the proxy: the echo's view of our port, and the round trip.
        let ask = |client: &UdpSocket, byte: u8| -> Option<(u16, Duration)> {
            let mut buf = [0u8; 2048];
            let started = Instant::now();
            client.send_to(&[byte; 100], to).ok()?;
            let (len, _) = client.recv_from(&mut buf).ok()?;
            assert_eq!(len, 102);
            Some((u16::from_be_bytes([buf[0], buf[1]]), started.elapsed()))
        };

        let (port, _) = ask(&client, 1).unwrap();
        assert_eq!(proxy.bytes(), (100, 102));
        proxy.set(Impairment { delay: Duration::from_millis(100), ..Impairment::default() });
        let (_, rtt) = ask(&client, 2).unwrap();
        assert!(rtt >= Duration::from_millis(200), "{rtt:?}");
        proxy.set(Impairment { loss: 1.0, ..Impairment::default() });
        assert!(ask(&client, 3).is_none());
        proxy.set(Impairment::default());
        proxy.blackout(true);
        assert!(ask(&client, 4).is_none());
        proxy.blackout(false);
        // The server sees another source port after a rebind; replies still reach the client.
        proxy.rebind().unwrap();
        let (new_port, _) = ask(&client, 5).unwrap();
        assert_ne!(port, new_port);
        // A link with a smaller MTU drops the 100-byte datagram, and carries it again when it fits.
        proxy.set(Impairment { max_datagram: Some(99), ..Impairment::default() });
        assert!(ask(&client, 6).is_none());
        proxy.set(Impairment { max_datagram: Some(102), ..Impairment::default() });
        ask(&client, 7).unwrap();
        proxy.set(Impairment { duplicate: 1.0, ..Impairment::default() });
        ask(&client, 8).unwrap();
        assert!(client.recv_from(&mut [0u8; 2048]).is_ok(), "the duplicate arrives too");
    }

    #[test]
    fn a_rate_spaces_datagrams_and_a_full_buffer_drops() {
        let (server, _thread) = echo_server();
        let proxy = UdpProxy::start(server).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
        // 10 KB/s with a 100 ms buffer holds about one 1000-byte datagram: of 50 sent at once, the
        // first few pass, one every 100 ms, the rest are dropped.
        proxy.set(Impairment { rate: Some(10_000), queue: Duration::from_millis(100), ..Impairment::default() });
        let started = Instant::now();
        for _ in 0..50 {
            client.send_to(&[9u8; 1000], proxy.addr()).unwrap();
        }
        let mut received = 0;
        let mut buf = [0u8; 2048];
        while client.recv_from(&mut buf).is_ok() {
            received += 1;
        }
        assert!((1..=5).contains(&received), "{received} of 50 passed a 10 KB/s link with a 100 ms buffer");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
