//! The messages. Postcard encodes variants by index: append only, never reorder.

use bytes::Bytes;
use ferry_engine::{ChunkHash, Entry, FilePrefix, RelPath, RootHash};
use serde::{Deserialize, Serialize};

use crate::refusal::Refusal;

/// The protocol name and version, negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"ferry/7";
/// The version inside [`ALPN`], also sent in [`Hello`] for messages.
pub const PROTOCOL_VERSION: u32 = 7;
/// Earlier versions, offered in the handshake only to refuse a peer that speaks one of them with words
/// that name both versions (its `Refused` is encoded as it is here).
pub const OLDER_ALPNS: &[&[u8]] = &[b"ferry/6", b"ferry/5", b"ferry/4", b"ferry/3", b"ferry/2"];

/// A committed round: its number and the root hash of its manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRef {
    /// Rounds count from 1.
    pub round: u64,
    /// The manifest's root hash.
    pub root: RootHash,
}

/// source → destination: which job, and which round the source can send changes against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The job's name (the destination decides where it goes).
    pub job: String,
    /// The last round the source saw committed, whose manifest it kept.
    pub base: Option<RoundRef>,
    /// Remove what the source removed (only what ferry wrote).
    pub delete: bool,
    /// Keep numeric owners instead of mapping names.
    pub numeric_ids: bool,
    /// Which source this is: a number its data folder keeps for the job. A round from the same peer
    /// and source replaces one still open (the source reconnecting, or started again after it died);
    /// from another source of the same peer (a second data folder, a copy of the node's identity),
    /// it is refused while the open one is alive.
    pub source: u64,
}

/// One path that changed: its new entry, or `None` when the source no longer has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The path.
    pub path: RelPath,
    /// The new entry. When `content_as_before`, its size is 0 and its chunk list empty, and the
    /// destination keeps the ones it has (a file whose content did not change costs neither on the
    /// wire).
    pub entry: Option<Entry>,
    /// See `entry`.
    pub content_as_before: bool,
    /// Where the path is in the manifest of the round the list is a delta against
    /// ([`ChangesEnd::base`], which the destination holds): then the path travels as that place and
    /// the destination reads it from its own copy of that manifest. A change unpacked with a place has
    /// the root as its path (and its entry's) until the destination puts the path there.
    pub base: Option<u64>,
}

/// source → destination: all changes are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangesEnd {
    /// What the changes are relative to (`None`: an empty tree).
    pub base: Option<RoundRef>,
    /// The new manifest's root hash.
    pub root: RootHash,
    /// How many entries it has.
    pub entries: u64,
}

/// One chunk the destination lacks, and where the source will find it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeedChunk {
    /// The file in the new manifest.
    pub path: RelPath,
    /// The file's place in the new manifest (its first entry is 0).
    pub place: u64,
    /// Where in it.
    pub offset: u64,
    /// How long.
    pub len: u32,
    /// What it must hash to.
    pub hash: ChunkHash,
}

impl NeedChunk {
    /// The need as it travels: the source has the path and the hash in its manifest.
    pub fn at(&self) -> ChunkAt {
        ChunkAt { place: self.place, offset: self.offset, len: self.len }
    }
}

/// A chunk of the round's new manifest, by where it is: the file at `place` in the manifest (both
/// sides hold it: the source wrote it, the destination merged it from the changes), and the chunk
/// that starts at `offset` in it, `len` bytes long. What [`Message::Need`] names: the source reads
/// the path and the chunk's hash from its manifest, so a need carries neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAt {
    /// The file's place in the new manifest (its first entry is 0).
    pub place: u64,
    /// Where its chunk starts in it.
    pub offset: u64,
    /// How long the chunk is.
    pub len: u32,
}

/// How a chunk batch's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// As is (already compressed data, such as gzip BLOBs).
    Raw,
    /// One zstd frame.
    Zstd,
}

/// source → destination, on a data stream: chunks, concatenated in `payload`, each named by the need
/// it answers: needs count from 0 on a connection, in the order the destination sent them, so the
/// destination knows each chunk's hash (and checks it) without the batch carrying it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkBatch {
    /// How `payload` is encoded.
    pub codec: Codec,
    /// The chunks in order: which need each answers, as how many needs it skips after the previous
    /// chunk's (wrapping; the first chunk's is its need's number), and its length. The decoded payload
    /// is exactly their concatenation. See [`ChunkBatch::numbered`].
    pub chunks: Vec<(u64, u32)>,
    /// The encoded bytes.
    pub payload: Bytes,
}

/// An item for a control stream, as a round machine yields it.
#[derive(Debug, PartialEq)]
pub enum Transmit {
    /// Send this message.
    Message(Message),
    /// Nothing more will be sent: finish the stream.
    Finish,
}

impl ChunkBatch {
    /// A batch of chunks given as (the number of the need each answers, its length).
    pub fn new(codec: Codec, numbered: impl IntoIterator<Item = (u64, u32)>, payload: Bytes) -> Self {
        let mut previous = u64::MAX;
        let chunks = numbered
            .into_iter()
            .map(|(need, len)| {
                let skip = need.wrapping_sub(previous.wrapping_add(1));
                previous = need;
                (skip, len)
            })
            .collect();
        Self { codec, chunks, payload }
    }

    /// The chunks as (the number of the need each answers, its length).
    pub fn numbered(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let mut previous = u64::MAX;
        self.chunks.iter().map(move |&(skip, len)| {
            previous = previous.wrapping_add(1).wrapping_add(skip);
            (previous, len)
        })
    }

    /// The decoded size the chunk list declares (saturating: a hostile list cannot overflow it).
    pub fn declared_len(&self) -> u64 {
        self.chunks.iter().fold(0u64, |sum, (_, len)| sum.saturating_add(u64::from(*len)))
    }
}

/// destination → source: the round is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Committed {
    /// The round now held.
    pub round: RoundRef,
    /// Files written.
    pub files_written: u64,
    /// Entries that could not be applied, with why (a sample).
    pub failures: Vec<String>,
    /// How many failed.
    pub failure_count: u64,
}

/// destination → source: what its check of the target found this round (DESIGN.md, "The target
/// check"), for the round's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    /// Entries checked.
    pub entries: u64,
    /// Found missing.
    pub missing: u64,
    /// Found changed since ferry put them there.
    pub changed: u64,
    /// Found replaced by someone else's.
    pub foreign: u64,
    /// Folders whose mode or mtime moved.
    pub folders: u64,
    /// How long the check took.
    pub duration_ms: u64,
}

/// Everything that travels. Variant order is the wire format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Opens a round.
    Hello(Hello),
    /// The destination accepts; `holds` is its last committed round.
    Welcome {
        /// The destination's last committed round for this job.
        holds: Option<RoundRef>,
    },
    /// The destination refuses (unknown job, not this peer's job, busy, no room).
    Refused {
        /// Why, as a code both sides know.
        refusal: Refusal,
        /// The details, for the operator.
        reason: String,
    },
    /// A batch of changes, sorted.
    Changes(Vec<Change>),
    /// The last batch of changes was sent.
    ChangesEnd(ChangesEnd),
    /// Chunks to send now.
    Need(Vec<ChunkAt>),
    /// Chunk data.
    ChunkBatch(ChunkBatch),
    /// The needs (by number, see [`ChunkBatch`]) whose chunks the source could not read (changed
    /// since the scan).
    Missing(Vec<u64>),
    /// Everything needed has arrived.
    Done,
    /// The round is committed.
    Committed(Committed),
    /// The round failed on the other side.
    Failed {
        /// Why, for the operator.
        reason: String,
    },
    /// source → destination, right after `Hello`: what to do once the round is committed.
    RoundOptions(RoundOptions),
    /// Something the operator should know (e.g. an import interrupted by a restart).
    Notice {
        /// The text.
        text: String,
    },
    /// The destination started the import of a committed round.
    ImportStarted {
        /// The round.
        round: u64,
        /// The command, as run.
        command: Vec<String>,
    },
    /// The import finished.
    ImportDone(ImportResult),
    /// source → destination: stop now (the source's deadline, `--max-duration`). The destination keeps
    /// what arrived, applies it without committing, and closes the connection.
    Stop {
        /// Why, for the logs.
        reason: String,
        /// How many chunk batches the source sent in all: the destination waits for them first.
        batches: u64,
    },
    /// source → destination, right after `Hello`: plan the round, write nothing (`--dry-run`).
    DryRun,
    /// destination → source, ending a dry run: what the round would do.
    Planned(Plan),
    /// source → destination, alone on a connection of its own, before the source runs its export hook
    /// and scans: would a round of `job` from this node be accepted now? The answer is `Welcome` or
    /// `Refused`, as for `Hello`, and no round is opened.
    Check {
        /// The job's name.
        job: String,
        /// Which source asks: [`Hello::source`].
        source: u64,
    },
    /// source → destination, every second while its bandwidth limit pauses it (a timetable's `0`),
    /// between messages of the list of changes or during the transfer: nothing comes for now, and the
    /// round is not stalled. The destination counts it as progress.
    Paused,
    /// source → destination, every second while the list of changes waits for the scan (reading and
    /// hashing a large file, or a stretch of the tree with no change): the round is not stalled.
    Scanning,
    /// destination → source: every entry before this place in the new manifest is planned (its
    /// chunks, if any, asked for). The list of changes streams while the source scans; the source
    /// keeps it at most a bounded window ahead of this, so that what it read is still in memory when
    /// it is asked for, and no more than that waits here.
    Passed(u64),
    /// destination → source, once its check of the target is done (before `Committed`).
    Checked(Checked),
    /// source → destination, among the changes: the next chunks of a large file the source is
    /// still reading, whose change will follow (a file that changes while it is read has none).
    /// The destination may ask for them, by the place given, and build them into the file's
    /// partial file, where its change finds them. Since version 7.
    Prefix(FilePrefix),
    /// destination → source: it planned the prefix of the file at this place that came last (its
    /// chunks, if any, asked for before this). The source keeps what it lists at most a bounded
    /// window ahead of this too. Since version 7.
    PrefixPlanned(u64),
}

/// What a round would do on the destination, without doing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Files that would be written.
    pub files: u64,
    /// Chunk bytes the destination lacks (all of them were asked for in `Need`).
    pub need_bytes: u64,
    /// Bytes the new files take on the destination's disk while the round runs.
    pub space_needed: u64,
    /// Bytes free for the target.
    pub space_available: u64,
}

/// Which import to run after the round is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImportMode {
    /// The full import when the destination has one configured, else none.
    Default,
    /// The full import (e.g. `zxsuite backup doExternalRestore {target}`).
    Full,
    /// The provisioning-only import (domains, classes of service, accounts).
    ProvisioningOnly,
    /// No import.
    None,
}

/// Options of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundOptions {
    /// Which import.
    pub import: ImportMode,
}

/// How an import ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportResult {
    /// The round imported.
    pub round: u64,
    /// It exited with status 0.
    pub success: bool,
    /// Its exit code, if it exited (not killed by a signal or the timeout).
    pub exit_code: Option<i32>,
    /// The last lines of its output.
    pub tail: Vec<String>,
    /// How long it ran.
    pub duration_ms: u64,
}

impl ferry_engine::Keyed for Change {
    fn key(&self) -> &RelPath {
        &self.path
    }
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
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
            Message::Scanning => "Scanning",
            Message::Passed(_) => "Passed",
            Message::Checked(_) => "Checked",
            Message::Prefix(_) => "Prefix",
            Message::PrefixPlanned(_) => "PrefixPlanned",
        }
    }
}
