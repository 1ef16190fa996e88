//! Progress for people while a round runs: a live bar on a terminal, a log line every so often
//! otherwise (cron, systemd's journal), nothing with `-q`.

use std::io::IsTerminal;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// A live bar on stderr, a terminal.
    Bar,
    /// A log line at most this often.
    Lines(Duration),
    /// Nothing (`-q`).
    Off,
}

impl Show {
    /// A bar when stderr is a terminal, lines every `interval` when not, nothing when `quiet`.
    pub fn choose(quiet: bool, interval: Duration) -> Self {
        if quiet {
            Self::Off
        } else if std::io::stderr().is_terminal() {
            Self::Bar
        } else {
            Self::Lines(interval)
        }
    }

    /// How often whoever feeds a [`Meter`] should look at its counters.
    pub fn period(self) -> Duration {
        match self {
            Self::Lines(interval) => interval.min(Duration::from_secs(1)),
            _ => Duration::from_millis(250),
        }
    }
}

/// Shows one round's progress, as [`Show`] says. Fed as often as [`Show::period`]; a log line goes
/// out at most once an interval.
pub struct Meter {
    show: Show,
    bar: Option<(indicatif::ProgressBar, Option<Style>)>,
    next_line: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Spinner,
    Bytes,
}

impl Meter {
    /// A meter that has shown nothing yet.
    pub fn new(show: Show) -> Self {
        let next_line = match show {
            Show::Lines(interval) => Instant::now() + interval,
            _ => Instant::now(),
        };
        Self { show, bar: None, next_line }
    }

    /// A step whose end is not known (a scan, an apply): `line` says where it is.
    pub fn count(&mut self, line: String) {
        if let Some(bar) = self.bar(Style::Spinner) {
            bar.set_message(line);
        } else {
            self.log(&line);
        }
    }

    /// Bytes toward a known total (the changed data of a round): a bar with the rate and the time
    /// left, and `line` beside it; without a terminal, `line` alone (it says as much in words).
    pub fn toward(&mut self, done: u64, total: u64, line: String) {
        if let Some(bar) = self.bar(Style::Bytes) {
            bar.set_length(total.max(done));
            bar.set_position(done);
            bar.set_message(line);
        } else {
            self.log(&line);
        }
    }

    /// Clears the live line (the summary follows).
    pub fn finish(self) {
        if let Some((bar, _)) = self.bar {
            bar.finish_and_clear();
        }
    }

    fn log(&mut self, line: &str) {
        if let Show::Lines(interval) = self.show {
            let now = Instant::now();
            if now >= self.next_line {
                self.next_line = now + interval;
                tracing::info!("{line}");
            }
        }
    }

    /// The live bar in `style`, made on first use; `None` unless on a terminal.
    fn bar(&mut self, style: Style) -> Option<&indicatif::ProgressBar> {
        if self.show != Show::Bar {
            return None;
        }
        let (bar, current) = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(250));
            (bar, None)
        });
        if *current != Some(style) {
            let template = match style {
                Style::Spinner => "{spinner} {elapsed_precise} {wide_msg}",
                Style::Bytes => {
                    "{spinner} {elapsed_precise} [{bar:20}] {binary_bytes}/{binary_total_bytes} \
                     {binary_bytes_per_sec}, {eta} left  {wide_msg}"
                }
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
                    .progress_chars("=> "),
            );
            *current = Some(style);
        }
        Some(bar)
    }
}

/// Shows what `line` says, as a step whose end is not known, on a thread of its own (in the span it
/// was started in) until dropped; dropping it clears the line at once.
pub struct Watch {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Starts showing `line` every [`Show::period`].
    pub fn start(show: Show, mut line: impl FnMut() -> String + Send + 'static) -> Self {
        if show == Show::Off {
            return Self { stop: None, thread: None };
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("ferry-progress".into())
            .spawn(move || {
                let _entered = span.enter();
                let mut meter = Meter::new(show);
                // On a terminal the line shows at once; a log line waits for its interval.
                loop {
                    meter.count(line());
                    match stopped.recv_timeout(show.period()) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                meter.finish();
            })
            .ok();
        Self { stop: Some(stop), thread }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// "scanning: 120,345 entries, 2.3 GiB read (180.0 MiB/s)".
pub fn scan_line(progress: &ferry_engine::Progress) -> String {
    format!(
        "scanning: {} entries, {} read ({})",
        crate::human::count(progress.entries()),
        crate::human::bytes(progress.bytes()),
        rate(progress)
    )
}

/// "180.0 MiB/s": a step's bytes over its time so far.
pub fn rate(progress: &ferry_engine::Progress) -> String {
    let secs = progress.elapsed().as_secs_f64().max(0.001);
    format!("{}/s", crate::human::bytes((progress.bytes() as f64 / secs) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_shows_nothing_and_lines_come_at_most_once_an_interval() {
        assert_eq!(Show::choose(true, Duration::from_secs(60)), Show::Off);
        assert_eq!(Show::Lines(Duration::from_secs(60)).period(), Duration::from_secs(1));
        let mut meter = Meter::new(Show::Lines(Duration::from_secs(3600)));
        let first = meter.next_line;
        meter.count("scanning".into());
        assert_eq!(meter.next_line, first, "a line before its interval was up");
        meter.next_line = Instant::now();
        meter.toward(1, 2, "half".into());
        assert!(meter.next_line > first, "no line once the interval was up");
        assert!(meter.bar.is_none());
    }

    #[test]
    fn a_watch_ends_as_soon_as_it_is_dropped_not_at_its_next_look() {
        let looks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = looks.clone();
        let watch = Watch::start(Show::Lines(Duration::from_secs(60)), move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            String::new()
        });
        std::thread::sleep(Duration::from_millis(50));
        let dropped = Instant::now();
        drop(watch);
        assert!(dropped.elapsed() < Duration::from_millis(500), "the watch held its owner {:?}", dropped.elapsed());
        assert_eq!(looks.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
