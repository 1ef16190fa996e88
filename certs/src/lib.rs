//! Node identities and pinned-peer TLS for ferry.
//!
//! A node's identity is an Ed25519 key pair and a self-signed certificate made with rcgen
//! ([`Identity`]). Its [`NodeId`] is a short printable hash of the certificate's public key: that is
//! what operators exchange and pin. The rustls configurations built here ([`client_config`],
//! [`server_config`]) accept TLS 1.3 only, require a client certificate, and let a handshake through
//! only when the peer's end-entity key hashes to a pinned node ID *and* its handshake signature verifies
//! with that key (a verifier that skipped the signature would admit anyone replaying a public
//! certificate). Chains are refused: a node is its key, not a CA's opinion.
//!
//! This crate knows nothing of ferry's messages; the ALPN string is handed in.
//!
//! ```no_run
//! use ferry_certs::{Identity, client_config};
//! let (me, _created) = Identity::load_or_create("/etc/ferry".as_ref())?;
//! let dest: ferry_certs::NodeId = "abcd...".parse()?;
//! let tls = client_config(&me, dest, b"ferry/2")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The file names of an identity inside a config folder.
pub const KEY_FILE: &str = "identity.key";
/// See [`KEY_FILE`].
pub const CERT_FILE: &str = "identity.crt";

/// A node's name on the network: the first 20 bytes of the BLAKE3 hash of its certificate's
/// SubjectPublicKeyInfo, printed in lowercase base32 (32 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 20]);

/// A string that is not a node ID.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a node ID (32 characters of base32, as `ferry init` prints)")]
pub struct ParseNodeIdError(String);

impl NodeId {
    /// The node ID of a public key (DER SubjectPublicKeyInfo).
    pub fn from_spki(spki: &[u8]) -> Self {
        let hash = blake3::hash(spki);
        let mut id = [0u8; 20];
        id.copy_from_slice(&hash.as_bytes()[..20]);
        Self(id)
    }

    /// The node ID in a certificate.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
        Ok(Self::from_spki(parsed.subject_public_key_info().as_ref()))
    }

    /// The first 8 characters, for logs.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_owned()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = data_encoding::BASE32_NOPAD
            .decode(s.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| ParseNodeIdError(s.to_owned()))?;
        let id: [u8; 20] = bytes.try_into().map_err(|_| ParseNodeIdError(s.to_owned()))?;
        Ok(Self(id))
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() { serializer.collect_str(self) } else { self.0.serialize(serializer) }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 20]>::deserialize(deserializer).map(Self)
        }
    }
}

/// An identity could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The key or certificate files are not what `ferry init` writes.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Key generation failed.
    #[error("cannot generate a key pair: {0}")]
    Generate(#[from] rcgen::Error),
}

/// This node's key pair and self-signed certificate.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    id: NodeId,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self { cert: self.cert.clone(), key: self.key.clone_key(), id: self.id }
    }
}

impl Identity {
    /// A new Ed25519 identity.
    pub fn generate() -> Result<Self, IdentityError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let params = rcgen::CertificateParams::new(vec!["ferry".to_owned()])?;
        let cert = params.self_signed(&key_pair)?;
        let cert = cert.der().clone();
        let id = NodeId::of_certificate(&cert)
            .map_err(|e| IdentityError::Invalid { path: "generated certificate".into(), reason: e.to_string() })?;
        Ok(Self { cert, key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()), id })
    }

    /// This node's ID.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// The certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Reads the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let (key_path, cert_path) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
        let shown = |p: &Path| p.display().to_string();
        let key = PrivatePkcs8KeyDer::from_pem_file(&key_path)
            .map_err(|e| IdentityError::Invalid { path: shown(&key_path), reason: e.to_string() })?;
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| IdentityError::Invalid { path: shown(&cert_path), reason: e.to_string() })?;
        let id = NodeId::of_certificate(&cert)
            .map_err(|e| IdentityError::Invalid { path: shown(&cert_path), reason: e.to_string() })?;
        Ok(Self { cert, key, id })
    }

    /// A secret derived from the private key for `context` (e.g. the QUIC stateless-reset key): the
    /// same after every restart, useless to anyone without the key.
    pub fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.key.secret_pkcs8_der())
    }

    /// Reads the identity in `dir`, or creates one if there is none. Never overwrites: returns
    /// whether it was created.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), IdentityError> {
        if dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists() {
            return Ok((Self::load(dir)?, false));
        }
        fs::create_dir_all(dir).map_err(|e| IdentityError::Io { path: dir.display().to_string(), source: e })?;
        let identity = Self::generate()?;
        let key_pem = pem("PRIVATE KEY", identity.key.secret_pkcs8_der());
        let cert_pem = pem("CERTIFICATE", identity.cert.as_ref());
        write_new(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
        write_new(&dir.join(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        Ok((identity, true))
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes a file that must not exist yet, durably.
fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |e| IdentityError::Io { path: path.display().to_string(), source: e };
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    file.write_all(content).map_err(err)?;
    file.sync_all().map_err(err)
}

/// The node IDs a verifier accepts. Shared, so that a daemon can trust a new peer without restarting.
pub type TrustedPeers = Arc<RwLock<HashSet<NodeId>>>;

/// Accepts exactly the pinned node IDs, with a verified TLS 1.3 handshake signature.
#[derive(Debug)]
struct PinnedPeerVerifier {
    trusted: TrustedPeers,
    provider: Arc<CryptoProvider>,
}

/// A peer whose key is not pinned.
#[derive(thiserror::Error)]
#[error("node {0} is not trusted here")]
pub struct UntrustedPeer(pub NodeId);

/// rustls shows the cause with `Debug`: make that the sentence, with the whole node ID in it.
impl fmt::Debug for UntrustedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PinnedPeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                io::Error::other("a certificate chain was presented; ferry nodes present one self-signed certificate"),
            )))));
        }
        let id = NodeId::of_certificate(end_entity)?;
        let trusted = self.trusted.read().map(|set| set.contains(&id)).unwrap_or(false);
        if !trusted {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                UntrustedPeer(id),
            )))));
        }
        Ok(())
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is refused: ferry speaks TLS 1.3 only".into())
}

impl ServerCertVerifier for PinnedPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for PinnedPeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// The one crypto provider ferry uses (ring), named explicitly so that nothing depends on which
/// providers happen to be compiled in.
///
/// Its TLS 1.3 suites are put in the order BoringSSL and Go use, AES-128-GCM first (ring's default
/// puts AES-256-GCM first): every byte of a round is sealed and opened with the suite chosen here,
/// and AES-128 takes 10 rounds a block where AES-256 takes 14. The price is a 128-bit key instead of a
/// 256-bit one: the strength of TLS 1.3's mandatory suite.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| match suite.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(provider)
}

/// A client configuration that presents `identity` and accepts only the server `peer`.
pub fn client_config(identity: &Identity, peer: NodeId, alpn: &[u8]) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = crypto_provider();
    let verifier =
        PinnedPeerVerifier { trusted: Arc::new(RwLock::new(HashSet::from([peer]))), provider: provider.clone() };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key_der())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A server configuration that presents `identity` and requires a client certificate from one of
/// `trusted` (which may change while the server runs).
pub fn server_config(
    identity: &Identity,
    trusted: TrustedPeers,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = crypto_provider();
    let verifier = PinnedPeerVerifier { trusted, provider: provider.clone() };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![identity.cert.clone()], identity.key_der())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The node ID of the peer at the other end of a finished handshake.
pub fn peer_node_id(certificates: &[CertificateDer<'_>]) -> Option<NodeId> {
    certificates.first().and_then(|cert| NodeId::of_certificate(cert).ok())
}

#[cfg(test)]
mod tests;
