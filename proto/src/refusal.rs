//! Why a destination will not take a round, or why it closed one: one enum, a stable code on the wire
//! and in QUIC's application close, and its words for people. Nothing is recognised by its text.

use serde::{Deserialize, Serialize};

/// Why a round is refused or its connection closed.
///
/// Sent in `Message::Refused` (postcard encodes the variant by index, so
/// variants are only ever appended) and as the error code of a connection's close ([`Refusal::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Refusal {
    /// This node's key is not pinned on the other side (or no longer is).
    Untrusted,
    /// The other side has no such job, or it belongs to another peer there.
    NotYourJob,
    /// Another peer's round of the job is running.
    Busy,
    /// The job's import is running on the destination.
    ImportRunning,
    /// The round would not fit on the destination's disk.
    NoSpace,
    /// A newer connection of the same peer took the job over.
    Replaced,
    /// The daemon is shutting down.
    ShuttingDown,
    /// The peer sent something the protocol does not allow.
    ProtocolViolation,
}

/// The first close code of a [`Refusal`]; codes below it are a round's own ends (done, failed).
const FIRST_CODE: u32 = 0x10;

impl Refusal {
    /// Every refusal, in wire order.
    pub const ALL: [Refusal; 8] = [
        Refusal::Untrusted,
        Refusal::NotYourJob,
        Refusal::Busy,
        Refusal::ImportRunning,
        Refusal::NoSpace,
        Refusal::Replaced,
        Refusal::ShuttingDown,
        Refusal::ProtocolViolation,
    ];

    /// The QUIC application error code a connection closed for this reason carries.
    pub fn code(self) -> u32 {
        FIRST_CODE + self as u32
    }

    /// The refusal a close code stands for, if it stands for one.
    pub fn from_code(code: u64) -> Option<Self> {
        let index = code.checked_sub(u64::from(FIRST_CODE))?;
        Self::ALL.get(usize::try_from(index).ok()?).copied()
    }

    /// A few words for people, said before the details.
    pub fn words(self) -> &'static str {
        match self {
            Refusal::Untrusted => "this node is not trusted there",
            Refusal::NotYourJob => "the job is not this node's there",
            Refusal::Busy => "another round of the job is running",
            Refusal::ImportRunning => "the job's import is running",
            Refusal::NoSpace => "not enough free space",
            Refusal::Replaced => "replaced by a newer connection of the same node",
            Refusal::ShuttingDown => "the daemon is shutting down",
            Refusal::ProtocolViolation => "protocol violation",
        }
    }

    /// Whether the same round may be taken later as it is: `sync --wait` asks again.
    pub fn is_busy(self) -> bool {
        matches!(self, Refusal::Busy | Refusal::ImportRunning)
    }

    /// Whether a new connection may take the round on (the source reconnects within its grace).
    pub fn may_reconnect(self) -> bool {
        matches!(self, Refusal::Replaced | Refusal::ShuttingDown)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.words())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_own_code_and_comes_back_from_it() {
        let mut codes: Vec<u32> = Refusal::ALL.iter().map(|r| r.code()).collect();
        for refusal in Refusal::ALL {
            assert_eq!(Refusal::from_code(refusal.code().into()), Some(refusal));
        }
        codes.dedup();
        assert_eq!(codes.len(), Refusal::ALL.len());
        assert_eq!(Refusal::from_code(0), None, "a round's own end is not a refusal");
        assert_eq!(Refusal::from_code(u64::from(FIRST_CODE) + 8), None);
        assert_eq!(Refusal::from_code(u64::MAX), None);
    }

    #[test]
    fn the_codes_are_stable() {
        // Peers of one protocol version read each other's codes: these may never move.
        let codes: Vec<u32> = Refusal::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
    }

    #[test]
    fn only_a_busy_job_is_waited_for_and_only_a_lost_connection_is_taken_up_again() {
        let busy: Vec<_> = Refusal::ALL.into_iter().filter(|r| r.is_busy()).collect();
        assert_eq!(busy, [Refusal::Busy, Refusal::ImportRunning]);
        let again: Vec<_> = Refusal::ALL.into_iter().filter(|r| r.may_reconnect()).collect();
        assert_eq!(again, [Refusal::Replaced, Refusal::ShuttingDown]);
    }
}
