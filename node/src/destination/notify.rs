//! What the daemon tells systemd (`Type=notify`): `READY=1` once its port is bound, a `STATUS=` line
//! with what runs now (each round's bytes received and rate, each import), `STOPPING=1` at the end.
//! `systemctl status ferry` shows the status line.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use sd_notify::NotifyState;

/// How often the status line is looked at again while the daemon runs.
pub(super) const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Tells systemd how the daemon is (nothing when it was not started by systemd with `NOTIFY_SOCKET`).
pub(super) fn tell_systemd(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot tell systemd how the daemon is ({e}); with Type=notify it waits for READY");
    }
}

/// A round running now: its job and the bytes its connection has received so far.
pub(super) struct Running {
    pub(super) job: String,
    pub(super) received: u64,
}

/// An import running now.
pub(super) struct Importing {
    pub(super) job: String,
    pub(super) round: u64,
    pub(super) since: SystemTime,
}

/// The status line, followed from one look to the next (a round's rate is what it received between
/// two looks).
pub(super) struct StatusLine {
    listening: String,
    said: String,
    received: HashMap<String, (u64, Instant)>,
}

impl StatusLine {
    pub(super) fn new(listening: String) -> Self {
        Self { said: listening.clone(), listening, received: HashMap::new() }
    }

    /// The line for what runs now, or `None` when it is the line said last.
    pub(super) fn update(&mut self, rounds: &[Running], imports: &[Importing], now: Instant) -> Option<String> {
        let mut parts = Vec::new();
        for round in rounds {
            let rate = self.received.get(&round.job).and_then(|&(before, then)| {
                let secs = now.saturating_duration_since(then).as_secs_f64();
                (secs > 0.0).then(|| (round.received.saturating_sub(before) as f64 / secs) as u64)
            });
            parts.push(match rate {
                Some(rate) => format!(
                    "round of {}: {} received, {}/s",
                    round.job,
                    crate::human::bytes(round.received),
                    crate::human::bytes(rate)
                ),
                None => format!("round of {}: {} received", round.job, crate::human::bytes(round.received)),
            });
        }
        self.received = rounds.iter().map(|r| (r.job.clone(), (r.received, now))).collect();
        for import in imports {
            parts.push(format!(
                "import of round {} of {} running since {}",
                import.round,
                import.job,
                humantime::format_rfc3339_seconds(import.since)
            ));
        }
        let line = if parts.is_empty() {
            format!("idle, {}", self.listening)
        } else {
            format!("{}; {}", parts.join("; "), self.listening)
        };
        (line != self.said).then(|| {
            self.said.clone_from(&line);
            line
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_says_each_round_with_its_rate_and_each_import_and_only_when_it_changes() {
        let mut status = StatusLine::new("listening on [::]:7373 as node x".into());
        let start = Instant::now();
        assert_eq!(status.update(&[], &[], start).as_deref(), Some("idle, listening on [::]:7373 as node x"));
        assert_eq!(status.update(&[], &[], start), None, "said twice");
        let running = |received| [Running { job: "zimbra".into(), received }];
        assert_eq!(
            status.update(&running(1 << 20), &[], start).as_deref(),
            Some("round of zimbra: 1.0 MiB received; listening on [::]:7373 as node x")
        );
        assert_eq!(
            status.update(&running(5 << 20), &[], start + Duration::from_secs(2)).as_deref(),
            Some("round of zimbra: 5.0 MiB received, 2.0 MiB/s; listening on [::]:7373 as node x")
        );
        let import = [Importing { job: "zimbra".into(), round: 3, since: SystemTime::UNIX_EPOCH }];
        assert_eq!(
            status.update(&[], &import, start + Duration::from_secs(4)).as_deref(),
            Some("import of round 3 of zimbra running since 1970-01-01T00:00:00Z; listening on [::]:7373 as node x")
        );
    }
}
