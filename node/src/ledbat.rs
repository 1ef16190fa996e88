//! A low-priority congestion controller for `sync --low-priority`, after LEDBAT (RFC 6817) with
//! LEDBAT++'s multiplicative decrease: it grows the window while the queueing delay it measures stays
//! under a target and shrinks it as the delay passes the target, so it backs off as soon as other traffic fills the bottleneck's queue, long
//! before a loss-based controller (Cubic, NewReno) or TCP would. Losses halve the window as in NewReno.
//!
//! The queueing delay is quinn's smoothed RTT minus the smallest RTT seen on the connection.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;

/// The queueing delay LEDBAT aims for (RFC 6817 allows at most 100 ms; 25 ms yields early).
const TARGET: Duration = Duration::from_millis(25);
/// How fast the window grows under the target, in datagrams per RTT at an empty queue.
const GAIN: f64 = 1.0;

/// Builds [`Ledbat`] controllers.
#[derive(Debug, Clone, Default)]
pub(crate) struct LedbatConfig;

impl ControllerFactory for LedbatConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Ledbat::new(now, current_mtu))
    }
}

/// The controller's state.
#[derive(Debug, Clone)]
pub(crate) struct Ledbat {
    mtu: u64,
    window: u64,
    /// Slow start (exponential growth) until the delay first nears the target or a loss.
    slow_start: bool,
    /// Losses of packets sent before this are part of the same event.
    recovery_start: Instant,
}

impl Ledbat {
    fn new(now: Instant, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        Self { mtu, window: 10 * mtu, slow_start: true, recovery_start: now }
    }

    fn minimum(&self) -> u64 {
        2 * self.mtu
    }

    /// The queueing delay the RTT estimator shows.
    fn queueing(rtt: &RttEstimator) -> Duration {
        rtt.get().saturating_sub(rtt.min())
    }

    /// One step of the window for `bytes` acknowledged at queueing delay `queueing`.
    fn on_acked(&mut self, bytes: u64, queueing: Duration) {
        if self.slow_start {
            if queueing < TARGET * 3 / 4 {
                self.window += bytes;
                return;
            }
            self.slow_start = false;
        }
        let ratio = queueing.as_secs_f64() / TARGET.as_secs_f64();
        let window = if ratio <= 1.0 {
            // Under the target: up by at most one datagram per round trip, less the nearer the target.
            self.window as f64 + GAIN * (1.0 - ratio) * bytes as f64 * self.mtu as f64 / self.window as f64
        } else {
            // Over it: down multiplicatively (as LEDBAT++ does), by up to half a window per round trip,
            // so that a queue built by other traffic is left to it within a few round trips.
            self.window as f64 - (ratio - 1.0).min(0.5) * bytes as f64
        };
        self.window = (window as u64).max(self.minimum());
    }
}

impl Controller for Ledbat {
    fn on_ack(&mut self, _now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        if app_limited || sent <= self.recovery_start {
            return;
        }
        self.on_acked(bytes, Self::queueing(rtt));
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, _lost_bytes: u64) {
        if sent <= self.recovery_start {
            return;
        }
        self.recovery_start = now;
        self.slow_start = false;
        self.window = (self.window / 2).max(self.minimum());
        if persistent {
            self.window = self.minimum();
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.minimum());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        10 * self.mtu
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_under_the_target_and_yields_above_it() {
        let mut ledbat = Ledbat::new(Instant::now(), 1200);
        // Slow start while the queue is empty.
        ledbat.on_acked(12_000, Duration::ZERO);
        assert_eq!(ledbat.window, 24_000);
        // A queue near the target ends slow start; below the target the window still grows, slowly.
        ledbat.on_acked(1200, Duration::from_millis(20));
        assert!(!ledbat.slow_start);
        let before = ledbat.window;
        for _ in 0..20 {
            ledbat.on_acked(1200, Duration::from_millis(5));
        }
        assert!(ledbat.window > before && ledbat.window < before + 20 * 1200, "{}", ledbat.window);
        // Other traffic fills the queue: within a few windows' worth of acknowledgements the window
        // is at the minimum, without any loss.
        let full = ledbat.window;
        let mut acked = 0;
        while ledbat.window > 2400 {
            ledbat.on_acked(1200, Duration::from_millis(80));
            acked += 1200;
        }
        assert!(acked < 3 * full, "{acked} bytes acknowledged to get from {full} down");
        // A loss halves it (never below the minimum).
        let mut fresh = Ledbat::new(Instant::now() - Duration::from_secs(1), 1200);
        fresh.on_congestion_event(Instant::now(), Instant::now(), false, 1200);
        assert_eq!(fresh.window, 6000);
    }
}
