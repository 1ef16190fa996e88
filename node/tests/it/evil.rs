//! A trusted peer that turns hostile, over a real QUIC connection (`ferry_testkit::evil`): messages
//! out of order, bytes that are not frames, absurd sizes, chunks nobody asked for, silence; and, the
//! other way, a destination that asks the source for what it must not read. Each ends with a clear
//! error, no panic, nothing written outside the target, and the daemon serving the next round.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_certs::{Identity, NodeId};
use ferry_engine::{ChunkHash, ChunkRef, Entry, EntryKind, RelPath, RootHash};
use ferry_proto::{
    Change, ChangesEnd, ChunkAt, ChunkBatch, Codec, Committed, Hello, Message, PROTOCOL_VERSION, Refusal,
};
use ferry_testkit::evil::{EvilDestination, EvilSource, EvilStream};

use crate::network::{Node, Setup};
use crate::util::{assert_same_tree, random_bytes, sentinel, write};

const LIMIT: Duration = Duration::from_secs(20);

fn hello(job: &str) -> Message {
    let source = 1;
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        job: job.into(),
        base: None,
        delete: false,
        numeric_ids: false,
        source,
    })
}

fn file(path: &str, data: &[u8]) -> Entry {
    Entry {
        mtime_ns: 1_700_000_000_000_000_000,
        size: data.len() as u64,
        chunks: vec![ChunkRef { hash: ChunkHash::of(data), len: data.len() as u32 }],
        ..Entry::new(RelPath::new(path).unwrap(), EntryKind::File)
    }
}

fn change(entry: Entry) -> Change {
    Change { path: entry.path.clone(), entry: Some(entry), content_as_before: false, base: None }
}

/// Hello, one change, the end of the changes; returns the control stream once `Welcome` came.
async fn open_round(evil: &EvilSource, job: &str, changes: Vec<Change>, entries: u64) -> EvilStream {
    let mut control = evil.open().await.unwrap();
    control.send(&hello(job)).await.unwrap();
    match control.next(LIMIT).await.unwrap() {
        Some(Message::Welcome { .. }) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    control.send(&Message::Changes(changes)).await.unwrap();
    let end = ChangesEnd { base: None, root: RootHash::from_bytes([9; 32]), entries };
    control.send(&Message::ChangesEnd(end)).await.unwrap();
    control
}

struct Scene {
    setup: Setup,
    identity: Identity,
    daemon_id: NodeId,
}

impl Scene {
    fn new(stall_timeout: &str) -> Self {
        let mut setup = Setup::new();
        // The daemon again, with a short stall deadline.
        setup.restart_daemon(&[], &["--stall-timeout", stall_timeout]);
        let identity = Identity::load(&setup.source.config).unwrap();
        let daemon_id = setup.dest.id.parse().unwrap();
        Self { setup, identity, daemon_id }
    }

    /// A scene whose source has job `zimbra` (one small file in `export`, to `migration`); returns
    /// the source and target paths too.
    fn with_job(stall_timeout: &str) -> (Self, std::path::PathBuf, std::path::PathBuf) {
        let scene = Self::new(stall_timeout);
        let (source, target) = (scene.setup.path("export"), scene.setup.path("migration"));
        write(&source.join("mail/1"), &random_bytes(300_000, 1));
        scene.setup.job("zimbra", &source, &target);
        (scene, source, target)
    }

    async fn connect(&self) -> EvilSource {
        EvilSource::connect(&self.identity, self.daemon_id, self.setup.daemon.addr.parse().unwrap()).await.unwrap()
    }

    fn alive(&mut self) -> bool {
        self.setup.daemon.child.try_wait().unwrap().is_none()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_source_is_cut_off_with_a_reason_and_the_daemon_serves_on() {
    let (mut scene, source, target) = Scene::with_job("3s");
    let outside = scene.setup.path("outside");
    write(&outside.join("keep"), b"untouched");
    let before = sentinel(&outside);

    let mut reasons = Vec::new();
    // 1. A chunk batch where Hello must come.
    let evil = scene.connect().await;
    let mut control = evil.open().await.unwrap();
    let batch = ChunkBatch { codec: Codec::Raw, chunks: vec![], payload: Bytes::new() };
    control.send(&Message::ChunkBatch(batch)).await.unwrap();
    reasons.push((
        "a batch before Hello",
        evil.closed(LIMIT).await.unwrap(),
        "ChunkBatch is not allowed while Greeting",
    ));

    // 2. Bytes that are not a frame, and a frame that claims 4 GiB.
    let evil = scene.connect().await;
    let mut control = evil.open().await.unwrap();
    control.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    reasons.push(("garbage", evil.closed(LIMIT).await.unwrap(), "malformed"));
    let evil = scene.connect().await;
    let mut control = evil.open().await.unwrap();
    control.send_raw(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    reasons.push(("a 4 GiB frame", evil.closed(LIMIT).await.unwrap(), "limit"));

    // 3. A path that climbs out, smuggled past the encoder: the same bytes as a valid name.
    let evil = scene.connect().await;
    let mut control = evil.open().await.unwrap();
    control.send(&hello("zimbra")).await.unwrap();
    let _welcome = control.next(LIMIT).await.unwrap();
    let mut frame = bytes::BytesMut::new();
    ferry_proto::encode(&Message::Changes(vec![change(file("zz/evil", b"x"))]), &mut frame).unwrap();
    let at = frame.windows(7).position(|w| w == b"zz/evil").unwrap();
    frame[at..at + 7].copy_from_slice(b"../evil");
    control.send_raw(&frame).await.unwrap();
    reasons.push(("a path with ..", evil.closed(LIMIT).await.unwrap(), "malformed"));

    // 4. Messages out of order: a commit from the source.
    let evil = scene.connect().await;
    let mut control = evil.open().await.unwrap();
    control.send(&hello("zimbra")).await.unwrap();
    let _welcome = control.next(LIMIT).await.unwrap();
    let committed = Committed {
        round: ferry_proto::RoundRef { round: u64::MAX, root: RootHash::from_bytes([1; 32]) },
        files_written: u64::MAX,
        failures: vec![],
        failure_count: u64::MAX,
    };
    control.send(&Message::Committed(committed)).await.unwrap();
    reasons.push(("a Committed from the source", evil.closed(LIMIT).await.unwrap(), "Committed"));

    // 5. Absurd sizes (CVE-2024-12084 class): a file of 16 EiB in one 4 GiB chunk.
    let evil = scene.connect().await;
    let mut huge = file("mail/huge", b"");
    huge.size = u64::MAX;
    huge.chunks = vec![ChunkRef { hash: ChunkHash::from_bytes([3; 32]), len: u32::MAX }];
    let _control = open_round(&evil, "zimbra", vec![change(huge)], u64::MAX).await;
    reasons.push(("a 16 EiB file", evil.closed(LIMIT).await.unwrap(), ""));

    // 6. Chunks nobody asked for, 80 MiB of them, valid and hashed.
    let evil = scene.connect().await;
    let data = random_bytes(300_000, 2);
    let mut control = open_round(&evil, "zimbra", vec![change(file("mail/2", &data))], 1).await;
    let _need = control.next(LIMIT).await.unwrap();
    let mut stream = evil.open_data().await.unwrap();
    let started = Instant::now();
    for i in 0..20u64 {
        let payload = random_bytes(4 << 20, 100 + i);
        // Each answers a need never sent.
        let batch = ChunkBatch::new(Codec::Raw, [(1000 + i, payload.len() as u32)], Bytes::from(payload));
        let mut frame = bytes::BytesMut::new();
        ferry_proto::encode(&Message::ChunkBatch(batch), &mut frame).unwrap();
        if stream.write_all(&frame).await.is_err() {
            break; // cut off
        }
    }
    let reason = evil.closed(LIMIT).await.unwrap();
    reasons.push(("80 MiB of chunks not asked for", reason, "did not ask for"));
    assert!(started.elapsed() < LIMIT);

    // 7. A large file's chunks listed as it is cut, the second lot not where the first ended.
    let evil = scene.connect().await;
    let mut control = evil.open().await.unwrap();
    control.send(&hello("zimbra")).await.unwrap();
    let _welcome = control.next(LIMIT).await.unwrap();
    let chunks = vec![ChunkRef { hash: ChunkHash::of(&data), len: data.len() as u32 }];
    let path = RelPath::new("mail/large").unwrap();
    for offset in [0, 5] {
        let prefix =
            ferry_engine::FilePrefix { place: 1, path: path.clone(), offset, chunks: chunks.clone(), size: 600_000 };
        control.send(&Message::Prefix(prefix)).await.unwrap();
    }
    reasons.push(("prefixes that do not follow", evil.closed(LIMIT).await.unwrap(), "ended at 300000"));

    // 8. Silence: after Hello (changes expected), then after the needs (chunks expected). The
    // daemon's own 3 s deadline ends each, whatever the peer does.
    let evil = scene.connect().await;
    let mut control = evil.open().await.unwrap();
    control.send(&hello("zimbra")).await.unwrap();
    let _welcome = control.next(LIMIT).await.unwrap();
    let started = Instant::now();
    reasons.push(("silence after Hello", evil.closed(LIMIT).await.unwrap(), "sent nothing for 3 s"));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let evil = scene.connect().await;
    let mut control = open_round(&evil, "zimbra", vec![change(file("mail/3", &data))], 1).await;
    let _need = control.next(LIMIT).await.unwrap();
    let started = Instant::now();
    reasons.push(("silence instead of chunks", evil.closed(LIMIT).await.unwrap(), "no chunk arrived for 3 s"));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    for (what, reason, expected) in &reasons {
        println!("{what}: {reason}");
        assert!(reason.contains(expected), "{what}: the daemon closed with {reason:?}");
        assert!(!reason.is_empty() && !reason.contains("panick"), "{what}: {reason:?}");
    }
    assert!(scene.alive(), "the daemon died");
    assert_eq!(sentinel(&outside), before, "something outside the target changed");
    assert!(!target.join("mail/huge").exists() && !scene.setup.path("evil").exists());

    // The daemon serves the real source, and the job is not held by any of the above.
    let report = scene.setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &target, |_| false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_destination_cannot_make_the_source_read_outside_its_tree() {
    let dir = tempfile::tempdir().unwrap();
    let source_node = Node::init(dir.path(), "source-node");
    let evil_identity = Identity::generate().unwrap();
    let evil = EvilDestination::listen(&evil_identity, source_node.id.parse().unwrap()).unwrap();
    let addr = evil.addr().unwrap().to_string();
    source_node.ok(&["trust", &evil_identity.node_id().to_string(), "--name", "evil", "--addr", &addr]);
    let tree = dir.path().join("export");
    let data = random_bytes(200_000, 5);
    write(&tree.join("mail/1"), &data);
    let secret = b"a secret outside the exported tree".to_vec();
    write(&dir.path().join("secret"), &secret);
    std::os::unix::fs::symlink(dir.path().join("secret"), tree.join("mail/link")).unwrap();
    source_node.ok(&["job", "add", "zimbra", "--path", tree.to_str().unwrap(), "--peer", "evil"]);

    // A fair need is answered; then an absurd commit: the source reports it without trusting it into
    // a panic.
    let (mut sync, connection, mut control, changes) = evil_round(&evil, &source_node).await;
    // No round is held: the changes are the whole manifest, a place an index into them.
    let place = |path: &str| changes.iter().position(|c| c.path.to_string() == path).unwrap() as u64;
    let file = changes[place("mail/1") as usize].entry.as_ref().unwrap();
    let fair = ChunkAt { place: place("mail/1"), offset: 0, len: file.chunks[0].len };
    control.send(&Message::Need(vec![fair])).await.unwrap();
    let mut data_stream = tokio::time::timeout(LIMIT, connection.accept_uni()).await.unwrap().unwrap();
    let sent = read_for(&mut data_stream, Duration::from_secs(2)).await;
    let first = &data[..file.chunks[0].len as usize];
    assert!(sent.windows(first.len()).any(|w| w == first), "the fair chunk did not come ({} bytes)", sent.len());
    let committed = Committed {
        round: ferry_proto::RoundRef { round: u64::MAX, root: RootHash::from_bytes([1; 32]) },
        files_written: u64::MAX,
        failures: vec!["x".repeat(10_000)],
        failure_count: u64::MAX,
    };
    control.send(&Message::Committed(committed)).await.unwrap();
    let _ = control.send.finish();
    let (status, stderr) = wait_for_exit(&mut sync).await;
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status, Some(ferry::exit::INCOMPLETE), "{stderr}");

    // A need names a chunk of the round's manifest: anything else ends the round as a protocol
    // violation, and nothing is read for it.
    for (what, hostile) in [
        // Through a symlink to a file outside.
        ("a symlink", ChunkAt { place: place("mail/link"), offset: 0, len: secret.len() as u32 }),
        // 4 GiB at once.
        ("4 GiB", ChunkAt { place: place("mail/1"), offset: 0, len: u32::MAX }),
        // Past the end of the file.
        ("past the end", ChunkAt { place: place("mail/1"), offset: u64::MAX - 10, len: 100 }),
        // An entry the round does not have.
        ("no such entry", ChunkAt { place: changes.len() as u64, offset: 0, len: 10 }),
        // A folder.
        ("a folder", ChunkAt { place: place("mail"), offset: 0, len: 10 }),
    ] {
        let (mut sync, connection, mut control, _) = evil_round(&evil, &source_node).await;
        control.send(&Message::Need(vec![hostile])).await.unwrap();
        match connection.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, Refusal::ProtocolViolation.code().into(), "{what}: {close:?}");
            }
            other => panic!("{what}: the source closed with {other:?}"),
        }
        let (status, stderr) = wait_for_exit(&mut sync).await;
        assert!(stderr.contains("no chunk of this round") && !stderr.contains("panicked"), "{what}: {stderr}");
        assert_eq!(status, Some(ferry::exit::ERROR), "{what}: {stderr}");
        let _ = control.next(LIMIT).await;
        // The source's data streams (opened when its transfer began) carried nothing.
        while let Ok(mut stream) = connection.accept_uni().await {
            let sent = read_for(&mut stream, Duration::from_secs(1)).await;
            assert!(sent.is_empty(), "{what}: {} bytes were sent", sent.len());
        }
    }
}

/// Takes a round of `source_node`'s `ferry sync --round zimbra` to its need lists: the check, the
/// round's connection, Hello, Welcome and the changes (returned).
async fn evil_round(
    evil: &EvilDestination,
    source_node: &Node,
) -> (std::process::Child, quinn::Connection, EvilStream, Vec<Change>) {
    let sync = source_node
        .ferry()
        .args(["sync", "--round", "zimbra", "--json", "--reconnect-grace", "0s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The source asks first, on a connection of its own, whether a round would be taken.
    let (_check, mut control) = evil.accept(LIMIT).await.unwrap();
    assert!(matches!(control.next(LIMIT).await.unwrap(), Some(Message::Check { job, .. }) if job == "zimbra"));
    control.send(&Message::Welcome { holds: None }).await.unwrap();
    let (connection, mut control) = evil.accept(LIMIT).await.unwrap();
    // The source opens with Hello and its round options, then waits for Welcome.
    assert!(matches!(control.next(LIMIT).await.unwrap(), Some(Message::Hello(_))));
    assert!(matches!(control.next(LIMIT).await.unwrap(), Some(Message::RoundOptions(_))));
    control.send(&Message::Welcome { holds: None }).await.unwrap();
    let mut changes = Vec::new();
    loop {
        match control.next(LIMIT).await.unwrap() {
            Some(Message::Changes(batch)) => changes.extend(batch),
            Some(Message::ChangesEnd(_)) => break,
            // The list streams while the source scans, which it says while the list waits.
            Some(Message::Scanning) => {}
            other => panic!("expected changes, got {other:?}"),
        }
    }
    (sync, connection, control, changes)
}

/// What `stream` brings within `within`.
async fn read_for(stream: &mut quinn::RecvStream, within: Duration) -> Vec<u8> {
    let mut sent = Vec::new();
    let until = Instant::now() + within;
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(until.into(), stream.read_chunk(1 << 20, true)).await {
        sent.extend_from_slice(&chunk.bytes);
    }
    sent
}

/// `sync`'s exit code and stderr, once it ends (within [`LIMIT`]).
async fn wait_for_exit(sync: &mut std::process::Child) -> (Option<i32>, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = sync.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < LIMIT, "sync did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(sync.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

fn folder(path: &str) -> Entry {
    Entry { kind: EntryKind::Dir, mode: 0o755, size: 0, chunks: vec![], ..file(path, b"") }
}

/// A file of `chunks` chunks of 64 KiB of random bytes: its entry and its chunks.
fn large_file(path: &str, chunks: usize, seed: u64) -> (Entry, Vec<Vec<u8>>) {
    let data: Vec<Vec<u8>> = (0..chunks).map(|i| random_bytes(64 << 10, seed + i as u64)).collect();
    let mut entry = file(path, b"");
    entry.size = (chunks as u64) << 16;
    entry.chunks = data.iter().map(|d| ChunkRef { hash: ChunkHash::of(d), len: d.len() as u32 }).collect();
    (entry, data)
}

/// Sends `chunks` on a new data stream, 16 to a batch, as the answers to the first needs (chunk i
/// answers need i: the tests ask for a file's chunks in order).
async fn send_chunks(evil: &EvilSource, chunks: &[Vec<u8>]) {
    let mut stream = evil.open_data().await.unwrap();
    for (i, part) in chunks.chunks(16).enumerate() {
        let first = (i * 16) as u64;
        let numbered = (first..).zip(part.iter().map(|d| d.len() as u32));
        let batch = ChunkBatch::new(Codec::Raw, numbered, Bytes::from(part.concat()));
        let mut frame = bytes::BytesMut::new();
        ferry_proto::encode(&Message::ChunkBatch(batch), &mut frame).unwrap();
        stream.write_all(&frame).await.unwrap();
    }
    let _ = stream.finish();
}

/// The needs of a round, until `count` chunks were asked for.
async fn needs(control: &mut EvilStream, count: usize) -> Vec<ChunkAt> {
    let mut all = Vec::new();
    while all.len() < count {
        match control.next(LIMIT).await.unwrap() {
            Some(Message::Need(part)) => all.extend(part),
            // How far the destination planned, for the source's streamed list; what its check found.
            Some(Message::Passed(_) | Message::Checked(_)) => {}
            other => panic!("expected Need, got {other:?}"),
        }
    }
    all
}

// A large file is written as its chunks arrive, the applier waiting for each: a source that then
// says it cannot send the rest, or falls silent, must end that wait at once (Missing) or at the stall
// deadline, never leave a partial file at the final path, and leave the job to the next round.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_file_whose_chunks_stop_coming_ends_cleanly() {
    let (mut scene, source, target) = Scene::with_job("3s");

    // Half the chunks, then `Missing` for the rest: the round commits without the file.
    let (entry, data) = large_file("mail/large", 192, 1000);
    let evil = scene.connect().await;
    let mut control = open_round(&evil, "zimbra", vec![change(folder("mail")), change(entry)], 2).await;
    let asked = needs(&mut control, data.len()).await;
    assert_eq!(asked.len(), data.len());
    send_chunks(&evil, &data[..96]).await;
    // Asked in order: the need for chunk i is for data[i].
    assert!(asked.windows(2).all(|w| w[0].offset < w[1].offset), "needs out of order");
    control.send(&Message::Missing((96..data.len() as u64).collect())).await.unwrap();
    let started = Instant::now();
    let committed = loop {
        match control.next(LIMIT).await.unwrap() {
            Some(Message::Done | Message::Passed(_) | Message::Checked(_)) => {}
            Some(Message::Committed(committed)) => break committed,
            other => panic!("expected Committed, got {other:?}"),
        }
    };
    assert_eq!(committed.failure_count, 1, "{:?}", committed.failures);
    assert!(committed.failures[0].contains("mail/large"), "{:?}", committed.failures);
    // Before the 3 s stall deadline: the wait ended on `Missing`, not on silence.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert!(!target.join("mail/large").exists(), "a partial file is at the final path");
    drop(control);
    let _ = evil.closed(LIMIT).await;

    // Half the chunks, then silence: the daemon's deadline ends the round.
    let (entry, data) = large_file("mail/large", 192, 2000);
    let evil = scene.connect().await;
    let mut control = open_round(&evil, "zimbra", vec![change(folder("mail")), change(entry)], 2).await;
    let _asked = needs(&mut control, data.len()).await;
    let written = |pid: u32| crate::util::io_counter(pid, "wchar");
    let pid = scene.setup.daemon.child.id();
    let before = written(pid);
    send_chunks(&evil, &data[..96]).await;
    let started = Instant::now();
    // The half that came is written into the file while the rest is awaited (not held back until
    // the file is complete): the daemon's write calls grow by at least that much.
    match before {
        Some(before) => {
            while written(pid).unwrap_or(0) < before + (96 << 16) {
                assert!(started.elapsed() < Duration::from_secs(3), "the arrived half was not written while waiting");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        None => eprintln!("SKIPPED (one check): /proc/{pid}/io is not readable here"),
    }
    let reason = evil.closed(LIMIT).await.unwrap();
    assert!(reason.contains("no chunk arrived for 3 s"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(!target.join("mail/large").exists(), "a partial file is at the final path");

    assert!(scene.alive(), "the daemon died");
    let report = scene.setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &target, |_| false);
}

/// A node of the previous protocol version, either side: refused at once, in words that name both
/// versions, never a round of messages it would misread.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_of_an_older_version_is_refused_with_both_versions_named() {
    let scene = Scene::new("3s");
    let current = std::str::from_utf8(ferry_proto::ALPN).unwrap();
    let addr = scene.setup.daemon.addr.parse().unwrap();
    let old = EvilSource::connect_speaking(&scene.identity, scene.daemon_id, addr, b"ferry/2").await.unwrap();
    let mut control = old.open().await.unwrap();
    control.send(&Message::Check { job: "zimbra".into(), source: 1 }).await.unwrap();
    match control.next(LIMIT).await.unwrap() {
        Some(Message::Refused { refusal: Refusal::ProtocolViolation, reason }) => {
            assert!(reason.contains("ferry/2") && reason.contains(current), "{reason}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    // A source of this version before a destination of the older one.
    let dir = tempfile::tempdir().unwrap();
    let source_node = Node::init(dir.path(), "source-node");
    let old_identity = Identity::generate().unwrap();
    let old = EvilDestination::listen_speaking(&old_identity, source_node.id.parse().unwrap(), b"ferry/2").unwrap();
    let addr = old.addr().unwrap().to_string();
    source_node.ok(&["trust", &old_identity.node_id().to_string(), "--name", "old", "--addr", &addr]);
    std::fs::create_dir_all(dir.path().join("export")).unwrap();
    source_node.ok(&["job", "add", "zimbra", "--path", dir.path().join("export").to_str().unwrap(), "--peer", "old"]);
    let accepting = tokio::spawn(async move {
        let _ = old.accept(LIMIT).await;
    });
    let out = tokio::task::spawn_blocking(move || source_node.run(&["sync", "--round", "zimbra"])).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED), "{stderr}");
    assert!(stderr.contains(&format!("speaks ferry/2 and this node {current}")), "{stderr}");
    accepting.abort();
}
