//! The two round machines back to back, without sockets: a simulated link with latency and a
//! bandwidth, simulated time, and drivers that do what the node's do (the source reads chunks and
//! sends batches; the destination asks for what it lacks and commits when all is in). In the manner
//! of quinn-proto's `tests/util.rs` `Pair`.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use ferry_engine::{ChunkHash, ChunkRef, Entry, EntryKind, RelPath, RootHash};
use ferry_proto::window::Arrival;
use ferry_proto::{
    Change, ChangesEnd, Checked, ChunkAt, Committed, DestinationEnd, DestinationEvent, DestinationInput,
    DestinationRound, Hello, ImportMode, Message, NeedChunk, Refusal, RoundOptions, RoundRef, SourceConfig, SourceEnd,
    SourceEvent, SourceInput, SourcePhase, SourceRound, Transmit,
};

pub(crate) const STALL: Duration = Duration::from_secs(3);
pub(crate) const CHUNK: u64 = 64 << 10;
/// Changes per batch of the list.
pub(crate) const LIST_BATCH: usize = 7;

/// What travels between the two sides.
#[derive(Debug)]
pub(crate) enum Packet {
    Control(Transmit),
    /// A chunk batch on a data stream: for each chunk, the number of the need it answers, what its
    /// bytes hash to, and its length.
    Batch(Vec<(u64, ChunkHash, u64)>),
    /// The connection closes, with a refusal code or not.
    Close(Option<Refusal>, String),
}

/// How the simulated source misbehaves, or is limited.
#[derive(Default, Clone)]
pub(crate) struct Behaviour {
    /// Sends nothing after `Welcome` (a hung source).
    pub(crate) silent_list: bool,
    /// Reads no chunk it is asked for (a hung reader).
    pub(crate) ignores_needs: bool,
    /// Sends this many bytes of chunks nobody asked for, after the list.
    pub(crate) flood: u64,
    /// Its bandwidth limit pauses it over this span (from the start of the run).
    pub(crate) paused: Option<(Duration, Duration)>,
    /// Its driver never tells the machine of the pause (so no `Paused` goes out).
    pub(crate) mute_pauses: bool,
    /// `--max-duration`, from the start.
    pub(crate) deadline: Option<Duration>,
    /// Chunks it cannot read (their files changed).
    pub(crate) unreadable: HashSet<ChunkHash>,
    /// The list streams: the source lists one batch ahead of what the destination says it passed,
    /// and the destination plans each batch as it comes.
    pub(crate) streamed: bool,
    /// The destination's driver never says what it passed.
    pub(crate) mute_passed: bool,
    /// The source's driver never says that its list waits.
    pub(crate) mute_scanning: bool,
}

/// A tree: `files` files of `chunks` chunks each, all distinct.
pub(crate) fn tree(files: u32, chunks: u32) -> Vec<Change> {
    (0..files)
        .map(|f| {
            let path = RelPath::new(format!("f{f:04}").into_bytes()).unwrap();
            let chunks: Vec<ChunkRef> = (0..chunks)
                .map(|c| ChunkRef { hash: ChunkHash::of(format!("{f}/{c}").as_bytes()), len: CHUNK as u32 })
                .collect();
            let entry = Entry {
                size: CHUNK * u64::from(chunks.len() as u32),
                mtime_ns: 1,
                chunks,
                ..Entry::new(path.clone(), EntryKind::File)
            };
            Change { path, entry: Some(entry), content_as_before: false, base: None }
        })
        .collect()
}

/// The two sides of one connection, with what their drivers hold.
pub(crate) struct Pair {
    pub(crate) now: Instant,
    pub(crate) start: Instant,
    pub(crate) latency: Duration,
    /// Bytes per second of the source's link.
    pub(crate) bandwidth: u64,
    pub(crate) link_free: Instant,
    pub(crate) to_destination: VecDeque<(Instant, Packet)>,
    pub(crate) to_source: VecDeque<(Instant, Packet)>,
    pub(crate) source: SourceRound,
    pub(crate) destination: DestinationRound,
    pub(crate) behaviour: Behaviour,
    pub(crate) changes: Vec<Change>,
    /// Batches read and not sent yet: one leaves when the link is free and the limit lets it. Each
    /// chunk: the number of the need it answers, its hash (what its bytes hash to), its length.
    pub(crate) outgoing: VecDeque<Vec<(u64, ChunkHash, u64)>>,
    /// Needs the source has read, in order: the next one's number.
    pub(crate) needs_read: u64,
    pub(crate) sending_stopped: bool,
    pub(crate) batches_sent: u64,
    pub(crate) flooded: bool,
    pub(crate) source_end: Option<SourceEnd>,
    pub(crate) destination_end: Option<DestinationEnd>,
    /// The destination's store: kept across connections, as the node keeps what arrived.
    pub(crate) held: HashSet<ChunkHash>,
    pub(crate) needed: Vec<ChunkHash>,
    pub(crate) need_bytes: u64,
    pub(crate) changes_received: usize,
    pub(crate) committed: bool,
    /// What the source heard of the destination's check of its target.
    pub(crate) checked: Option<Checked>,
    /// Packets delivered so far, and after how many the connection is cut.
    pub(crate) delivered: usize,
    pub(crate) cut_after: Option<usize>,
    /// `Paused` messages the destination received.
    pub(crate) pauses_seen: u64,
    /// Batches of the list handed to the source machine, and whether its end was.
    pub(crate) listed: usize,
    pub(crate) list_ended: bool,
    /// `Need` messages that reached the source while it was still listing.
    pub(crate) needs_while_listing: u64,
    /// `Scanning` messages the destination received, and when the source's driver last fed one.
    pub(crate) scanning_seen: u64,
    pub(crate) last_scanning: Instant,
    pub(crate) chunks_sent: u64,
}

impl Pair {
    pub(crate) fn new(changes: Vec<Change>, behaviour: Behaviour, held: HashSet<ChunkHash>) -> Self {
        let now = Instant::now();
        let deadline = behaviour.deadline.map(|d| (now + d, "the deadline (--max-duration 1m)".to_owned()));
        let config = SourceConfig {
            hello: Hello { version: 2, job: "mail".into(), base: None, delete: false, numeric_ids: false, source: 1 },
            options: RoundOptions { import: ImportMode::Default },
            dry_run: false,
            wait_for_import: false,
            deadline,
        };
        Self {
            now,
            start: now,
            latency: Duration::from_millis(50),
            bandwidth: 4 << 20,
            link_free: now,
            to_destination: VecDeque::new(),
            to_source: VecDeque::new(),
            source: SourceRound::new(config),
            destination: DestinationRound::new(STALL),
            behaviour,
            changes,
            outgoing: VecDeque::new(),
            needs_read: 0,
            sending_stopped: false,
            batches_sent: 0,
            flooded: false,
            source_end: None,
            destination_end: None,
            held,
            needed: Vec::new(),
            need_bytes: 0,
            changes_received: 0,
            committed: false,
            checked: None,
            delivered: 0,
            cut_after: None,
            pauses_seen: 0,
            listed: 0,
            list_ended: false,
            needs_while_listing: 0,
            scanning_seen: 0,
            last_scanning: now,
            chunks_sent: 0,
        }
    }

    /// Whether the source's streamed list waits (for the destination's word, as the node's also
    /// waits for its scan).
    pub(crate) fn waits_for_list(&self) -> bool {
        self.behaviour.streamed && self.listed > 0 && !self.list_ended && self.source_end.is_none()
    }

    pub(crate) fn source_paused(&self) -> bool {
        self.behaviour.paused.is_some_and(|(from, to)| self.now >= self.start + from && self.now < self.start + to)
    }

    /// Runs until both sides are done or `limit` of simulated time has passed.
    pub(crate) fn run(&mut self, limit: Duration) {
        let until = self.now + limit;
        let mut steps = 0u32;
        while self.now < until && (self.source_end.is_none() || self.destination_end.is_none() && !self.committed) {
            steps += 1;
            assert!(steps < 1_000_000, "the simulation does not advance (at {:?})", self.now - self.start);
            self.drive();
            let Some(next) = self.next_wake() else { break };
            self.now = next.max(self.now).min(until);
            self.timeouts();
            self.deliver();
        }
    }

    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let mut wakes = vec![
            self.to_destination.front().map(|(at, _)| *at),
            self.to_source.front().map(|(at, _)| *at),
            self.source.poll_timeout(),
            self.destination.poll_timeout(),
            (!self.outgoing.is_empty() && self.link_free > self.now).then_some(self.link_free),
        ];
        // The node's source feeds the limit's state every fraction of a second while it waits.
        if self.behaviour.paused.is_some() && self.source_end.is_none() {
            wakes.push(Some(self.now + Duration::from_millis(100)));
        }
        if self.waits_for_list() {
            wakes.push(Some(self.last_scanning + ferry_proto::PAUSE_NOTICE));
        }
        wakes.into_iter().flatten().min()
    }

    pub(crate) fn timeouts(&mut self) {
        if self.source.poll_timeout().is_some_and(|at| at <= self.now) {
            self.source.handle_timeout(self.now);
        }
        if self.destination.poll_timeout().is_some_and(|at| at <= self.now) {
            self.destination.handle_timeout(self.now);
        }
    }

    pub(crate) fn deliver(&mut self) {
        while self.to_destination.front().is_some_and(|(at, _)| *at <= self.now) {
            let Some((_, packet)) = self.to_destination.pop_front() else { break };
            if self.cut_now() {
                return;
            }
            self.at_destination(packet);
        }
        while self.to_source.front().is_some_and(|(at, _)| *at <= self.now) {
            let Some((_, packet)) = self.to_source.pop_front() else { break };
            if self.cut_now() {
                return;
            }
            self.at_source(packet);
        }
    }

    /// Counts a delivery; at the cut, both sides see the connection end and nothing more travels.
    pub(crate) fn cut_now(&mut self) -> bool {
        self.delivered += 1;
        if self.cut_after.is_some_and(|n| self.delivered > n) {
            self.to_destination.clear();
            self.to_source.clear();
            self.source.handle(SourceInput::Closed { refusal: None, reason: "timed out".into() }, self.now);
            self.destination.handle(DestinationInput::Closed("the connection was lost".into()), self.now);
            self.drive();
            return true;
        }
        false
    }

    pub(crate) fn at_destination(&mut self, packet: Packet) {
        match packet {
            Packet::Control(Transmit::Message(message)) => {
                if message == Message::Paused {
                    self.pauses_seen += 1;
                }
                if message == Message::Scanning {
                    self.scanning_seen += 1;
                }
                self.destination.handle(DestinationInput::Message(message), self.now);
            }
            Packet::Control(Transmit::Finish) => {}
            Packet::Batch(chunks) => {
                // As the node's window does: the need's number says what the chunk must hash to.
                for (need, hash, len) in chunks {
                    match self.destination.answer(need) {
                        Some(asked) if asked == hash => {
                            let held = &self.held;
                            if self.destination.arrive(&hash, len, || held.contains(&hash), self.now) == Arrival::Keep {
                                self.held.insert(hash);
                            }
                        }
                        Some(asked) => {
                            self.destination.damaged(&asked);
                        }
                        None => self.destination.unasked(len, self.now),
                    }
                }
                self.destination.handle(DestinationInput::BatchReceived, self.now);
            }
            Packet::Close(_, why) => self.destination.handle(DestinationInput::Closed(why), self.now),
        }
    }

    pub(crate) fn at_source(&mut self, packet: Packet) {
        match packet {
            Packet::Control(Transmit::Message(message)) => {
                if matches!(message, Message::Need(_)) && self.source.phase() == SourcePhase::Listing {
                    self.needs_while_listing += 1;
                }
                self.source.handle(SourceInput::Message(message), self.now);
            }
            Packet::Control(Transmit::Finish) => {}
            Packet::Batch(_) => unreachable!("the destination sends no chunks"),
            Packet::Close(refusal, reason) => self.source.handle(SourceInput::Closed { refusal, reason }, self.now),
        }
    }

    /// What both drivers do with what their machines said.
    pub(crate) fn drive(&mut self) {
        loop {
            let mut moved = false;
            self.source.handle(SourceInput::Paused(self.source_paused() && !self.behaviour.mute_pauses), self.now);
            if self.waits_for_list() && self.now >= self.last_scanning + ferry_proto::PAUSE_NOTICE {
                self.last_scanning = self.now;
                if !self.behaviour.mute_scanning {
                    self.source.handle(SourceInput::Scanning, self.now);
                }
            }
            while let Some(transmit) = self.source.poll_transmit() {
                self.to_destination.push_back((self.now + self.latency, Packet::Control(transmit)));
            }
            while let Some(transmit) = self.destination.poll_transmit() {
                self.to_source.push_back((self.now + self.latency, Packet::Control(transmit)));
            }
            while let Some(event) = self.source.poll() {
                moved = true;
                self.source_event(event);
            }
            while let Some(event) = self.destination.poll() {
                moved = true;
                self.destination_event(event);
            }
            if !self.source_paused()
                && !self.sending_stopped
                && self.link_free <= self.now
                && let Some(batch) = self.outgoing.pop_front()
            {
                moved = true;
                self.send_batch(batch);
            }
            moved |= self.commit_if_complete();
            if !moved {
                return;
            }
        }
    }

    pub(crate) fn source_event(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Welcomed { .. } if self.behaviour.silent_list => {}
            SourceEvent::Welcomed { .. } => {
                // Streamed, one batch goes ahead of what the destination passed; otherwise all of it.
                self.list_up_to(if self.behaviour.streamed { LIST_BATCH } else { self.changes.len() });
                if self.behaviour.flood > 0 && !self.flooded {
                    self.flooded = true;
                    // Chunks that answer needs never sent.
                    let junk: Vec<_> = (0..self.behaviour.flood / CHUNK)
                        .map(|i| (u64::MAX - i, ChunkHash::of(format!("junk{i}").as_bytes()), CHUNK))
                        .collect();
                    self.outgoing.extend(junk.chunks(64).map(<[_]>::to_vec));
                }
            }
            SourceEvent::Passed(place) => self.list_up_to(place as usize + LIST_BATCH),
            SourceEvent::Read(_) if self.behaviour.ignores_needs => {}
            SourceEvent::Read(needs) => self.read(needs),
            SourceEvent::StopSending => {
                self.sending_stopped = true;
                self.outgoing.clear();
                self.source.handle(SourceInput::SendingStopped { batches: self.batches_sent }, self.now);
            }
            SourceEvent::Ended(end) => {
                // The node closes the connection once its round is over.
                let refusal = matches!(end, SourceEnd::Violation(_)).then_some(Refusal::ProtocolViolation);
                self.to_destination.push_back((self.now + self.latency, Packet::Close(refusal, format!("{end:?}"))));
                self.source_end = Some(end);
            }
            SourceEvent::Checked(checked) => self.checked = Some(checked),
            // These rounds list no prefix: the prefix messages have a case of their own.
            SourceEvent::Notice(_) | SourceEvent::ImportStarted { .. } | SourceEvent::PrefixPlanned(_) => {}
        }
    }

    pub(crate) fn destination_event(&mut self, event: DestinationEvent) {
        match event {
            DestinationEvent::Opened(_) => self.destination.handle(DestinationInput::Welcome { holds: None }, self.now),
            DestinationEvent::Check { .. } => unreachable!("no check in these rounds"),
            DestinationEvent::Prefix(_) => unreachable!("no prefix in these rounds"),
            DestinationEvent::Changes(batch) => {
                let from = self.changes_received;
                self.changes_received += batch.len();
                if self.behaviour.streamed {
                    self.plan(from..self.changes_received);
                }
                if self.behaviour.streamed && !self.behaviour.mute_passed {
                    let passed = DestinationInput::Passed(self.changes_received as u64);
                    self.destination.handle(passed, self.now);
                }
            }
            DestinationEvent::ChangesEnd(_) => {
                // The node tells what its check found once the check is done: here, at the list's end.
                let checked = Checked { entries: self.changes.len() as u64, duration_ms: 5, ..Checked::default() };
                self.destination.handle(DestinationInput::Checked(checked), self.now);
                if !self.behaviour.streamed {
                    self.plan(0..self.changes.len());
                }
            }
            DestinationEvent::Ended(end) => {
                // What arrived is kept; the node closes the connection with the reason.
                let refusal = matches!(end, DestinationEnd::Violation(_)).then_some(Refusal::ProtocolViolation);
                self.to_source.push_back((self.now + self.latency, Packet::Close(refusal, format!("{end:?}"))));
                self.destination_end = Some(end);
            }
        }
    }

    /// The source's list, streamed: hands the machine the batches up to `changes` changes, and the
    /// end once all are.
    pub(crate) fn list_up_to(&mut self, changes: usize) {
        while self.listed * LIST_BATCH < changes.min(self.changes.len()) {
            let batch = self.changes.chunks(LIST_BATCH).nth(self.listed).unwrap().to_vec();
            self.listed += 1;
            self.source.handle(SourceInput::Changes(batch), self.now);
        }
        if self.listed * LIST_BATCH >= self.changes.len() && !self.list_ended {
            self.list_ended = true;
            let end =
                ChangesEnd { base: None, root: RootHash::from_bytes([7; 32]), entries: self.changes.len() as u64 };
            self.source.handle(SourceInput::ChangesEnd(end), self.now);
        }
    }

    /// The destination plans the entries at `places`: asks for every chunk not held, in order.
    pub(crate) fn plan(&mut self, places: std::ops::Range<usize>) {
        let mut needs = Vec::new();
        for (place, change) in (places.start as u64..).zip(&self.changes[places]) {
            let entry = change.entry.as_ref().unwrap();
            let mut offset = 0;
            for chunk in &entry.chunks {
                if !self.held.contains(&chunk.hash) {
                    needs.push(NeedChunk {
                        path: change.path.clone(),
                        place,
                        offset,
                        len: chunk.len,
                        hash: chunk.hash,
                    });
                    self.needed.push(chunk.hash);
                    self.need_bytes += u64::from(chunk.len);
                }
                offset += u64::from(chunk.len);
            }
        }
        for part in needs.chunks(16) {
            self.destination.handle(DestinationInput::Need(part.to_vec()), self.now);
        }
    }

    /// Commits once every chunk asked for is held or known missing; says whether it did.
    pub(crate) fn commit_if_complete(&mut self) -> bool {
        let transferring = self.destination.phase() == ferry_proto::Phase::Transfer;
        if self.committed || !transferring || self.changes_received < self.changes.len() {
            return false;
        }
        let ledger = self.destination.ledger();
        if self.needed.iter().all(|h| self.held.contains(h) || ledger.is_missing(h)) {
            let missing = self.needed.iter().filter(|h| !self.held.contains(*h)).count() as u64;
            let committed = Committed {
                round: RoundRef { round: 1, root: RootHash::from_bytes([7; 32]) },
                files_written: self.changes.len() as u64,
                failures: Vec::new(),
                failure_count: missing,
            };
            self.destination.handle(DestinationInput::Committed(committed), self.now);
            self.destination.handle(DestinationInput::Finish, self.now);
            self.committed = true;
        }
        self.committed
    }

    /// The source's chunk reader: what it can read goes out as one batch, what it cannot is said.
    pub(crate) fn read(&mut self, needs: Vec<ChunkAt>) {
        // A need names a chunk by where it is; its hash is in the source's list (its manifest).
        // Needs count from 0 in the order they came: a batch names each chunk by its need's number.
        let first = self.needs_read;
        self.needs_read += needs.len() as u64;
        let needs: Vec<(u64, NeedChunk)> = (first..).zip(needs.into_iter().map(|at| self.resolve(at))).collect();
        let (unreadable, readable): (Vec<_>, Vec<_>) =
            needs.into_iter().partition(|(_, n)| self.behaviour.unreadable.contains(&n.hash));
        if !unreadable.is_empty() {
            self.source
                .handle(SourceInput::Unreadable(unreadable.iter().map(|(number, _)| *number).collect()), self.now);
        }
        if !readable.is_empty() {
            self.outgoing.push_back(readable.iter().map(|(number, n)| (*number, n.hash, u64::from(n.len))).collect());
        }
    }

    /// The chunk of the source's tree at `at`, with its path and hash (the tree is the manifest: a
    /// place is an index into it).
    pub(crate) fn resolve(&self, at: ChunkAt) -> NeedChunk {
        let change = usize::try_from(at.place).ok().and_then(|place| self.changes.get(place));
        let entry = change.and_then(|c| c.entry.as_ref()).expect("a need names a file of the round");
        let mut offset = 0;
        for chunk in &entry.chunks {
            if offset == at.offset {
                assert_eq!(chunk.len, at.len, "a need's length is its chunk's");
                let path = entry.path.clone();
                return NeedChunk { path, place: at.place, offset, len: at.len, hash: chunk.hash };
            }
            offset += u64::from(chunk.len);
        }
        panic!("no chunk at {} in {}", at.offset, entry.path);
    }

    /// One batch over the link: it leaves when the link is free, takes its bytes' time, then the latency.
    pub(crate) fn send_batch(&mut self, chunks: Vec<(u64, ChunkHash, u64)>) {
        let bytes: u64 = chunks.iter().map(|(_, _, len)| len).sum();
        let leaves = self.link_free.max(self.now);
        self.link_free = leaves + Duration::from_secs_f64(bytes as f64 / self.bandwidth as f64);
        self.batches_sent += 1;
        self.chunks_sent += chunks.len() as u64;
        let arrives = self.link_free + self.latency;
        // Data streams are not ordered with the control stream: keep the queue sorted by arrival.
        let at = self.to_destination.partition_point(|(t, _)| *t <= arrives);
        self.to_destination.insert(at, (arrives, Packet::Batch(chunks)));
    }
}

pub(crate) fn committed(pair: &Pair) -> bool {
    matches!(pair.source_end, Some(SourceEnd::Committed { .. })) && pair.committed
}
