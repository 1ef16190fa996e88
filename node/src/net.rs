//! QUIC endpoints (quinn) with ferry's TLS and transport settings, and framed message streams.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::{Bytes, BytesMut};
use ferry_certs::{Identity, NodeId, TrustedPeers};
use ferry_proto::{ALPN, ChunkBatch, Message, OLDER_ALPNS, Refusal, bytes_missing, decode, encode, encode_chunk_batch};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::refused::Refused;

/// UDP socket buffers: the kernel default (about 208 KB) drops packets even on loopback.
const SOCKET_BUFFER: usize = 4 << 20;

/// The largest UDP payload ferry sends or accepts: the upper bound of QUIC's path MTU discovery. On an
/// Ethernet path discovery stays at quinn's 1452 bytes; on loopback or jumbo frames it climbs to this,
/// and the fixed cost of each packet (encryption, header protection, acknowledgement, its share of a
/// system call) is paid for four and a half times as many bytes.
///
/// quinn sends up to [`QUINN_GSO_BATCH`] datagrams with one `sendmsg` (GSO), and the kernel refuses a
/// batch larger than one UDP datagram can be (64 KiB) with `EMSGSIZE`, which quinn-udp drops without a
/// word. With 8952-byte datagrams, batches of eight (71,616 bytes) were refused, quinn took the losses
/// for a black hole and fell back to 1200-byte datagrams, and a 1 GiB round once crawled into its idle
/// timeout. Ten of these fit.
const MAX_UDP_PAYLOAD: u16 = 6500;

/// The most datagrams quinn puts in one GSO batch (`MAX_TRANSMIT_SEGMENTS` in quinn 0.11).
const QUINN_GSO_BATCH: usize = 10;

/// The ACK frequency threshold the data's receiver is asked to use: it acknowledges after more than
/// this many ack-eliciting packets.
const ACK_EVERY_PACKETS: u32 = 7;

/// The largest UDP payload of one datagram over IPv4 (65535 minus the IP and UDP headers).
const MAX_DATAGRAM: usize = 65_507;

const _: () = assert!(MAX_UDP_PAYLOAD as usize * QUINN_GSO_BATCH <= MAX_DATAGRAM);

/// How long a handshake may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flow-control windows and limits: large enough for long fat links, bounded so that a peer cannot
/// make us buffer without end.
fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(transport_config())
}

fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(32u32.into())
        .stream_receive_window((16u32 << 20).into())
        .receive_window((64u32 << 20).into())
        .send_window(64 << 20)
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("30 s is a valid idle timeout")))
        .keep_alive_interval(Some(Duration::from_secs(5)));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu));
    // The receiver acknowledges every 8th packet instead of every 2nd (QUIC's ACK frequency extension,
    // which quinn speaks on both ends), and at once when packets come out of order: half the traffic
    // back to the sender on a WAN link, and a steadier rate through a lossy one (`ferry-bench --wan`).
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_EVERY_PACKETS.into());
    transport.ack_frequency_config(Some(acks));
    transport
}

/// `config`, accepting datagrams of up to [`MAX_UDP_PAYLOAD`] bytes (a transport parameter: the peer
/// sends none larger).
fn accepting_large_datagrams(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("6500 bytes is a valid UDP payload size");
    config
}

fn udp_socket(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}"))?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER);
    Ok(socket)
}

/// The daemon's endpoint: accepts connections from `trusted` peers only.
pub(crate) fn server_endpoint(
    identity: &Identity,
    trusted: TrustedPeers,
    listen: SocketAddr,
) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = ferry_certs::server_config(identity, trusted, ALPN).context("cannot build the TLS server config")?;
    tls.alpn_protocols.extend(OLDER_ALPNS.iter().map(|alpn| alpn.to_vec()));
    let quic = QuicServerConfig::try_from(tls).map_err(|e| anyhow!("TLS config unusable for QUIC: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport());
    // A flood of connection attempts queues at most this many handshakes; the rest are refused.
    server.max_incoming(256);
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime"))?;
    // The stateless-reset key comes from the identity, so that a restarted daemon's resets are valid
    // for connections its previous run held: a source learns at once that its round is gone and
    // reconnects, instead of waiting for the idle timeout.
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &identity.derive_secret("ferry quic reset key v1"));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Connection IDs carry a keyed check that the endpoint validates before it answers with a reset:
    // that key must survive a restart as well.
    let cid_key = u64::from_le_bytes(identity.derive_secret("ferry quic cid key v1")[..8].try_into()?);
    endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    quinn::Endpoint::new(accepting_large_datagrams(endpoint_config), Some(server), udp_socket(listen)?, runtime)
        .with_context(|| format!("cannot listen on {listen}"))
}

/// How a round's connection paces itself against the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Congestion {
    /// Loss-based (quinn's default, like TCP's): fair to other flows, wastes nothing, but random loss
    /// (radio links) holds it far below the link's rate.
    #[default]
    Cubic,
    /// Model-based (quinn's experimental BBR): keeps most of a lossy link's rate, but overshoots shallow
    /// buffers and sends much again (`ferry-bench --wan`: 2.5× the file data).
    Bbr,
    /// Cubic that takes a loss at an empty queue for noise: keeps a lossy link's rate without BBR's
    /// overshoot, but is less fair to other flows behind a router that drops early (see `lossy.rs`).
    Lossy,
    /// Delay-based, after LEDBAT: yields as soon as the link's queue fills. Chosen by `--low-priority`
    /// only, not offered twice on the command line.
    #[value(skip)]
    LowPriority,
}

/// Resolves `host:port`.
pub(crate) fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

/// The QUIC endpoints a source's connections go out from: one per address family, made on first use
/// and kept for every connection of a round (the readiness check, the round, each reconnection).
///
/// quinn gives an endpoint a receive buffer for its largest batch of datagrams (32 batches of 64 GRO
/// segments of [`MAX_UDP_PAYLOAD`] bytes: 13.3 MB) and zeroes it when the endpoint is made. With an
/// endpoint per connection the source made and touched two of them a round, more memory than the
/// scan of 200,000 files needs (`ferry-bench --memory`). An endpoint
/// quinn has stopped (its socket failed) is replaced by the next connection.
#[derive(Default)]
pub(crate) struct Client {
    v4: std::sync::Mutex<Option<quinn::Endpoint>>,
    v6: std::sync::Mutex<Option<quinn::Endpoint>>,
}

impl Client {
    /// Connects to `peer` at `addr`, accepting only its pinned key.
    /// `congestion` picks the connection's congestion controller (see [`Congestion`]).
    pub(crate) async fn connect(
        &self,
        identity: &Identity,
        peer: NodeId,
        addr: SocketAddr,
        congestion: Congestion,
    ) -> Result<quinn::Connection, anyhow::Error> {
        let mut tls = ferry_certs::client_config(identity, peer, ALPN).context("cannot build the TLS client config")?;
        tls.alpn_protocols.extend(OLDER_ALPNS.iter().map(|alpn| alpn.to_vec()));
        let quic = QuicClientConfig::try_from(tls).map_err(|e| anyhow!("TLS config unusable for QUIC: {e}"))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = transport_config();
        match congestion {
            Congestion::Cubic => {
                let cubic = Arc::new(quinn::congestion::CubicConfig::default());
                transport.congestion_controller_factory(Arc::new(crate::hystart::HyStartConfig::around(cubic)));
            }
            Congestion::Bbr => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
            }
            Congestion::Lossy => {
                transport.congestion_controller_factory(Arc::new(crate::lossy::LossyConfig));
            }
            Congestion::LowPriority => {
                transport.congestion_controller_factory(Arc::new(crate::ledbat::LedbatConfig));
            }
        }
        client.transport_config(Arc::new(transport));
        let connecting = match self.endpoint(addr)?.connect_with(client.clone(), addr, "ferry") {
            // quinn stops an endpoint whose socket fails (any receive error but a reset): a reconnection
            // goes out from a new one instead of failing for the rest of the round.
            Err(quinn::ConnectError::EndpointStopping) => {
                tracing::debug!("the QUIC endpoint has stopped; making a new one");
                self.forget(addr);
                self.endpoint(addr)?.connect_with(client, addr, "ferry")?
            }
            connecting => connecting?,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(connection) => {
                let connection = connection?;
                match older_version(&connection) {
                    None => Ok(connection),
                    Some(theirs) => {
                        let text = version_words("the peer", &theirs);
                        connection.close(Refusal::ProtocolViolation.code().into(), text.as_bytes());
                        Err(Refused::new(Refusal::ProtocolViolation, text).into())
                    }
                }
            }
            Err(_) => Err(anyhow!(
                "no answer within {} s: is `ferry serve` running there, and is UDP to that port open?",
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }

    /// The slot of `addr`'s address family.
    fn slot(&self, addr: SocketAddr) -> std::sync::MutexGuard<'_, Option<quinn::Endpoint>> {
        let slot = if addr.is_ipv6() { &self.v6 } else { &self.v4 };
        slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops the endpoint for `addr`'s address family: the next connection makes a new one.
    fn forget(&self, addr: SocketAddr) {
        self.slot(addr).take();
    }

    /// The endpoint for `addr`'s address family, made on first use.
    fn endpoint(&self, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
        let mut slot = self.slot(addr);
        if let Some(endpoint) = slot.as_ref() {
            return Ok(endpoint.clone());
        }
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
        let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime"))?;
        let endpoint = quinn::Endpoint::new(
            accepting_large_datagrams(quinn::EndpointConfig::default()),
            None,
            udp_socket(bind)?,
            runtime,
        )?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }
}

/// The node ID the peer of an established connection proved.
/// The older protocol a connection's handshake settled on, if not this node's own ([`ALPN`]).
pub(crate) fn older_version(connection: &quinn::Connection) -> Option<String> {
    let data = connection.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?;
    let protocol = data.protocol.filter(|p| p != ALPN)?;
    Some(String::from_utf8_lossy(&protocol).into_owned())
}

/// What to tell an operator when `who` speaks the protocol `theirs`.
pub(crate) fn version_words(who: &str, theirs: &str) -> String {
    let ours = String::from_utf8_lossy(ALPN);
    format!(
        "{who} speaks {theirs} and this node {ours}: the two ferry versions cannot work together; install the \
         same version on both nodes (ferry --version)"
    )
}

pub(crate) fn peer_id(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    ferry_certs::peer_node_id(&certs)
}

/// Writes one framed message. (quinn keeps the frame's buffer as it is: `write_chunk` does not copy.)
pub(crate) async fn send(stream: &mut quinn::SendStream, message: &Message) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    encode(message, &mut buf)?;
    stream.write_chunk(buf.freeze()).await.context("the connection dropped while sending")?;
    Ok(())
}

/// Writes one message of the list of changes under `limiter`, like a chunk batch, except that a pause
/// that begins in the middle of it does not hold the rest (see
/// [`crate::limit::Limiter::acquire_unless_paused`]): a notice of the pause can only go between
/// messages. A first round's list is some 200 bytes a file on the wire, hundreds of megabytes on a
/// large store, and counts against the limit too.
pub(crate) async fn send_limited(
    stream: &mut quinn::SendStream,
    message: &Message,
    limiter: &crate::limit::Limiter,
) -> anyhow::Result<usize> {
    let mut buf = BytesMut::new();
    encode(message, &mut buf)?;
    let len = buf.len();
    write_limited(stream, buf.freeze(), limiter, false).await.map(|()| len)
}

/// Writes one chunk batch, each piece only when `limiter` allows it (see [`write_limited`]). The payload
/// goes to QUIC from the batch's own buffer, never copied into a frame.
pub(crate) async fn send_batch_limited(
    stream: &mut quinn::SendStream,
    batch: &ChunkBatch,
    limiter: &crate::limit::Limiter,
) -> anyhow::Result<()> {
    let (head, payload) = encode_chunk_batch(batch)?;
    for part in [head, payload] {
        write_limited(stream, part, limiter, true).await?;
    }
    Ok(())
}

/// Writes `bytes` in pieces of at most a second of traffic (1 to 64 KiB), each charged to `limiter`
/// before it enters QUIC, with QUIC's own overhead (about 3%) counted in: the bandwidth limit applies
/// smoothly, and the receiver sees bytes come at least every second or so however slow the limit (its
/// stall timer counts bytes, not whole messages). `pause_holds`: whether a pause (rate 0) waits, or
/// lets the pieces through.
async fn write_limited(
    stream: &mut quinn::SendStream,
    mut bytes: Bytes,
    limiter: &crate::limit::Limiter,
    pause_holds: bool,
) -> anyhow::Result<()> {
    while !bytes.is_empty() {
        let piece = bytes.split_to(bytes.len().min(piece_len(limiter.rate())));
        let charge = piece.len() as u64 + piece.len() as u64 / 32;
        if pause_holds {
            limiter.acquire(charge).await?;
        } else {
            limiter.acquire_unless_paused(charge).await?;
        }
        stream.write_chunk(piece).await.context("the connection dropped while sending")?;
    }
    Ok(())
}

/// How much [`write_limited`] charges and writes at a time under `rate`: about a second of traffic,
/// from 1 KiB (a piece smaller than that costs more in QUIC's framing than it carries) to 64 KiB.
fn piece_len(rate: ferry_engine::Rate) -> usize {
    const SMALLEST: u64 = 1 << 10;
    const LARGEST: u64 = 64 << 10;
    rate.bytes_per_second().map_or(LARGEST, |bps| bps.clamp(SMALLEST, LARGEST)) as usize
}

/// Reads framed messages from a stream.
pub(crate) struct FrameReader {
    stream: quinn::RecvStream,
    buf: BytesMut,
    /// Where the bytes read are counted, if anywhere.
    counter: Option<Arc<AtomicU64>>,
    /// The size of the last frame [`FrameReader::next`] gave.
    last_len: usize,
}

impl FrameReader {
    /// Reads from `stream`.
    pub(crate) fn new(stream: quinn::RecvStream) -> Self {
        Self { stream, buf: BytesMut::with_capacity(64 << 10), counter: None, last_len: 0 }
    }

    /// Reads from `stream`, adding the bytes read to `counter` as they come (a message under a slow
    /// limit takes long, and its bytes show that the peer is alive).
    pub(crate) fn counting(stream: quinn::RecvStream, counter: Arc<AtomicU64>) -> Self {
        Self { counter: Some(counter), ..Self::new(stream) }
    }

    /// How many bytes the last message [`FrameReader::next`] gave took on the stream.
    pub(crate) fn last_len(&self) -> usize {
        self.last_len
    }

    /// The next message, or `None` at the end of the stream.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            let before = self.buf.len();
            if let Some(message) = decode(&mut self.buf)? {
                self.last_len = before - self.buf.len();
                return Ok(Some(message));
            }
            // Reads stop at the frame's end, so that its buffer (which `decode` sized to it) holds that
            // frame alone: a chunk batch's payload stays in it until applied, and must not keep the
            // start of the next frame, or twice its size, alive with it.
            let chunk = (self.stream.read_chunk(bytes_missing(&self.buf).max(1), true).await)
                .context("the connection dropped while receiving")?;
            match chunk {
                Some(chunk) => {
                    if let Some(counter) = &self.counter {
                        counter.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    }
                    self.buf.extend_from_slice(&chunk.bytes)
                }
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(anyhow!("the stream ended in the middle of a message")),
            }
        }
    }
}

/// Application close codes, so that the other side can print why.
pub(crate) mod close {
    /// The round is over.
    pub(crate) const DONE: u32 = 0;
    /// A protocol or local error.
    pub(crate) const ERROR: u32 = 2;
}

/// How long a one-shot command waits for the close of a connection to leave.
const CLOSE_SENT_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Closes `connection` with `code` and `reason`, and waits until the close has gone out (at most
/// [`CLOSE_SENT_WITHIN`]): for a close that says why a round failed. QUIC sends a close once, from
/// the connection's driver task: a command that exits right after closing may never send it, and
/// its peer then learns nothing (not why the round ended, not that it did) until its idle timeout.
/// A closed connection sends nothing but its close, so the next datagram it counts is that (quinn
/// counts no close frames it sends); none is sent where the peer's own close came first. A
/// connection already closed is left as is. Returns whether the close was seen to go out.
pub(crate) async fn close_sent(connection: &quinn::Connection, code: u32, reason: &[u8]) -> bool {
    if connection.close_reason().is_some() {
        return false;
    }
    let before = connection.stats().udp_tx.datagrams;
    connection.close(code.into(), reason);
    let until = std::time::Instant::now() + CLOSE_SENT_WITHIN;
    loop {
        let stats = connection.stats();
        if stats.udp_tx.datagrams > before {
            return true;
        }
        if stats.frame_rx.connection_close > 0 {
            return false;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// About a second of traffic a piece, within 1 and 64 KiB.
    #[test]
    fn a_limited_piece_is_about_a_second_of_traffic() {
        let rate = |text: &str| ferry_engine::Rate::parse(text).unwrap();
        assert_eq!(piece_len(rate("5K")), 5 << 10);
        assert_eq!(piece_len(rate("100B")), 1 << 10, "at least 1 KiB");
        assert_eq!(piece_len(rate("20M")), 64 << 10);
        assert_eq!(piece_len(rate("0")), 1 << 10, "a pause: the smallest, if it lets a piece through");
        assert_eq!(piece_len(ferry_engine::Rate::UNLIMITED), 64 << 10);
    }

    /// A node listening on loopback that trusts a second one: the two identities, its endpoint and
    /// its address.
    fn a_listening_peer() -> (Identity, Identity, quinn::Endpoint, SocketAddr) {
        let server = Identity::generate().unwrap();
        let source = Identity::generate().unwrap();
        let trusted = TrustedPeers::default();
        trusted.write().unwrap().insert(source.node_id());
        let listening = server_endpoint(&server, trusted, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listening.local_addr().unwrap();
        (server, source, listening, addr)
    }

    /// A stopped endpoint (quinn stops one whose socket fails) is replaced, not reused for the rest of
    /// the round. A socket the kernel breaks cannot be made here, so the test closes the endpoint,
    /// which puts it in the same state for `connect_with`.
    #[tokio::test]
    async fn a_stopped_endpoint_is_replaced_by_the_next_connection() {
        let (server, source, listening, addr) = a_listening_peer();
        let accepting = tokio::spawn(async move {
            for _ in 0..2 {
                let connection = listening.accept().await.unwrap().await.unwrap();
                connection.closed().await;
            }
        });

        let client = Client::default();
        let first = client.connect(&source, server.node_id(), addr, Congestion::Cubic).await.unwrap();
        let stopped = client.endpoint(addr).unwrap();
        first.close(0u32.into(), b"");
        stopped.close(0u32.into(), b"");

        let second = client.connect(&source, server.node_id(), addr, Congestion::Cubic).await.unwrap();
        assert_eq!(peer_id(&second), Some(server.node_id()));
        assert_ne!(
            client.endpoint(addr).unwrap().local_addr().unwrap(),
            stopped.local_addr().unwrap(),
            "the second connection went out from a new socket"
        );
        second.close(0u32.into(), b"");
        tokio::time::timeout(Duration::from_secs(10), accepting).await.unwrap().unwrap();
    }

    /// A one-shot command's close goes out before it returns: the peer learns the code and the
    /// reason, and the wait ends on the close's datagram, not on its time limit.
    #[tokio::test]
    async fn a_close_is_sent_before_close_sent_returns() {
        let (server, source, listening, addr) = a_listening_peer();
        let accepting = tokio::spawn(async move { listening.accept().await.unwrap().await.unwrap().closed().await });
        let client = Client::default();
        let connection = client.connect(&source, server.node_id(), addr, Congestion::Cubic).await.unwrap();
        assert!(close_sent(&connection, 7, b"a protocol violation").await, "the close was not seen to go out");
        assert!(!close_sent(&connection, 7, b"again").await, "a closed connection sends nothing more");
        match tokio::time::timeout(Duration::from_secs(10), accepting).await.unwrap().unwrap() {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!((close.error_code, &close.reason[..]), (7u32.into(), &b"a protocol violation"[..]));
            }
            other => panic!("the peer saw {other:?}"),
        }
    }
}
