//! A refused round: why, as a [`Refusal`] both nodes know, and the details for the operator.
//!
//! Both sides use it: the destination refuses with it (its `Refusal` goes in `Message::Refused` and in
//! the connection's close code), and the source turns what it receives back into it. The exit code
//! comes from it (`exit::REFUSED`), and `--wait` and reconnection decide by its `Refusal`, never by
//! its words.

use ferry_proto::Refusal;

/// A round refused, by the destination or before it was opened.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct Refused {
    /// Why, as a code.
    pub refusal: Refusal,
    /// What to tell the operator.
    pub text: String,
}

impl Refused {
    /// A refusal with its details.
    pub fn new(refusal: Refusal, text: impl Into<String>) -> Self {
        Self { refusal, text: text.into() }
    }
}
