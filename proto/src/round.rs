//! The order of messages on the control stream, as the destination sees it.

use crate::message::Message;

/// Where a round is, on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `Hello`.
    Greeting,
    /// Receiving `Changes` until `ChangesEnd`.
    Changes,
    /// Sending `Need`, receiving `Missing`; chunk data comes on data streams.
    Transfer,
    /// Committed or failed: nothing more may come.
    Closed,
}

/// A message that does not belong where it came.
#[derive(Debug, thiserror::Error)]
#[error("protocol violation: {message} is not allowed while {phase:?}")]
pub struct ProtocolError {
    /// The message's name.
    pub message: &'static str,
    /// Where the round was.
    pub phase: Phase,
}

/// Checks the order of what the source sends on the control stream.
#[derive(Debug)]
pub struct DestinationRound {
    phase: Phase,
}

impl Default for DestinationRound {
    fn default() -> Self {
        Self { phase: Phase::Greeting }
    }
}

fn name(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "Hello",
        Message::Welcome { .. } => "Welcome",
        Message::Refused { .. } => "Refused",
        Message::Changes(_) => "Changes",
        Message::ChangesEnd(_) => "ChangesEnd",
        Message::Need(_) => "Need",
        Message::ChunkBatch(_) => "ChunkBatch",
        Message::Missing(_) => "Missing",
        Message::Done => "Done",
        Message::Committed(_) => "Committed",
        Message::Failed { .. } => "Failed",
        Message::RoundOptions(_) => "RoundOptions",
        Message::Notice { .. } => "Notice",
        Message::ImportStarted { .. } => "ImportStarted",
        Message::ImportDone(_) => "ImportDone",
        Message::Stop { .. } => "Stop",
        Message::DryRun => "DryRun",
        Message::Planned(_) => "Planned",
        Message::Check { .. } => "Check",
        Message::Paused => "Paused",
    }
}

impl DestinationRound {
    /// Where the round is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Accepts the next message from the source, or says why it is out of place.
    pub fn handle(&mut self, message: &Message) -> Result<(), ProtocolError> {
        let next = match (self.phase, message) {
            (Phase::Greeting, Message::Hello(_)) => Phase::Changes,
            // A readiness check is all its connection carries.
            (Phase::Greeting, Message::Check { .. }) => Phase::Closed,
            (Phase::Changes, Message::RoundOptions(_) | Message::DryRun) => Phase::Changes,
            (Phase::Changes, Message::Changes(_)) => Phase::Changes,
            (Phase::Changes, Message::ChangesEnd(_)) => Phase::Transfer,
            (Phase::Transfer, Message::Missing(_)) => Phase::Transfer,
            // A paused source says so between the messages of its list and during the transfer; a
            // notice late for the commit is harmless.
            (Phase::Changes | Phase::Transfer | Phase::Closed, Message::Paused) => self.phase,
            (_, Message::Failed { .. }) | (Phase::Transfer, Message::Stop { .. }) => Phase::Closed,
            (phase, other) => return Err(ProtocolError { message: name(other), phase }),
        };
        self.phase = next;
        Ok(())
    }

    /// The destination answered with `Committed`, `Failed` or `Refused`.
    pub fn close(&mut self) {
        self.phase = Phase::Closed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use ferry_engine::RootHash;

    #[test]
    fn accepts_the_round_in_order_and_nothing_else() {
        let hello =
            Message::Hello(Hello { version: 1, job: "j".into(), base: None, delete: false, numeric_ids: false });
        let end = Message::ChangesEnd(ChangesEnd { base: None, root: RootHash::from_bytes([0; 32]), entries: 1 });
        let mut round = DestinationRound::default();
        assert!(round.handle(&Message::Changes(vec![])).is_err());
        round.handle(&hello).unwrap();
        assert!(round.handle(&hello).is_err());
        round.handle(&Message::Paused).unwrap();
        round.handle(&Message::Changes(vec![])).unwrap();
        round.handle(&end).unwrap();
        assert_eq!(round.phase(), Phase::Transfer);
        assert!(round.handle(&Message::Changes(vec![])).is_err());
        round.handle(&Message::Missing(vec![])).unwrap();
        round.handle(&Message::Paused).unwrap();
        assert_eq!(round.phase(), Phase::Transfer);
        round.handle(&Message::Stop { reason: "deadline".into(), batches: 3 }).unwrap();
        assert!(round.handle(&Message::Missing(vec![])).is_err());
        assert!(DestinationRound::default().handle(&Message::Paused).is_err(), "no round to pause yet");
        let mut round = DestinationRound::default();
        round.handle(&hello).unwrap();
        round.handle(&Message::DryRun).unwrap();
        assert!(round.handle(&Message::Stop { reason: "early".into(), batches: 0 }).is_err());
        round.close();
        assert!(round.handle(&Message::Missing(vec![])).is_err());
        let check = Message::Check { job: "j".into() };
        let mut round = DestinationRound::default();
        round.handle(&check).unwrap();
        assert_eq!(round.phase(), Phase::Closed);
        assert!(round.handle(&hello).is_err(), "a check's connection carries no round");
        let mut round = DestinationRound::default();
        round.handle(&hello).unwrap();
        assert!(round.handle(&check).is_err(), "a round's connection carries no check");
    }
}
