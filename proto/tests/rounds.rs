//! The two round machines back to back, without sockets: a simulated link with latency and a
//! bandwidth, simulated time, and drivers that do what the node's do (the source reads chunks and
//! sends batches; the destination asks for what it lacks and commits when all is in). In the manner
//! of quinn-proto's `tests/util.rs` `Pair`. Each case runs in milliseconds.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use ferry_engine::{ChunkHash, ChunkRef, Entry, EntryKind, RelPath, RootHash};
use ferry_proto::window::Arrival;
use ferry_proto::{
    Change, ChangesEnd, ChunkAt, Committed, DestinationEnd, DestinationEvent, DestinationInput, DestinationRound,
    Hello, ImportMode, Message, NeedChunk, Refusal, RoundOptions, RoundRef, SourceConfig, SourceEnd, SourceEvent,
    SourceInput, SourcePhase, SourceRound, Transmit,
};

const STALL: Duration = Duration::from_secs(3);
const CHUNK: u64 = 64 << 10;
/// Changes per batch of the list.
const LIST_BATCH: usize = 7;

/// What travels between the two sides.
#[derive(Debug)]
enum Packet {
    Control(Transmit),
    /// A chunk batch on a data stream: for each chunk, the number of the need it answers, what its
    /// bytes hash to, and its length.
    Batch(Vec<(u64, ChunkHash, u64)>),
    /// The connection closes, with a refusal code or not.
    Close(Option<Refusal>, String),
}

/// How the simulated source misbehaves, or is limited.
#[derive(Default, Clone)]
struct Behaviour {
    /// Sends nothing after `Welcome` (a hung source).
    silent_list: bool,
    /// Reads no chunk it is asked for (a hung reader).
    ignores_needs: bool,
    /// Sends this many bytes of chunks nobody asked for, after the list.
    flood: u64,
    /// Its bandwidth limit pauses it over this span (from the start of the run).
    paused: Option<(Duration, Duration)>,
    /// Its driver never tells the machine of the pause (so no `Paused` goes out).
    mute_pauses: bool,
    /// `--max-duration`, from the start.
    deadline: Option<Duration>,
    /// Chunks it cannot read (their files changed).
    unreadable: HashSet<ChunkHash>,
    /// The list streams: the source lists one batch ahead of what the destination says it passed,
    /// and the destination plans each batch as it comes.
    streamed: bool,
    /// The destination's driver never says what it passed.
    mute_passed: bool,
    /// The source's driver never says that its list waits.
    mute_scanning: bool,
}

/// A tree: `files` files of `chunks` chunks each, all distinct.
fn tree(files: u32, chunks: u32) -> Vec<Change> {
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
struct Pair {
    now: Instant,
    start: Instant,
    latency: Duration,
    /// Bytes per second of the source's link.
    bandwidth: u64,
    link_free: Instant,
    to_destination: VecDeque<(Instant, Packet)>,
    to_source: VecDeque<(Instant, Packet)>,
    source: SourceRound,
    destination: DestinationRound,
    behaviour: Behaviour,
    changes: Vec<Change>,
    /// Batches read and not sent yet: one leaves when the link is free and the limit lets it. Each
    /// chunk: the number of the need it answers, its hash (what its bytes hash to), its length.
    outgoing: VecDeque<Vec<(u64, ChunkHash, u64)>>,
    /// Needs the source has read, in order: the next one's number.
    needs_read: u64,
    sending_stopped: bool,
    batches_sent: u64,
    flooded: bool,
    source_end: Option<SourceEnd>,
    destination_end: Option<DestinationEnd>,
    /// The destination's store: kept across connections, as the node keeps what arrived.
    held: HashSet<ChunkHash>,
    needed: Vec<ChunkHash>,
    need_bytes: u64,
    changes_received: usize,
    committed: bool,
    /// Packets delivered so far, and after how many the connection is cut.
    delivered: usize,
    cut_after: Option<usize>,
    /// `Paused` messages the destination received.
    pauses_seen: u64,
    /// Batches of the list handed to the source machine, and whether its end was.
    listed: usize,
    list_ended: bool,
    /// `Need` messages that reached the source while it was still listing.
    needs_while_listing: u64,
    /// `Scanning` messages the destination received, and when the source's driver last fed one.
    scanning_seen: u64,
    last_scanning: Instant,
    chunks_sent: u64,
}

impl Pair {
    fn new(changes: Vec<Change>, behaviour: Behaviour, held: HashSet<ChunkHash>) -> Self {
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
    fn waits_for_list(&self) -> bool {
        self.behaviour.streamed && self.listed > 0 && !self.list_ended && self.source_end.is_none()
    }

    fn source_paused(&self) -> bool {
        self.behaviour.paused.is_some_and(|(from, to)| self.now >= self.start + from && self.now < self.start + to)
    }

    /// Runs until both sides are done or `limit` of simulated time has passed.
    fn run(&mut self, limit: Duration) {
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

    fn next_wake(&self) -> Option<Instant> {
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

    fn timeouts(&mut self) {
        if self.source.poll_timeout().is_some_and(|at| at <= self.now) {
            self.source.handle_timeout(self.now);
        }
        if self.destination.poll_timeout().is_some_and(|at| at <= self.now) {
            self.destination.handle_timeout(self.now);
        }
    }

    fn deliver(&mut self) {
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
    fn cut_now(&mut self) -> bool {
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

    fn at_destination(&mut self, packet: Packet) {
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

    fn at_source(&mut self, packet: Packet) {
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
    fn drive(&mut self) {
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

    fn source_event(&mut self, event: SourceEvent) {
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
            SourceEvent::Notice(_) | SourceEvent::ImportStarted { .. } => {}
        }
    }

    fn destination_event(&mut self, event: DestinationEvent) {
        match event {
            DestinationEvent::Opened(_) => self.destination.handle(DestinationInput::Welcome { holds: None }, self.now),
            DestinationEvent::Check { .. } => unreachable!("no check in these rounds"),
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
            DestinationEvent::ChangesEnd(_) if self.behaviour.streamed => {}
            DestinationEvent::ChangesEnd(_) => self.plan(0..self.changes.len()),
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
    fn list_up_to(&mut self, changes: usize) {
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
    fn plan(&mut self, places: std::ops::Range<usize>) {
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
    fn commit_if_complete(&mut self) -> bool {
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
    fn read(&mut self, needs: Vec<ChunkAt>) {
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
    fn resolve(&self, at: ChunkAt) -> NeedChunk {
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
    fn send_batch(&mut self, chunks: Vec<(u64, ChunkHash, u64)>) {
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

fn committed(pair: &Pair) -> bool {
    matches!(pair.source_end, Some(SourceEnd::Committed { .. })) && pair.committed
}

#[test]
fn a_round_commits_and_only_what_is_lacking_is_asked_for() {
    let changes = tree(20, 4);
    let mut pair = Pair::new(changes.clone(), Behaviour::default(), HashSet::new());
    pair.run(Duration::from_secs(60));
    assert!(committed(&pair), "{:?} / {:?}", pair.source_end, pair.destination_end);
    assert_eq!(pair.need_bytes, 80 * CHUNK);
    // 5 MiB over a 4 MiB/s link with 50 ms each way: the simulated clock says about 1.3 s.
    let took = pair.now - pair.start;
    assert!(took > Duration::from_millis(1250) && took < Duration::from_secs(3), "{took:?}");

    // Half of it already held: half is asked for.
    let held: HashSet<_> =
        changes[..10].iter().flat_map(|c| c.entry.as_ref().unwrap().chunks.iter().map(|c| c.hash)).collect();
    let mut pair = Pair::new(changes, Behaviour::default(), held);
    pair.run(Duration::from_secs(60));
    assert!(committed(&pair));
    assert_eq!(pair.need_bytes, 40 * CHUNK);
}

#[test]
fn a_streamed_list_is_answered_with_chunks_before_it_ends_and_goes_no_further_than_one_batch_ahead() {
    let changes = tree(30, 3);
    let behaviour = Behaviour { streamed: true, ..Behaviour::default() };
    let mut pair = Pair::new(changes.clone(), behaviour, HashSet::new());
    pair.run(Duration::from_secs(60));
    assert!(committed(&pair), "{:?} / {:?}", pair.source_end, pair.destination_end);
    assert_eq!(pair.need_bytes, 90 * CHUNK);
    assert_eq!(pair.held.len(), 90, "every chunk arrived");
    // The list's five batches each waited for the destination's word on the one before: the
    // destination asked for chunks while the list was still coming.
    assert_eq!(pair.listed, 5);
    assert!(pair.needs_while_listing >= 4, "{} needs while listing", pair.needs_while_listing);

    // Without the destination's word the list stops after its first batch; the source says every
    // second that it is alive (`Scanning`), so the destination does not call it stalled.
    let behaviour = Behaviour { streamed: true, mute_passed: true, ..Behaviour::default() };
    let mut pair = Pair::new(changes.clone(), behaviour, HashSet::new());
    pair.run(Duration::from_secs(10));
    assert_eq!((pair.source_end.as_ref(), pair.destination_end.as_ref()), (None, None));
    assert_eq!(pair.listed, 1, "one batch ahead of what the destination passed");
    assert!(pair.scanning_seen >= 8, "{} Scanning", pair.scanning_seen);
    // A source that says nothing while it waits is.
    let behaviour = Behaviour { streamed: true, mute_passed: true, mute_scanning: true, ..Behaviour::default() };
    let mut pair = Pair::new(changes, behaviour, HashSet::new());
    pair.run(Duration::from_secs(10));
    let Some(DestinationEnd::Cut(why)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(why.contains("the source sent nothing for 3 s"), "{why}");
}

#[test]
fn a_deadline_while_the_list_streams_stops_the_senders_and_the_destination_keeps_what_arrived() {
    // 120 chunks of 64 KiB at 4 MiB/s take about 2 s; the deadline comes at 1 s, mid-list.
    let behaviour = Behaviour { streamed: true, deadline: Some(Duration::from_secs(1)), ..Behaviour::default() };
    let mut pair = Pair::new(tree(120, 1), behaviour, HashSet::new());
    pair.run(Duration::from_secs(300));
    let Some(SourceEnd::Deadline { batches }) = pair.source_end else { panic!("{:?}", pair.source_end) };
    assert!(!pair.list_ended, "the deadline came while the list was still streaming");
    assert!(batches > 0 && batches == pair.batches_sent, "{batches} of {}", pair.batches_sent);
    let Some(DestinationEnd::Stopped(_)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert_eq!(pair.held.len() as u64, pair.chunks_sent, "every chunk sent was kept");
    assert!(!pair.committed);
}

#[test]
fn a_cut_at_any_point_loses_nothing_that_arrived_and_the_next_connection_finishes() {
    let changes = tree(6, 3);
    let all: u64 = 18 * CHUNK;
    // A full run delivers some number of packets; cut after each of them in turn.
    let mut whole = Pair::new(changes.clone(), Behaviour::default(), HashSet::new());
    whole.run(Duration::from_secs(60));
    assert!(committed(&whole));
    let deliveries = whole.delivered;
    assert!(deliveries > 10, "{deliveries} deliveries");
    for cut in 0..deliveries {
        let mut first = Pair::new(changes.clone(), Behaviour::default(), HashSet::new());
        first.cut_after = Some(cut);
        first.run(Duration::from_secs(60));
        let end = first.source_end.as_ref().expect("the source's connection ended");
        if !committed(&first) {
            assert!(end.may_reconnect(), "cut after {cut}: {end:?} would not reconnect");
            if first.destination.phase() != ferry_proto::Phase::Greeting {
                assert!(
                    matches!(&first.destination_end, Some(DestinationEnd::Cut(_))) || first.committed,
                    "cut after {cut}: destination {:?}",
                    first.destination_end
                );
            }
        }
        // The next connection asks only for what did not arrive, and commits.
        let kept = first.held.len() as u64 * CHUNK;
        let mut second = Pair::new(changes.clone(), Behaviour::default(), first.held.clone());
        second.run(Duration::from_secs(60));
        assert!(committed(&second), "cut after {cut}: the next connection did not commit");
        assert_eq!(second.need_bytes, all - kept, "cut after {cut}");
    }
}

#[test]
fn a_source_silent_during_its_list_is_called_stalled_at_the_stall_timeout() {
    let behaviour = Behaviour { silent_list: true, ..Behaviour::default() };
    let mut pair = Pair::new(tree(3, 1), behaviour, HashSet::new());
    pair.run(Duration::from_secs(60));
    let Some(DestinationEnd::Cut(why)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(why.contains("the source sent nothing for 3 s"), "{why}");
    // Welcome left at 50 ms: stalled 3 s after, give or take the wake-up granularity.
    let took = pair.now - pair.start;
    assert!(took >= Duration::from_millis(3050) && took < Duration::from_millis(3300), "{took:?}");
    assert!(matches!(pair.source_end, Some(SourceEnd::PeerFailed(_))), "{:?}", pair.source_end);
}

#[test]
fn a_source_that_stops_sending_chunks_is_called_stalled() {
    let behaviour = Behaviour { ignores_needs: true, ..Behaviour::default() };
    let mut pair = Pair::new(tree(3, 2), behaviour, HashSet::new());
    pair.run(Duration::from_secs(60));
    let Some(DestinationEnd::Cut(why)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(why.contains("no chunk arrived for 3 s"), "{why}");
    assert!(!pair.committed);
}

#[test]
fn a_flood_of_chunks_nobody_asked_for_ends_the_round() {
    let behaviour = Behaviour { flood: 80 << 20, ..Behaviour::default() };
    let mut pair = Pair::new(tree(2, 1), behaviour, HashSet::new());
    pair.bandwidth = 1 << 30;
    pair.run(Duration::from_secs(60));
    let Some(DestinationEnd::Cut(why)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(why.contains("did not ask for"), "{why}");
    let Some(SourceEnd::PeerFailed(reason)) = &pair.source_end else { panic!("{:?}", pair.source_end) };
    assert!(reason.contains("did not ask for"), "{reason}");
}

#[test]
fn a_pause_longer_than_the_stall_timeout_is_not_a_stall() {
    // Paused from 0.5 s to 10 s (more than three stall timeouts): the round waits, then commits.
    let behaviour =
        Behaviour { paused: Some((Duration::from_millis(500), Duration::from_secs(10))), ..Behaviour::default() };
    let mut pair = Pair::new(tree(40, 4), behaviour, HashSet::new());
    pair.run(Duration::from_secs(60));
    assert!(committed(&pair), "{:?} / {:?}", pair.source_end, pair.destination_end);
    assert!(pair.now - pair.start > Duration::from_secs(10));
    // About one notice a second of the pause, not one per wake-up.
    assert!((8..=11).contains(&pair.pauses_seen), "{} notices", pair.pauses_seen);

    // The same pause without its notices is a stall: they are what keeps the round.
    let behaviour = Behaviour {
        paused: Some((Duration::from_millis(500), Duration::from_secs(10))),
        mute_pauses: true,
        ..Behaviour::default()
    };
    let mut pair = Pair::new(tree(40, 4), behaviour, HashSet::new());
    pair.run(Duration::from_secs(60));
    let Some(DestinationEnd::Cut(why)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(why.contains("no chunk arrived for 3 s"), "{why}");
    assert_eq!(pair.pauses_seen, 0);
}

#[test]
fn a_deadline_stops_the_round_and_the_destination_keeps_every_batch_sent() {
    // 10 MiB at 1 MiB/s: the 3 s deadline comes in the middle of the transfer.
    let changes = tree(40, 4);
    let behaviour = Behaviour { deadline: Some(Duration::from_secs(3)), ..Behaviour::default() };
    let mut pair = Pair::new(changes.clone(), behaviour, HashSet::new());
    pair.bandwidth = 1 << 20;
    pair.run(Duration::from_secs(300));
    let Some(SourceEnd::Deadline { batches }) = pair.source_end else { panic!("{:?}", pair.source_end) };
    assert_eq!(batches, pair.batches_sent);
    assert!(batches > 0);
    let Some(DestinationEnd::Stopped(reason)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(reason.contains("--max-duration"), "{reason}");
    assert!(!pair.committed);
    // Every chunk of every batch sent arrived and was kept (each batch here is one Need of 16 chunks).
    let kept = pair.held.len() as u64;
    assert_eq!(kept, batches * 16, "kept {kept} chunks of {batches} batches");
    // The next round asks for the rest only.
    let mut next = Pair::new(changes, Behaviour::default(), pair.held.clone());
    next.run(Duration::from_secs(60));
    assert!(committed(&next));
    assert_eq!(next.need_bytes, (160 - kept) * CHUNK);
}

#[test]
fn a_stop_asked_for_during_the_transfer_ends_it_as_a_deadline_would() {
    let changes = tree(40, 4);
    let mut pair = Pair::new(changes, Behaviour::default(), HashSet::new());
    pair.bandwidth = 1 << 20;
    pair.run(Duration::from_secs(2));
    assert_eq!(pair.source.phase(), SourcePhase::Serving);
    pair.source.stop("SIGTERM (the operator stopped the round)".into(), pair.now);
    pair.run(Duration::from_secs(300));
    let Some(SourceEnd::Deadline { batches }) = pair.source_end else { panic!("{:?}", pair.source_end) };
    assert!(batches > 0 && batches == pair.batches_sent, "{batches} of {}", pair.batches_sent);
    let Some(DestinationEnd::Stopped(reason)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(reason.contains("SIGTERM"), "{reason}");
    assert_eq!(pair.held.len() as u64, batches * 16, "every batch sent was kept");
    assert!(!pair.committed);
}

#[test]
fn a_deadline_before_the_transfer_fails_the_round_with_words() {
    let behaviour = Behaviour { deadline: Some(Duration::from_millis(20)), silent_list: true, ..Behaviour::default() };
    let mut pair = Pair::new(tree(2, 1), behaviour, HashSet::new());
    pair.run(Duration::from_secs(10));
    assert_eq!(pair.source_end, Some(SourceEnd::Deadline { batches: 0 }));
    let Some(DestinationEnd::Cut(why)) = &pair.destination_end else { panic!("{:?}", pair.destination_end) };
    assert!(why.contains("before the transfer began"), "{why}");
}

#[test]
fn chunks_the_source_cannot_read_are_given_up_and_the_round_commits_without_them() {
    let changes = tree(4, 2);
    let lost = changes[1].entry.as_ref().unwrap().chunks[0].hash;
    let behaviour = Behaviour { unreadable: HashSet::from([lost]), ..Behaviour::default() };
    let mut pair = Pair::new(changes, behaviour, HashSet::new());
    pair.run(Duration::from_secs(60));
    assert!(committed(&pair));
    assert!(pair.destination.ledger().is_missing(&lost));
    let Some(SourceEnd::Committed { committed, .. }) = &pair.source_end else { unreachable!() };
    assert_eq!(committed.failure_count, 1);
}

#[test]
fn a_replaced_connection_may_reconnect_and_a_refused_one_may_not() {
    // The destination's daemon closes the old connection when the same peer connects again.
    let mut pair = Pair::new(tree(4, 2), Behaviour::default(), HashSet::new());
    pair.run(Duration::from_millis(120));
    assert_eq!(pair.source.phase(), SourcePhase::Serving);
    pair.source.handle(SourceInput::Closed { refusal: Some(Refusal::Replaced), reason: "replaced".into() }, pair.now);
    let Some(SourceEvent::Ended(end)) = pair.source.poll() else { panic!("the source did not end") };
    assert!(end.may_reconnect(), "{end:?}");
    // A busy job is refused for this round: `--wait` asks again, reconnecting does not.
    let mut pair = Pair::new(tree(1, 1), Behaviour::default(), HashSet::new());
    pair.drive();
    pair.destination.handle(
        DestinationInput::Message(Message::Hello(Hello {
            version: 2,
            job: "mail".into(),
            base: None,
            delete: false,
            numeric_ids: false,
            source: 1,
        })),
        pair.now,
    );
    pair.destination
        .handle(DestinationInput::Refuse { refusal: Refusal::Busy, reason: "another peer".into() }, pair.now);
    let refused = pair.destination.poll_transmit();
    let Some(Transmit::Message(message)) = refused else { panic!("{refused:?}") };
    pair.source.handle(SourceInput::Message(message), pair.now);
    let Some(SourceEvent::Ended(end)) = pair.source.poll() else { panic!("the source did not end") };
    assert!(matches!(end, SourceEnd::Refused { refusal: Refusal::Busy, .. }));
    assert!(!end.may_reconnect());
}

#[test]
fn messages_out_of_place_are_violations_on_both_sides() {
    // The destination: changes before Hello, a second Hello, a stop before the round was taken.
    let now = Instant::now();
    let hello =
        Message::Hello(Hello { version: 2, job: "j".into(), base: None, delete: false, numeric_ids: false, source: 1 });
    let mut destination = DestinationRound::new(STALL);
    destination.handle(DestinationInput::Message(Message::Changes(vec![])), now);
    let violation = destination.poll();
    assert!(matches!(violation, Some(DestinationEvent::Ended(DestinationEnd::Violation(_)))), "{violation:?}");
    assert!(matches!(destination.poll_transmit(), Some(Transmit::Message(Message::Failed { .. }))));
    let mut destination = DestinationRound::new(STALL);
    destination.handle(DestinationInput::Message(hello.clone()), now);
    assert!(matches!(destination.poll(), Some(DestinationEvent::Opened(_))));
    destination.handle(DestinationInput::Message(Message::Stop { reason: "early".into(), batches: 0 }), now);
    assert!(matches!(destination.poll(), Some(DestinationEvent::Ended(DestinationEnd::Violation(_)))));
    // A check's connection carries no round.
    let mut destination = DestinationRound::new(STALL);
    destination.handle(DestinationInput::Message(Message::Check { job: "j".into(), source: 1 }), now);
    assert_eq!(destination.poll(), Some(DestinationEvent::Check { job: "j".into(), source: 1 }));
    destination.handle(DestinationInput::Message(hello), now);
    assert_eq!(destination.poll(), None, "after the check the connection is closed: nothing starts");

    // The source: a Need before Welcome, a Committed during a dry run.
    let config = SourceConfig {
        hello: Hello { version: 2, job: "j".into(), base: None, delete: false, numeric_ids: false, source: 1 },
        options: RoundOptions { import: ImportMode::None },
        dry_run: false,
        wait_for_import: false,
        deadline: None,
    };
    let mut source = SourceRound::new(config.clone());
    source.handle(SourceInput::Message(Message::Need(vec![])), now);
    assert!(matches!(source.poll(), Some(SourceEvent::Ended(SourceEnd::Violation(_)))));
    let mut source = SourceRound::new(SourceConfig { dry_run: true, ..config });
    let opening: Vec<_> = std::iter::from_fn(|| source.poll_transmit()).collect();
    assert_eq!(opening.len(), 3, "Hello, RoundOptions and DryRun");
    source.handle(SourceInput::Message(Message::Welcome { holds: None }), now);
    source.handle(
        SourceInput::ChangesEnd(ChangesEnd { base: None, root: RootHash::from_bytes([0; 32]), entries: 0 }),
        now,
    );
    let committed = Committed {
        round: RoundRef { round: 1, root: RootHash::from_bytes([0; 32]) },
        files_written: 0,
        failures: vec![],
        failure_count: 0,
    };
    source.handle(SourceInput::Message(Message::Committed(committed)), now);
    let events: Vec<_> = std::iter::from_fn(|| source.poll()).collect();
    assert!(matches!(events.last(), Some(SourceEvent::Ended(SourceEnd::Violation(_)))), "{events:?}");
}

#[test]
fn the_source_waits_for_the_import_when_asked_and_a_lost_connection_does_not_undo_the_commit() {
    let now = Instant::now();
    let config = SourceConfig {
        hello: Hello { version: 2, job: "j".into(), base: None, delete: false, numeric_ids: false, source: 1 },
        options: RoundOptions { import: ImportMode::Full },
        dry_run: false,
        wait_for_import: true,
        deadline: None,
    };
    let committed = Committed {
        round: RoundRef { round: 3, root: RootHash::from_bytes([0; 32]) },
        files_written: 1,
        failures: vec![],
        failure_count: 0,
    };
    let open = |source: &mut SourceRound| {
        source.handle(SourceInput::Message(Message::Welcome { holds: None }), now);
        source.handle(
            SourceInput::ChangesEnd(ChangesEnd { base: None, root: RootHash::from_bytes([0; 32]), entries: 0 }),
            now,
        );
        source.handle(SourceInput::Message(Message::Committed(committed.clone())), now);
    };
    let mut source = SourceRound::new(config.clone());
    open(&mut source);
    assert_eq!(source.phase(), SourcePhase::Importing);
    source.handle(SourceInput::Message(Message::ImportStarted { round: 3, command: vec!["import".into()] }), now);
    let result =
        ferry_proto::ImportResult { round: 3, success: true, exit_code: Some(0), tail: vec![], duration_ms: 5 };
    source.handle(SourceInput::Message(Message::ImportDone(result.clone())), now);
    let events: Vec<_> = std::iter::from_fn(|| source.poll()).collect();
    assert_eq!(
        events.last(),
        Some(&SourceEvent::Ended(SourceEnd::Committed { committed: committed.clone(), import: Some(result) }))
    );

    let mut source = SourceRound::new(config);
    open(&mut source);
    source.handle(SourceInput::Closed { refusal: None, reason: "reset".into() }, now);
    let events: Vec<_> = std::iter::from_fn(|| source.poll()).collect();
    assert_eq!(events.last(), Some(&SourceEvent::Ended(SourceEnd::Committed { committed, import: None })));
}
