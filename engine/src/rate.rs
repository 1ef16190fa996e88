//! Bandwidth limits: parsing a rate as rsync and rclone write it, and a token bucket that says how long
//! to wait before sending more. No clock inside: callers pass `now`.

use std::time::{Duration, Instant};

/// A rate in bytes per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(Option<u64>);

/// A rate that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("bad rate {0:?}: write bytes per second with an optional suffix, e.g. 512K, 20M, 1.5G, or off")]
pub struct RateError(String);

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate(None);

    /// Bytes per second, `None` when unlimited.
    pub fn bytes_per_second(&self) -> Option<u64> {
        self.0
    }

    /// Reads `512K`, `20M`, `1.5G`, `100B`, `off` (1024-based; a bare number is KiB, as rsync and rclone
    /// read it). `0` pauses, which the bucket treats as "wait".
    pub fn parse(text: &str) -> Result<Rate, RateError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") || text.is_empty() {
            return Ok(Rate(None));
        }
        let err = || RateError(text.to_owned());
        let (number, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
            Some((i, _)) => (&text[..i], &text[i..]),
            None => (text, "K"),
        };
        let multiplier: f64 =
            match unit.to_ascii_uppercase().trim_end_matches("/S").trim_end_matches("IB").trim_end_matches('B') {
                "" => 1.0,
                "K" => 1024.0,
                "M" => 1024.0 * 1024.0,
                "G" => 1024.0 * 1024.0 * 1024.0,
                "T" => 1024.0f64.powi(4),
                _ => return Err(err()),
            };
        let value: f64 = number.trim().parse().map_err(|_| err())?;
        if !value.is_finite() || value < 0.0 {
            return Err(err());
        }
        Ok(Rate(Some((value * multiplier).round() as u64)))
    }
}

/// A token bucket: at most `rate` bytes per second on average, with bursts of at most `burst` bytes.
#[derive(Debug)]
pub struct TokenBucket {
    rate: Rate,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. The burst is a tenth of a second of traffic (at least 16 KiB).
    pub fn new(rate: Rate, now: Instant) -> Self {
        let burst = rate.0.map_or(0.0, |r| (r as f64 / 10.0).max(16.0 * 1024.0));
        Self { rate, burst, tokens: burst, last: now }
    }

    /// Changes the rate (a timetable moving on, a reload), keeping what was saved up.
    pub fn set_rate(&mut self, rate: Rate, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = rate.0.map_or(0.0, |r| (r as f64 / 10.0).max(16.0 * 1024.0));
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if let Some(rate) = self.rate.0 {
            self.tokens = (self.tokens + elapsed * rate as f64).min(self.burst);
        }
    }

    /// Takes `bytes`; returns how long to wait before sending them. A rate of 0 (a pause) returns
    /// `None`: ask again later.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        match self.rate.0 {
            None => Some(Duration::ZERO),
            Some(0) => None,
            Some(rate) => {
                self.tokens -= bytes as f64;
                if self.tokens >= 0.0 {
                    Some(Duration::ZERO)
                } else {
                    Some(Duration::from_secs_f64(-self.tokens / rate as f64))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_like_rsync_and_rclone() {
        let bps = |s: &str| Rate::parse(s).unwrap().bytes_per_second();
        assert_eq!(bps("2M"), Some(2 << 20));
        assert_eq!(bps("512K"), Some(512 << 10));
        assert_eq!(bps("512"), Some(512 << 10), "a bare number is KiB");
        assert_eq!(bps("1.5G"), Some(3 << 29));
        assert_eq!(bps("100B"), Some(100));
        assert_eq!(bps("20MiB/s"), Some(20 << 20));
        assert_eq!(bps("0"), Some(0));
        assert_eq!(bps("off"), None);
        for bad in ["fast", "-1M", "2X", "1..2M", "NaNM"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_bucket_holds_the_average_and_only_a_small_burst() {
        let start = Instant::now();
        let rate = Rate::parse("1M").unwrap();
        let mut bucket = TokenBucket::new(rate, start);
        // Sending 10 MiB in 64 KiB pieces as fast as allowed takes about 10 s minus the initial burst.
        let mut now = start;
        for _ in 0..160 {
            now += bucket.take(64 << 10, now).unwrap();
        }
        let elapsed = now.duration_since(start).as_secs_f64();
        assert!((9.8..=10.0).contains(&elapsed), "{elapsed}");
        // After a long idle time, the saved-up burst is a tenth of a second, not the idle time.
        let later = now + Duration::from_secs(60);
        assert_eq!(bucket.take(100 << 10, later), Some(Duration::ZERO));
        assert!(bucket.take(64 << 10, later).unwrap() > Duration::from_millis(50));
        // A pause says "not now"; unlimited never waits.
        bucket.set_rate(Rate::parse("0").unwrap(), later);
        assert_eq!(bucket.take(1, later), None);
        bucket.set_rate(Rate::UNLIMITED, later);
        assert_eq!(bucket.take(1 << 30, later), Some(Duration::ZERO));
    }
}
