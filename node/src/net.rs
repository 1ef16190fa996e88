//! QUIC endpoints (quinn) with ferry's TLS and transport settings, and framed message streams.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::BytesMut;
use ferry_certs::{Identity, NodeId, TrustedPeers};
use ferry_proto::{ALPN, Message, decode, encode};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

/// UDP socket buffers: the kernel default (about 208 KB) drops packets even on loopback.
const SOCKET_BUFFER: usize = 4 << 20;

/// Flow-control windows and limits: large enough for long fat links, bounded so that a peer cannot
/// make us buffer without end.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(32u32.into())
        .stream_receive_window((16u32 << 20).into())
        .receive_window((64u32 << 20).into())
        .send_window(64 << 20)
        .max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("60 s is a valid idle timeout")))
        .keep_alive_interval(Some(Duration::from_secs(10)));
    Arc::new(transport)
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
    let tls = ferry_certs::server_config(identity, trusted, ALPN).context("cannot build the TLS server config")?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| anyhow!("TLS config unusable for QUIC: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport());
    // A flood of connection attempts queues at most this many handshakes; the rest are refused.
    server.max_incoming(256);
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), udp_socket(listen)?, runtime)
        .with_context(|| format!("cannot listen on {listen}"))
}

/// Resolves `host:port`.
pub(crate) fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

/// Connects to `peer` at `addr`, accepting only its pinned key.
pub(crate) async fn connect(
    identity: &Identity,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<quinn::Connection, anyhow::Error> {
    let tls = ferry_certs::client_config(identity, peer, ALPN).context("cannot build the TLS client config")?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| anyhow!("TLS config unusable for QUIC: {e}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport());
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime"))?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp_socket(bind)?, runtime)?;
    endpoint.set_default_client_config(client);
    let connecting = endpoint.connect(addr, "ferry")?;
    Ok(connecting.await?)
}

/// The node ID the peer of an established connection proved.
pub(crate) fn peer_id(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    ferry_certs::peer_node_id(&certs)
}

/// Writes one framed message.
pub(crate) async fn send(stream: &mut quinn::SendStream, message: &Message) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    encode(message, &mut buf)?;
    stream.write_all(&buf).await.context("the connection dropped while sending")?;
    Ok(())
}

/// Writes one framed message in 64 KiB pieces, each only when `bucket` allows it: the bandwidth limit
/// applies to what enters QUIC, smoothly, with QUIC's own overhead (about 3%) counted in.
pub(crate) async fn send_limited(
    stream: &mut quinn::SendStream,
    message: &Message,
    bucket: &std::sync::Mutex<ferry_engine::TokenBucket>,
) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    encode(message, &mut buf)?;
    for piece in buf.chunks(64 << 10) {
        let cost = piece.len() as u64 + piece.len() as u64 / 32;
        loop {
            let wait =
                bucket.lock().map_err(|_| anyhow!("rate limiter poisoned"))?.take(cost, std::time::Instant::now());
            match wait {
                Some(wait) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    break;
                }
                // Paused: look again in a second (the rate may change).
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        stream.write_all(piece).await.context("the connection dropped while sending")?;
    }
    Ok(())
}

/// Reads framed messages from a stream.
pub(crate) struct FrameReader {
    stream: quinn::RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    /// Reads from `stream`.
    pub(crate) fn new(stream: quinn::RecvStream) -> Self {
        Self { stream, buf: BytesMut::with_capacity(64 << 10) }
    }

    /// The next message, or `None` at the end of the stream.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            if let Some(message) = decode(&mut self.buf)? {
                return Ok(Some(message));
            }
            if self.buf.capacity() - self.buf.len() < 16 << 10 {
                self.buf.reserve(64 << 10);
            }
            let chunk =
                self.stream.read_chunk(256 << 10, true).await.context("the connection dropped while receiving")?;
            match chunk {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
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
