//! The two round machines back to back, without sockets: a simulated link with latency and a
//! bandwidth, simulated time, and drivers that do what the node's do (the source reads chunks and
//! sends batches; the destination asks for what it lacks and commits when all is in). In the manner
//! of quinn-proto's `tests/util.rs` `Pair`. Each case runs in milliseconds.

mod pair;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ferry_engine::RootHash;
use ferry_proto::{
    ChangesEnd, Committed, DestinationEnd, DestinationEvent, DestinationInput, DestinationRound, Hello, ImportMode,
    Message, Refusal, RoundOptions, RoundRef, SourceConfig, SourceEnd, SourceEvent, SourceInput, SourcePhase,
    SourceRound, Transmit,
};
use pair::{Behaviour, CHUNK, Pair, STALL, committed, tree};

#[test]
fn a_round_commits_and_only_what_is_lacking_is_asked_for() {
    let changes = tree(20, 4);
    let mut pair = Pair::new(changes.clone(), Behaviour::default(), HashSet::new());
    pair.run(Duration::from_secs(60));
    assert!(committed(&pair), "{:?} / {:?}", pair.source_end, pair.destination_end);
    assert_eq!(pair.need_bytes, 80 * CHUNK);
    // What the destination's check found reaches the source's report.
    assert_eq!(pair.checked.map(|c| (c.entries, c.duration_ms)), Some((20, 5)));
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

/// A large file's first chunks, listed as the source cuts it, go from the source's machine to the
/// destination's while the list streams, and the destination's word that it planned them comes
/// back; a dry run sends none, and one after the list's end is a violation.
#[test]
fn a_prefix_goes_between_the_changes_and_the_word_that_it_was_planned_comes_back() {
    let now = Instant::now();
    let prefix = ferry_engine::FilePrefix {
        place: 7,
        path: ferry_engine::RelPath::new(&b"server/backup.tgz"[..]).unwrap(),
        offset: 0,
        chunks: tree(1, 2).remove(0).entry.unwrap().chunks,
        size: 1 << 30,
    };
    let hello = Hello { version: 7, job: "j".into(), base: None, delete: false, numeric_ids: false, source: 1 };
    let config = SourceConfig {
        hello: hello.clone(),
        options: RoundOptions { import: ImportMode::None },
        dry_run: false,
        wait_for_import: false,
        deadline: None,
    };
    let (mut source, mut destination) = (SourceRound::new(config.clone()), DestinationRound::new(STALL));
    // Every message the source sends reaches the destination, and the other way.
    let carry = |source: &mut SourceRound, destination: &mut DestinationRound| {
        while let Some(Transmit::Message(message)) = source.poll_transmit() {
            destination.handle(DestinationInput::Message(message), now);
        }
        while let Some(Transmit::Message(message)) = destination.poll_transmit() {
            source.handle(SourceInput::Message(message), now);
        }
    };
    carry(&mut source, &mut destination);
    assert!(matches!(destination.poll(), Some(DestinationEvent::Opened(_))));
    destination.handle(DestinationInput::Welcome { holds: None }, now);
    carry(&mut source, &mut destination);
    assert!(matches!(source.poll(), Some(SourceEvent::Welcomed { holds: None })));
    source.handle(SourceInput::Changes(tree(2, 1)), now);
    source.handle(SourceInput::Prefix(prefix.clone()), now);
    carry(&mut source, &mut destination);
    assert!(matches!(destination.poll(), Some(DestinationEvent::Changes(_))));
    assert_eq!(destination.poll(), Some(DestinationEvent::Prefix(prefix.clone())));
    destination.handle(DestinationInput::PrefixPlanned(7), now);
    carry(&mut source, &mut destination);
    assert_eq!(source.poll(), Some(SourceEvent::PrefixPlanned(7)));
    // After the list's end, a prefix has nothing to go with.
    source.handle(
        SourceInput::ChangesEnd(ChangesEnd { base: None, root: RootHash::from_bytes([0; 32]), entries: 3 }),
        now,
    );
    carry(&mut source, &mut destination);
    assert!(matches!(destination.poll(), Some(DestinationEvent::ChangesEnd(_))));
    destination.handle(DestinationInput::Message(Message::Prefix(prefix.clone())), now);
    assert!(matches!(destination.poll(), Some(DestinationEvent::Ended(DestinationEnd::Violation(_)))));

    // A dry run lists no prefix: its destination plans the list once it is whole.
    let mut source = SourceRound::new(SourceConfig { dry_run: true, ..config });
    std::iter::from_fn(|| source.poll_transmit()).for_each(drop);
    source.handle(SourceInput::Message(Message::Welcome { holds: None }), now);
    source.handle(SourceInput::Prefix(prefix), now);
    assert_eq!(source.poll_transmit(), None);
}
