//! The wire protocol of ferry (messages, framing, the round state machine). Not written yet: see the
//! QUIC round issue.
