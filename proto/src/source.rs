//! The source's side of one connection of a round, as a state machine without I/O.
//!
//! In the manner of quinn-proto's `Connection`: the driver feeds what happened ([`SourceRound::handle`],
//! [`SourceRound::handle_timeout`], with the time), and acts on what comes out: messages for the control
//! stream ([`SourceRound::poll_transmit`]), things to do ([`SourceRound::poll`]: read chunks, stop the
//! senders, the end), and when to wake it next ([`SourceRound::poll_timeout`]). It reads no clock, no
//! socket and no file: the list of changes, the chunks and the bandwidth limit are the driver's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::message::{
    Change, ChangesEnd, Checked, ChunkAt, Committed, Hello, ImportResult, Message, Plan, RoundOptions, RoundRef,
    Transmit,
};
use crate::refusal::Refusal;
use ferry_engine::FilePrefix;

/// How often a paused source tells the destination so (see `Message::Paused`).
pub const PAUSE_NOTICE: Duration = Duration::from_secs(1);

/// How long a source that stopped at its deadline waits for the destination to apply what arrived and
/// close the connection.
pub const STOP_WAIT: Duration = Duration::from_secs(120);

/// What one connection of a round is for.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Opens the round.
    pub hello: Hello,
    /// What the destination does once the round is committed.
    pub options: RoundOptions,
    /// Plan only: the destination writes nothing, and the chunks it asks for are sized, not sent.
    pub dry_run: bool,
    /// After the commit, wait for the destination's import to end.
    pub wait_for_import: bool,
    /// When the round stops (`--max-duration`), and the words that say so.
    pub deadline: Option<(Instant, String)>,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// `Hello` sent, waiting for `Welcome`.
    Opening,
    /// Sending the list of changes as the scan makes it; chunks already go out as the destination
    /// asks.
    Listing,
    /// The list is sent: chunks go out as the destination asks, until it commits.
    Serving,
    /// The deadline passed: the senders stop, then `Stop` says how many batches went out.
    Stopping,
    /// Committed: waiting for the destination's import.
    Importing,
    /// Nothing more happens on this connection.
    Ended,
}

/// What the driver feeds the machine.
#[derive(Debug)]
pub enum SourceInput {
    /// A message from the destination on the control stream.
    Message(Message),
    /// The next batch of the list of changes, to send.
    Changes(Vec<Change>),
    /// The list is complete.
    ChangesEnd(ChangesEnd),
    /// The next chunks of a large file the scan is cutting, between the changes (see
    /// `Message::Prefix`).
    Prefix(FilePrefix),
    /// Needs (by number: see [`crate::ChunkBatch`]) whose chunks could not be read as the scan saw
    /// them (their files changed).
    Unreadable(Vec<u64>),
    /// Reading the source failed for good.
    ReadFailed(String),
    /// The destination asked for a chunk the round does not have, or went back in the manifest (the
    /// driver looks needs up in its manifest, forward): a protocol violation.
    BadNeed(String),
    /// Whether the bandwidth limit pauses the round now. Fed at least every [`PAUSE_NOTICE`] while
    /// it does.
    Paused(bool),
    /// The list waits for the scan. Fed at least every [`PAUSE_NOTICE`] while it does.
    Scanning,
    /// After [`SourceEvent::StopSending`]: the senders stopped, having sent `batches` in all.
    SendingStopped {
        /// Chunk batches sent on this connection.
        batches: u64,
    },
    /// The control stream or the connection ended: with the close's refusal code, if it had one.
    Closed {
        /// Why the destination closed, if it said so with a code.
        refusal: Option<Refusal>,
        /// Why, as the driver can tell.
        reason: String,
    },
}

/// What the driver must do.
#[derive(Debug, PartialEq)]
pub enum SourceEvent {
    /// The destination took the round: send the changes since `holds` (or everything).
    Welcomed {
        /// What the destination holds.
        holds: Option<RoundRef>,
    },
    /// Read these chunks and send them on the data streams (a dry run sizes them instead); their
    /// hashes are in the round's manifest.
    Read(Vec<ChunkAt>),
    /// The destination planned every entry before this place of the new manifest: the list may go
    /// that much further.
    Passed(u64),
    /// The destination planned the prefix at this place that came last (see `Message::Prefix`).
    PrefixPlanned(u64),
    /// The destination says something the operator should know.
    Notice(String),
    /// What the destination's check of its target found.
    Checked(Checked),
    /// The destination began its import.
    ImportStarted {
        /// The round imported.
        round: u64,
        /// The command.
        command: Vec<String>,
    },
    /// The deadline passed during the transfer: stop the senders, then feed
    /// [`SourceInput::SendingStopped`].
    StopSending,
    /// The connection's part is over.
    Ended(SourceEnd),
}

/// How a connection of a round ended.
#[derive(Debug, PartialEq)]
pub enum SourceEnd {
    /// The round is committed; `import` is the import's result when it was waited for and came.
    Committed {
        /// What the destination committed.
        committed: Committed,
        /// How the import ended.
        import: Option<ImportResult>,
    },
    /// A dry run's plan.
    Planned(Plan),
    /// The deadline passed: `batches` chunk batches went out, and the destination keeps what arrived.
    Deadline {
        /// Chunk batches sent before the stop (0 when it came before the transfer).
        batches: u64,
    },
    /// The destination refused the round.
    Refused {
        /// Why, as a code.
        refusal: Refusal,
        /// The details.
        reason: String,
    },
    /// The destination failed the round.
    PeerFailed(String),
    /// This node failed it (reading the source); the destination was told.
    Failed(String),
    /// The destination sent what the protocol does not allow here.
    Violation(String),
    /// The connection ended before the round did.
    Closed {
        /// The close's refusal code, if any (a replaced connection, a daemon shutting down).
        refusal: Option<Refusal>,
        /// Why.
        reason: String,
    },
}

impl SourceEnd {
    /// Whether another connection may carry the round on: the connection was lost, or closed for a
    /// reason that passes ([`Refusal::may_reconnect`]).
    pub fn may_reconnect(&self) -> bool {
        match self {
            SourceEnd::Closed { refusal, .. } => refusal.is_none_or(Refusal::may_reconnect),
            SourceEnd::Refused { refusal, .. } => refusal.may_reconnect(),
            _ => false,
        }
    }
}

/// The source's side of one connection of a round.
#[derive(Debug)]
pub struct SourceRound {
    config: SourceConfig,
    phase: SourcePhase,
    transmit: VecDeque<Transmit>,
    events: VecDeque<SourceEvent>,
    /// When the last `Paused` went out, while paused.
    paused_since: Option<Instant>,
    /// Waiting for the destination to close after `Stop`, until then.
    stop_wait: Option<Instant>,
    stopped_batches: u64,
    committed: Option<Committed>,
}

impl SourceRound {
    /// Opens a connection's round: `Hello`, its options, and `DryRun` when planning only.
    pub fn new(config: SourceConfig) -> Self {
        let mut transmit = VecDeque::from([
            Transmit::Message(Message::Hello(config.hello.clone())),
            Transmit::Message(Message::RoundOptions(config.options.clone())),
        ]);
        if config.dry_run {
            transmit.push_back(Transmit::Message(Message::DryRun));
        }
        Self {
            config,
            phase: SourcePhase::Opening,
            transmit,
            events: VecDeque::new(),
            paused_since: None,
            stop_wait: None,
            stopped_batches: 0,
            committed: None,
        }
    }

    /// Where the connection is.
    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// The next item for the control stream.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmit.pop_front()
    }

    /// The next thing for the driver to do.
    pub fn poll(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// When to call [`Self::handle_timeout`] next, if at all.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            SourcePhase::Opening | SourcePhase::Listing | SourcePhase::Serving => {
                self.config.deadline.as_ref().map(|(at, _)| *at)
            }
            SourcePhase::Stopping => self.stop_wait,
            SourcePhase::Importing | SourcePhase::Ended => None,
        }
    }

    /// Feeds what happened at `now`.
    pub fn handle(&mut self, input: SourceInput, now: Instant) {
        if self.phase == SourcePhase::Ended {
            return;
        }
        match input {
            SourceInput::Message(message) => self.message(message),
            SourceInput::Changes(batch) if self.phase == SourcePhase::Listing => self.send(Message::Changes(batch)),
            SourceInput::Prefix(prefix) if self.phase == SourcePhase::Listing && !self.config.dry_run => {
                self.send(Message::Prefix(prefix));
            }
            SourceInput::ChangesEnd(end) if self.phase == SourcePhase::Listing => {
                self.send(Message::ChangesEnd(end));
                self.phase = SourcePhase::Serving;
            }
            // The driver's own list came after the round moved on (stopped, ended): nothing to send.
            SourceInput::Changes(_) | SourceInput::ChangesEnd(_) | SourceInput::Prefix(_) => {}
            SourceInput::Unreadable(needs) => {
                if matches!(self.phase, SourcePhase::Listing | SourcePhase::Serving) && !needs.is_empty() {
                    self.send(Message::Missing(needs));
                }
            }
            SourceInput::ReadFailed(why) => {
                self.send(Message::Failed { reason: why.clone() });
                self.end(SourceEnd::Failed(why));
            }
            SourceInput::BadNeed(what) => self.end(SourceEnd::Violation(what)),
            SourceInput::Paused(paused) => self.paused(paused, now),
            SourceInput::Scanning => {
                if self.phase == SourcePhase::Listing {
                    self.send(Message::Scanning);
                }
            }
            SourceInput::SendingStopped { batches } => {
                if self.phase == SourcePhase::Stopping && self.stop_wait.is_none() {
                    let reason = self.deadline_words();
                    self.send(Message::Stop { reason, batches });
                    self.transmit.push_back(Transmit::Finish);
                    self.stopped_batches = batches;
                    self.stop_wait = Some(now + STOP_WAIT);
                }
            }
            SourceInput::Closed { refusal, reason } => match self.phase {
                SourcePhase::Stopping => self.end(SourceEnd::Deadline { batches: self.stopped_batches }),
                // Committed is committed: a connection lost while the import runs ends the wait.
                SourcePhase::Importing => self.committed_end(None),
                _ => self.end(SourceEnd::Closed { refusal, reason }),
            },
        }
    }

    /// Stops the round now, as its deadline would (the operator's signal); `words` say why.
    pub fn stop(&mut self, words: String, now: Instant) {
        if matches!(self.phase, SourcePhase::Opening | SourcePhase::Listing | SourcePhase::Serving) {
            self.config.deadline = Some((now, words));
            self.handle_timeout(now);
        }
    }

    /// Time passed: the deadline, or the end of the wait after `Stop`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_none_or(|at| now < at) {
            return;
        }
        match self.phase {
            SourcePhase::Opening => {
                // Before the transfer nothing was sent that the destination could keep.
                let reason = format!("{}, before the transfer began", self.deadline_words());
                self.send(Message::Failed { reason });
                self.transmit.push_back(Transmit::Finish);
                self.end(SourceEnd::Deadline { batches: 0 });
            }
            SourcePhase::Listing if self.config.dry_run => {
                let reason = format!("{}, before the plan was made", self.deadline_words());
                self.send(Message::Failed { reason });
                self.transmit.push_back(Transmit::Finish);
                self.end(SourceEnd::Deadline { batches: 0 });
            }
            SourcePhase::Serving if self.config.dry_run => {
                self.end(SourceEnd::Deadline { batches: 0 });
            }
            // Chunks go out while the list is still made: the destination keeps what arrived.
            SourcePhase::Listing | SourcePhase::Serving => {
                self.phase = SourcePhase::Stopping;
                self.events.push_back(SourceEvent::StopSending);
            }
            SourcePhase::Stopping => self.end(SourceEnd::Deadline { batches: self.stopped_batches }),
            SourcePhase::Importing | SourcePhase::Ended => {}
        }
    }

    fn message(&mut self, message: Message) {
        use SourcePhase::*;
        match (self.phase, message) {
            (_, Message::Notice { text }) => self.events.push_back(SourceEvent::Notice(text)),
            (_, Message::Checked(checked)) => self.events.push_back(SourceEvent::Checked(checked)),
            (Opening, Message::Welcome { holds }) => {
                self.phase = Listing;
                self.events.push_back(SourceEvent::Welcomed { holds });
            }
            (Opening | Listing | Serving, Message::Refused { refusal, reason }) => {
                self.end(SourceEnd::Refused { refusal, reason });
            }
            (Opening | Listing | Serving, Message::Failed { reason }) => self.end(SourceEnd::PeerFailed(reason)),
            (Listing | Serving, Message::Need(chunks)) => self.events.push_back(SourceEvent::Read(chunks)),
            (Listing | Serving, Message::Passed(place)) => self.events.push_back(SourceEvent::Passed(place)),
            (Listing | Serving, Message::PrefixPlanned(place)) => {
                self.events.push_back(SourceEvent::PrefixPlanned(place));
            }
            (Serving, Message::Done) => {}
            (Serving, Message::Committed(committed)) if !self.config.dry_run => {
                self.transmit.push_back(Transmit::Finish);
                if self.config.wait_for_import {
                    self.phase = Importing;
                    self.committed = Some(committed);
                } else {
                    self.end(SourceEnd::Committed { committed, import: None });
                }
            }
            (Serving, Message::Planned(plan)) if self.config.dry_run => self.end(SourceEnd::Planned(plan)),
            // After `Stop` the destination applies what came; what it still says changes nothing.
            (Stopping, _) => {}
            (Importing, Message::ImportStarted { round, command }) => {
                self.events.push_back(SourceEvent::ImportStarted { round, command });
            }
            (Importing, Message::ImportDone(result)) => self.committed_end(Some(result)),
            (phase, other) => {
                let text = format!("{} is not allowed while {phase:?}", other.name());
                self.end(SourceEnd::Violation(text));
            }
        }
    }

    fn paused(&mut self, paused: bool, now: Instant) {
        let active = matches!(self.phase, SourcePhase::Listing | SourcePhase::Serving) && !self.config.dry_run;
        if !paused || !active {
            self.paused_since = None;
            return;
        }
        if self.paused_since.is_none_or(|last| now.saturating_duration_since(last) >= PAUSE_NOTICE) {
            self.paused_since = Some(now);
            self.send(Message::Paused);
        }
    }

    fn committed_end(&mut self, import: Option<ImportResult>) {
        if let Some(committed) = self.committed.take() {
            self.end(SourceEnd::Committed { committed, import });
        }
    }

    fn deadline_words(&self) -> String {
        self.config.deadline.as_ref().map_or_else(|| "the deadline".to_owned(), |(_, words)| words.clone())
    }

    fn send(&mut self, message: Message) {
        self.transmit.push_back(Transmit::Message(message));
    }

    fn end(&mut self, end: SourceEnd) {
        self.phase = SourcePhase::Ended;
        self.events.push_back(SourceEvent::Ended(end));
    }
}
