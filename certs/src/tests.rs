//! Handshakes in memory between rustls endpoints: who gets through and who does not.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConnection, ServerConnection};

use super::*;

const ALPN: &[u8] = b"ferry-test/1";

fn trusted(ids: &[NodeId]) -> TrustedPeers {
    Arc::new(RwLock::new(ids.iter().copied().collect()))
}

/// Runs a handshake to its end; returns the first error of either side.
/// Returns the cipher suite the two sides agreed on.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<rustls::SupportedCipherSuite, String> {
    let mut client = ClientConnection::new(Arc::new(client), ServerName::try_from("ferry").unwrap()).unwrap();
    let mut server = ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..20 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut &buf[..]).unwrap();
        server.process_new_packets().map_err(|e| format!("server: {e}"))?;
        let mut buf = Vec::new();
        server.write_tls(&mut buf).unwrap();
        client.read_tls(&mut &buf[..]).unwrap();
        client.process_new_packets().map_err(|e| format!("client: {e}"))?;
        if !client.is_handshaking() && !server.is_handshaking() {
            // The server only learns about a bad client certificate once it has processed the
            // client's last flight.
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets().map_err(|e| format!("server: {e}"))?;
            return client.negotiated_cipher_suite().ok_or_else(|| "no cipher suite".into());
        }
    }
    Err("handshake did not finish".into())
}

#[test]
fn node_id_round_trips_and_is_stable() {
    let identity = Identity::generate().unwrap();
    let id = identity.node_id();
    let text = id.to_string();
    assert_eq!(text.len(), 32);
    assert_eq!(text.parse::<NodeId>().unwrap(), id);
    assert_eq!(text.to_uppercase().parse::<NodeId>().unwrap(), id);
    assert!("not-an-id".parse::<NodeId>().is_err());
    assert_eq!(NodeId::of_certificate(identity.certificate()).unwrap(), id);
}

#[test]
fn identity_is_created_once_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (first, created) = Identity::load_or_create(dir.path()).unwrap();
    assert!(created);
    let (again, created) = Identity::load_or_create(dir.path()).unwrap();
    assert!(!created);
    assert_eq!(first.node_id(), again.node_id());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn pinned_peers_get_through() {
    let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let client = client_config(&a, b.node_id(), ALPN).unwrap();
    let server = server_config(&b, trusted(&[a.node_id()]), ALPN).unwrap();
    let suite = handshake(client, server).unwrap();
    assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, "the bulk cipher is AES-128-GCM");
}

#[test]
fn an_unknown_server_is_refused() {
    let (a, b, c) = (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
    let client = client_config(&a, c.node_id(), ALPN).unwrap();
    let server = server_config(&b, trusted(&[a.node_id()]), ALPN).unwrap();
    let err = handshake(client, server).unwrap_err();
    assert!(err.starts_with("client:") && err.contains(&b.node_id().to_string()), "{err}");
}

#[test]
fn an_unknown_client_is_refused() {
    let (a, b, c) = (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
    let client = client_config(&a, b.node_id(), ALPN).unwrap();
    let server = server_config(&b, trusted(&[c.node_id()]), ALPN).unwrap();
    let err = handshake(client, server).unwrap_err();
    assert!(err.starts_with("server:") && err.contains("not trusted"), "{err}");
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let verifier = PinnedPeerVerifier { trusted: trusted(&[b.node_id()]), provider: crypto_provider() };
    let mut client = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    let server = server_config(&b, trusted(&[a.node_id()]), ALPN).unwrap();
    let err = handshake(client, server).unwrap_err();
    assert!(err.contains("server:"), "{err}");
}

/// Presents one certificate and signs with another key, as someone replaying a pinned node's public
/// certificate would.
#[derive(Debug)]
struct Impostor(Arc<CertifiedKey>);

impl ResolvesServerCert for Impostor {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[test]
fn a_replayed_certificate_without_its_key_is_refused() {
    let (a, b, mallory) = (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
    let provider = crypto_provider();
    let signing_key = provider.key_provider.load_private_key(mallory.key_der()).unwrap();
    let stolen = CertifiedKey::new(vec![b.certificate().clone()], signing_key);
    let verifier = PinnedPeerVerifier { trusted: trusted(&[a.node_id()]), provider: provider.clone() };
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(Impostor(Arc::new(stolen))));
    let client = client_config(&a, b.node_id(), ALPN).unwrap();
    let err = handshake(client, server).unwrap_err();
    assert!(err.starts_with("client:"), "{err}");
}

#[test]
fn a_client_speaking_another_protocol_is_refused() {
    let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    // A pinned, trusted client that offers another ALPN (an older or newer ferry, or another tool).
    let client = client_config(&a, b.node_id(), b"ferry/0").unwrap();
    let server = server_config(&b, trusted(&[a.node_id()]), ALPN).unwrap();
    let err = handshake(client, server).unwrap_err();
    assert!(err.starts_with("server:") && err.contains("known protocol"), "{err}");
}
