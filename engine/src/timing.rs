//! Timing helpers: splitting a loop's time by part, and durations in reports.

/// The time since `clock`, which moves to now: splits a loop's time by part, one reading per part.
pub fn lap(clock: &mut std::time::Instant) -> std::time::Duration {
    let now = std::time::Instant::now();
    now.saturating_duration_since(std::mem::replace(clock, now))
}

/// Durations go to JSON as whole milliseconds.
pub(crate) fn serialize_millis<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}
