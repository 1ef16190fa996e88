//! An evil peer: a real QUIC connection with ferry's pinned TLS, from a trusted identity, that sends
//! whatever a test says — any message in any order, raw bytes, nothing at all — so that the other side's
//! defences are tested over the wire, not only on decoded messages.
//!
//! [`EvilSource`] connects to a daemon as a source would; [`EvilDestination`] listens as a daemon
//! would and lets a real `ferry sync` connect to it.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::BytesMut;
use ferry_certs::{Identity, NodeId};
use ferry_proto::{ALPN, Message, decode, encode};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

/// One bidirectional stream, framed.
pub struct EvilStream {
    /// The sending half, for raw writes.
    pub send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl EvilStream {
    /// Sends one framed message.
    pub async fn send(&mut self, message: &Message) -> anyhow::Result<()> {
        let mut buf = BytesMut::new();
        encode(message, &mut buf)?;
        self.send_raw(&buf).await
    }

    /// Sends bytes as they are (a bad frame, half a frame, garbage).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(bytes).await.context("the peer closed the stream")?;
        Ok(())
    }

    /// The next message, `None` at the end of the stream; an error when the connection ends, the
    /// bytes are not a frame, or nothing comes within `limit`.
    pub async fn next(&mut self, limit: Duration) -> anyhow::Result<Option<Message>> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(message) = decode(&mut self.buf)? {
                    return Ok(Some(message));
                }
                match self.recv.read_chunk(64 << 10, true).await? {
                    Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                    None => return Ok(None),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("nothing came within {limit:?}"))?
    }
}

fn endpoint(bind: SocketAddr, server: Option<quinn::ServerConfig>) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime"))?;
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)?)
}

/// A source that connects to a daemon with a trusted identity and then misbehaves.
pub struct EvilSource {
    /// The connection.
    pub connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl EvilSource {
    /// Connects to the daemon `server` at `addr` as `identity`.
    pub async fn connect(identity: &Identity, server: NodeId, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::connect_speaking(identity, server, addr, ALPN).await
    }

    /// Connects speaking the protocol `alpn` (an older ferry's, say).
    pub async fn connect_speaking(
        identity: &Identity,
        server: NodeId,
        addr: SocketAddr,
        alpn: &[u8],
    ) -> anyhow::Result<Self> {
        let tls = ferry_certs::client_config(identity, server, alpn)?;
        let client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        let mut endpoint = endpoint("127.0.0.1:0".parse()?, None)?;
        endpoint.set_default_client_config(client);
        let connection = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(addr, "ferry")?)
            .await
            .map_err(|_| anyhow!("the daemon did not answer"))??;
        Ok(Self { connection, _endpoint: endpoint })
    }

    /// Opens the control stream.
    pub async fn open(&self) -> anyhow::Result<EvilStream> {
        let (send, recv) = self.connection.open_bi().await?;
        Ok(EvilStream { send, recv, buf: BytesMut::new() })
    }

    /// Opens a data stream (chunk batches go there).
    pub async fn open_data(&self) -> anyhow::Result<quinn::SendStream> {
        Ok(self.connection.open_uni().await?)
    }

    /// Waits until the daemon closes the connection; its reason, or an error after `limit`.
    pub async fn closed(&self, limit: Duration) -> anyhow::Result<String> {
        let reason = tokio::time::timeout(limit, self.connection.closed())
            .await
            .map_err(|_| anyhow!("the daemon did not close the connection within {limit:?}"))?;
        Ok(match reason {
            quinn::ConnectionError::ApplicationClosed(close) => String::from_utf8_lossy(&close.reason).into_owned(),
            other => other.to_string(),
        })
    }
}

/// A destination that accepts one trusted source and then misbehaves.
pub struct EvilDestination {
    endpoint: quinn::Endpoint,
}

impl EvilDestination {
    /// Listens on loopback as `identity`, trusting `source`.
    pub fn listen(identity: &Identity, source: NodeId) -> anyhow::Result<Self> {
        Self::listen_speaking(identity, source, ALPN)
    }

    /// Listens speaking only the protocol `alpn` (an older ferry's, say).
    pub fn listen_speaking(identity: &Identity, source: NodeId, alpn: &[u8]) -> anyhow::Result<Self> {
        let trusted = Arc::new(RwLock::new(std::collections::HashSet::from([source])));
        let tls = ferry_certs::server_config(identity, trusted, alpn)?;
        let server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
        Ok(Self { endpoint: endpoint("127.0.0.1:0".parse()?, Some(server))? })
    }

    /// Where it listens.
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Accepts the next connection and its control stream.
    pub async fn accept(&self, limit: Duration) -> anyhow::Result<(quinn::Connection, EvilStream)> {
        tokio::time::timeout(limit, async {
            let incoming = self.endpoint.accept().await.ok_or_else(|| anyhow!("the endpoint closed"))?;
            let connection = incoming.await?;
            let (send, recv) = connection.accept_bi().await?;
            Ok((connection, EvilStream { send, recv, buf: BytesMut::new() }))
        })
        .await
        .map_err(|_| anyhow!("no source connected within {limit:?}"))?
    }
}
