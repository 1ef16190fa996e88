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

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.rate
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
    fn time_to_send_follows_the_timetable() {
        let monday = |h: u64, m: u64| (h * 60 + m) * 60;
        // 1 MiB/s: 10 MiB take 10 s.
        let fixed = Timetable::parse("1M").unwrap();
        assert_eq!(fixed.time_to_send(10 << 20, monday(3, 0)), SendTime::Limited { seconds: 10 });
        assert_eq!(fixed.time_to_send(0, monday(3, 0)), SendTime::Limited { seconds: 0 });
        // Paused until 22:00, then 1 MiB/s: started at 21:59:30, 60 MiB end at 22:01:00.
        let night = Timetable::parse("08:00,0 22:00,1M").unwrap();
        assert_eq!(night.time_to_send(60 << 20, monday(21, 59) + 30), SendTime::Limited { seconds: 90 });
        // Sunday 23:59, across the week's wrap: the 22:00 rate is still in force.
        let sunday = 6 * 86_400 + (23 * 60 + 59) * 60;
        assert_eq!(night.time_to_send(120 << 20, sunday), SendTime::Limited { seconds: 120 });
        // An unlimited period ahead; a pause for ever.
        let evening = Timetable::parse("08:00,1M 19:00,off").unwrap();
        assert_eq!(evening.time_to_send(1 << 40, monday(18, 0)), SendTime::AtLinkSpeed { after: 3600 });
        assert_eq!(Timetable::parse("0").unwrap().time_to_send(1, 0), SendTime::Never);
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

/// A bandwidth timetable in rclone's syntax: `"Mon-Fri 08:00,512K 19:00,20M 23:00,off"`,
/// `"08:00,0 22:00,off"`, or a single rate (`"20M"`). Each `HH:MM,RATE` sets the rate from that time
/// on, for the days named before it (every day when none are); a rate holds until the next change in
/// the week, across midnight and across days without entries. `0` pauses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timetable {
    /// Change points: minute of the week (Monday 00:00 = 0) and the rate from then on, sorted.
    points: Vec<(u32, Rate)>,
}

/// A timetable that cannot be read; says which part is wrong.
#[derive(Debug, thiserror::Error)]
#[error("bad bandwidth timetable at {part:?} (word {position}): {why}")]
pub struct TimetableError {
    part: String,
    position: usize,
    why: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_WEEK: u32 = 7 * 24 * 60;

impl Timetable {
    /// Reads a timetable (see the type's documentation).
    pub fn parse(text: &str) -> Result<Self, TimetableError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.len() == 1 && !words[0].contains(',') {
            let rate = Rate::parse(words[0]).map_err(|e| TimetableError {
                part: words[0].into(),
                position: 1,
                why: e.to_string(),
            })?;
            return Ok(Self { points: vec![(0, rate)] });
        }
        let mut days: Vec<u32> = (0..7).collect();
        let mut points = Vec::new();
        for (i, word) in words.iter().enumerate() {
            let err = |why: &str| TimetableError { part: (*word).to_owned(), position: i + 1, why: why.to_owned() };
            if let Some((time, rate)) = word.split_once(',') {
                let (hour, minute) = time.split_once(':').ok_or_else(|| err("expected HH:MM,RATE"))?;
                let hour: u32 = hour.parse().map_err(|_| err("the hour is not a number"))?;
                let minute: u32 = minute.parse().map_err(|_| err("the minute is not a number"))?;
                if hour > 23 || minute > 59 {
                    return Err(err("the time must be between 00:00 and 23:59"));
                }
                let rate = Rate::parse(rate).map_err(|e| err(&e.to_string()))?;
                for day in &days {
                    points.push((day * 1440 + hour * 60 + minute, rate));
                }
            } else {
                days = parse_days(word).ok_or_else(|| err("expected days (Mon, Mon-Fri, Sat,Sun) or HH:MM,RATE"))?;
            }
        }
        if points.is_empty() {
            return Err(TimetableError { part: text.to_owned(), position: 1, why: "no HH:MM,RATE entry".into() });
        }
        points.sort_by_key(|p| p.0);
        points.dedup_by_key(|p| p.0);
        Ok(Self { points })
    }

    /// The rate in force at `minute_of_week` (Monday 00:00 = 0).
    pub fn rate_at(&self, minute_of_week: u32) -> Rate {
        let minute = minute_of_week % MINUTES_PER_WEEK;
        let index = self.points.partition_point(|p| p.0 <= minute);
        // Before the week's first change, the week's last change still holds.
        let point = if index == 0 { self.points.last() } else { self.points.get(index - 1) };
        point.map_or(Rate::UNLIMITED, |p| p.1)
    }

    /// The rate at a weekday (Monday = 0), hour and minute.
    pub fn rate_at_time(&self, weekday: u32, hour: u32, minute: u32) -> Rate {
        self.rate_at(weekday * 1440 + hour * 60 + minute)
    }

    /// How long sending `bytes` takes from `second_of_week` on (Monday 00:00:00 = 0), following the
    /// timetable: [`SendTime::Limited`] when the limits alone decide; [`SendTime::AtLinkSpeed`] when an
    /// unlimited period starts before it is done (from then on the link decides); [`SendTime::Never`]
    /// when the timetable pauses for good or a year is not enough.
    pub fn time_to_send(&self, bytes: u64, second_of_week: u64) -> SendTime {
        let mut left = bytes as f64;
        let mut now = second_of_week;
        let limit = second_of_week + 52 * u64::from(MINUTES_PER_WEEK) * 60;
        while left > 0.0 {
            if now >= limit {
                return SendTime::Never;
            }
            // The rest of this minute, at this minute's rate.
            let minute = (now / 60 % u64::from(MINUTES_PER_WEEK)) as u32;
            let seconds = 60 - now % 60;
            match self.rate_at(minute).bytes_per_second() {
                None => return SendTime::AtLinkSpeed { after: now - second_of_week },
                Some(rate) => {
                    let can = rate as f64 * seconds as f64;
                    if can >= left {
                        return SendTime::Limited {
                            seconds: now - second_of_week + (left / rate as f64).ceil() as u64,
                        };
                    }
                    left -= can;
                }
            }
            now += seconds;
        }
        SendTime::Limited { seconds: 0 }
    }
}

/// How long a transfer takes under a [`Timetable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendTime {
    /// Done after this many seconds.
    Limited {
        /// Seconds from the start.
        seconds: u64,
    },
    /// Limited for `after` seconds, then unlimited: done at the link's speed from then on.
    AtLinkSpeed {
        /// Seconds from the start until the limit lifts.
        after: u64,
    },
    /// Not within a year (paused for good).
    Never,
}

fn parse_days(word: &str) -> Option<Vec<u32>> {
    let day = |name: &str| DAYS.iter().position(|d| name.eq_ignore_ascii_case(d)).map(|i| i as u32);
    let mut out = Vec::new();
    for part in word.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    out.push(d);
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => out.push(day(part)?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod timetable_tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        Rate::parse(s).unwrap()
    }

    #[test]
    fn weekdays_evenings_and_the_wrap_at_midnight() {
        let t = Timetable::parse("Mon-Fri 08:00,512K 19:00,20M 23:00,off").unwrap();
        assert_eq!(t.rate_at_time(0, 7, 59), Rate::UNLIMITED, "Monday before 08:00: Sunday's last rate holds");
        assert_eq!(t.rate_at_time(0, 8, 0), rate("512K"));
        assert_eq!(t.rate_at_time(2, 18, 59), rate("512K"));
        assert_eq!(t.rate_at_time(2, 19, 0), rate("20M"));
        assert_eq!(t.rate_at_time(2, 23, 30), Rate::UNLIMITED);
        assert_eq!(t.rate_at_time(3, 3, 0), Rate::UNLIMITED, "across midnight");
        assert_eq!(t.rate_at_time(5, 12, 0), Rate::UNLIMITED, "Saturday has no entries: Friday 23:00 holds");
        let pause = Timetable::parse("08:00,0 22:00,off").unwrap();
        assert_eq!(pause.rate_at_time(6, 9, 0), rate("0"));
        assert_eq!(pause.rate_at_time(6, 23, 0), Rate::UNLIMITED);
        assert_eq!(pause.rate_at_time(0, 1, 0), Rate::UNLIMITED, "Monday 01:00: Sunday 22:00 holds");
        let wrap = Timetable::parse("Sat-Mon 10:00,1M").unwrap();
        assert_eq!(wrap.rate_at_time(6, 11, 0), rate("1M"));
        assert_eq!(Timetable::parse("20M").unwrap().rate_at_time(4, 4, 4), rate("20M"));
    }

    #[test]
    fn errors_point_at_the_bad_part() {
        for (text, part) in [
            ("Mon-Fri 08:00,512K 25:00,1M", "25:00,1M"),
            ("Mon-Fry 08:00,1M", "Mon-Fry"),
            ("08:00,fast", "08:00,fast"),
            ("8h,1M", "8h,1M"),
            ("Mon", "Mon"),
        ] {
            let err = Timetable::parse(text).unwrap_err().to_string();
            assert!(err.contains(&format!("{part:?}")), "{text}: {err}");
        }
    }
}
