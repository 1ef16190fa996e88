//! Bandwidth limits at run time: a token bucket shared by the streams of a connection, following a
//! timetable (in local time) that a reload may replace.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use ferry_engine::{Rate, Timetable, TokenBucket};

/// The rate a timetable gives for now, in local time.
pub(crate) fn rate_now(timetable: &Timetable) -> Rate {
    let now = jiff::ZonedDateTime::now();
    timetable.rate_at_time(now.weekday().to_monday_zero_offset() as u32, now.hour() as u32, now.minute() as u32)
}

/// Seconds since Monday 00:00:00, local time.
pub(crate) fn second_of_week_now() -> u64 {
    let now = jiff::ZonedDateTime::now();
    let day = now.weekday().to_monday_zero_offset() as u64;
    ((day * 24 + now.hour() as u64) * 60 + now.minute() as u64) * 60 + now.second() as u64
}

/// How long until the local clock's next minute starts.
fn until_next_minute() -> Duration {
    let now = jiff::ZonedDateTime::now();
    let into_minute = Duration::from_secs(now.second() as u64) + Duration::from_nanos(now.subsec_nanosecond() as u64);
    Duration::from_secs(60).saturating_sub(into_minute)
}

/// A rate for people.
pub(crate) fn describe_rate(rate: Rate) -> String {
    match rate.bytes_per_second() {
        None => "off (unlimited)".to_owned(),
        Some(0) => "0 (paused)".to_owned(),
        Some(bps) => format!("{}/s", crate::human::bytes(bps)),
    }
}

/// A token bucket following a timetable, shared by the tasks of one round.
#[derive(Clone)]
pub(crate) struct Limiter {
    bucket: Arc<Mutex<TokenBucket>>,
    timetable: Arc<Mutex<Timetable>>,
}

impl Limiter {
    /// A limiter at the timetable's rate for now.
    pub(crate) fn new(timetable: Timetable) -> Self {
        let bucket = TokenBucket::new(rate_now(&timetable), Instant::now());
        Self { bucket: Arc::new(Mutex::new(bucket)), timetable: Arc::new(Mutex::new(timetable)) }
    }

    /// Replaces the timetable (a reload) and applies its rate at once.
    pub(crate) fn set_timetable(&self, timetable: Timetable) {
        if let Ok(mut current) = self.timetable.lock() {
            *current = timetable;
        }
        self.refresh();
    }

    /// Applies the timetable's rate for now; returns it when it changed.
    pub(crate) fn refresh(&self) -> Option<Rate> {
        let rate = rate_now(&*self.timetable.lock().ok()?);
        let mut bucket = self.bucket.lock().ok()?;
        if bucket.rate() == rate {
            return None;
        }
        bucket.set_rate(rate, Instant::now());
        Some(rate)
    }

    /// The rate in force.
    pub(crate) fn rate(&self) -> Rate {
        self.bucket.lock().map(|b| b.rate()).unwrap_or(Rate::UNLIMITED)
    }

    /// Whether the rate is 0 (a timetable's pause): nothing goes until it changes.
    pub(crate) fn is_paused(&self) -> bool {
        self.rate().bytes_per_second() == Some(0)
    }

    /// Waits until `bytes` may go (or come); while paused, looks again every second.
    pub(crate) async fn acquire(&self, bytes: u64) -> anyhow::Result<()> {
        loop {
            match self.take(bytes)? {
                Some(wait) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    return Ok(());
                }
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// Like [`Limiter::acquire`], except that a pause does not hold these bytes: the rest of a message
    /// of the list of changes that a pause began in the middle of (a notice of the pause can only go
    /// between messages, and the destination gives a silent source two minutes).
    pub(crate) async fn acquire_unless_paused(&self, bytes: u64) -> anyhow::Result<()> {
        if let Some(wait) = self.take(bytes)?.filter(|w| !w.is_zero()) {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Takes `bytes` from the bucket now: how long to wait before they go, `None` while paused.
    fn take(&self, bytes: u64) -> anyhow::Result<Option<Duration>> {
        Ok(self.bucket.lock().map_err(|_| anyhow!("rate limiter poisoned"))?.take(bytes, Instant::now()))
    }

    /// Looks at the clock at the start of every minute (when a timetable can change) while the
    /// returned task runs. `what` names the limit in the log.
    pub(crate) fn follow(&self, what: &'static str) -> tokio::task::JoinHandle<()> {
        let limiter = self.clone();
        crate::helpers::spawn_in_span(async move {
            loop {
                tokio::time::sleep(until_next_minute() + Duration::from_millis(100)).await;
                if let Some(rate) = limiter.refresh() {
                    tracing::info!("{what} now {}", describe_rate(rate));
                }
            }
        })
    }
}
