//! Exit codes, stable and documented in README.md (an error becomes one in [`crate::outcome`]).

/// The round completed and the target matches the source.
pub const OK: i32 = 0;
/// An error stopped the command (message on stderr).
pub const ERROR: i32 = 1;
/// The command line was wrong.
pub const USAGE: i32 = 2;
/// The round ran to its end, but some entries could not be applied (listed on stderr); rerun after
/// fixing what the messages say.
pub const INCOMPLETE: i32 = 3;
/// The round was committed, but the destination's import failed (its output's tail is printed).
pub const IMPORT_FAILED: i32 = 4;
/// `ferry verify` found differences between the target and its last committed round.
pub const DIFFERENCES: i32 = 5;
/// `--max-duration` ran out: the round stopped cleanly; the files that arrived whole are kept, and the next round
/// goes on from there.
pub const DEADLINE: i32 = 6;
/// The peer could not be reached (or was lost and did not come back within `--reconnect-grace`).
pub const UNREACHABLE: i32 = 7;
/// The peer refused the round: it does not trust this node, the job is not this node's, it is busy
/// with the job, or the target lacks space.
pub const REFUSED: i32 = 8;

/// SIGTERM or SIGINT stopped the round cleanly, as a deadline would: the files that arrived whole are
/// kept, and the next round goes on from there.
pub const STOPPED: i32 = 9;

/// Every code, by name, in order (README.md's table is checked against it).
pub const ALL: [(&str, i32); 10] = [
    ("OK", OK),
    ("ERROR", ERROR),
    ("USAGE", USAGE),
    ("INCOMPLETE", INCOMPLETE),
    ("IMPORT_FAILED", IMPORT_FAILED),
    ("DIFFERENCES", DIFFERENCES),
    ("DEADLINE", DEADLINE),
    ("UNREACHABLE", UNREACHABLE),
    ("REFUSED", REFUSED),
    ("STOPPED", STOPPED),
];

/// What each code means, in README's words (a test holds the two to the same text); the man pages'
/// EXIT STATUS is made from it.
pub fn meaning(code: i32) -> &'static str {
    match code {
        OK => {
            "the command did what it was asked; for a round: it completed, the target (as its check found it and the round left it) matches the source, the import (if any) succeeded"
        }
        ERROR => {
            "a local error stopped the command (the message says what and where: a full disk, a failed export hook, a bad `ferry.toml` line, ...)"
        }
        USAGE => "the command line is wrong",
        INCOMPLETE => {
            "the round ran to its end, but the target does not match the source: some entries could not be applied (listed on stderr; e.g. a path where the target holds something ferry did not put there, left alone unless adopted), or the source holds entries ferry does not carry (a FIFO: `--skip-special`), or files changed while it read them; rerun once fixed"
        }
        IMPORT_FAILED => {
            "the round was committed, but the destination's import failed (the tail of its output is printed)"
        }
        DIFFERENCES => "`ferry verify` found differences between the target and its last committed round (listed)",
        DEADLINE => {
            "`--max-duration` ran out: the round stopped cleanly, what arrived is kept (whole files in place, the arrived part of a file of 8 MiB or more in progress); run it again to go on"
        }
        UNREACHABLE => {
            "the peer could not be reached (no answer within 10 s), or was lost and did not come back within `--reconnect-grace`"
        }
        REFUSED => {
            "the peer refused the round: it does not trust this node (or is not the pinned node), the job is not this node's, the job is busy (a round or an import), or the target lacks space"
        }
        STOPPED => {
            "SIGTERM or SIGINT (Ctrl-C, `systemctl stop`) stopped the round cleanly, as a deadline would: the batches on the wire finish, the files that arrived whole are kept, the round is recorded as stopped; run it again to go on (a second signal stops at once)"
        }
        _ => "",
    }
}
