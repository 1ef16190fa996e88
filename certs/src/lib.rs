//! Node identities and pinned-peer TLS for ferry. Not written yet: see the QUIC round issue.
