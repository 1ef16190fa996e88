//! A congestion controller for links that lose packets without being full (radio, a damaged line),
//! `--congestion lossy`: quinn's Cubic, except that a loss seen while the path shows no queue is taken
//! for noise and does not shrink the window (the idea of TCP Veno). A loss while a queue is building,
//! and persistent congestion, are congestion as usual: on a full link it backs off like Cubic.
//!
//! Why: a loss-based controller halves its window at every loss, so 1% random loss holds it near
//! the Mathis bound (3% of a 100 Mbit/s, 50 ms link here), while a full bottleneck queue, the signal
//! that matters, also shows as a longer round trip. The queueing delay is quinn's smoothed RTT minus
//! the smallest RTT seen on the connection.
//!
//! Its slow start ends when the round trip starts to grow (`hystart`), not at the first loss: the random
//! losses it takes for noise leave slow start going, and without that it would go on until the
//! buffer overflows.
//!
//! The price: behind an active queue manager that drops early (CoDel keeps about 5 ms), this takes
//! those drops for noise and is less fair to other flows than Cubic. That is why it is a choice, not
//! the default.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

use crate::hystart::HyStartConfig;

/// Builds [`Lossy`] controllers.
#[derive(Debug, Clone, Default)]
pub(crate) struct LossyConfig;

impl ControllerFactory for LossyConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let cubic = Arc::new(HyStartConfig::around(Arc::new(CubicConfig::default()))).build(now, current_mtu);
        Box::new(Lossy { cubic, queueing: Duration::ZERO, min_rtt: Duration::ZERO })
    }
}

/// Cubic, deaf to losses at an empty queue.
pub(crate) struct Lossy {
    cubic: Box<dyn Controller>,
    /// At the last acknowledgement.
    queueing: Duration,
    min_rtt: Duration,
}

impl Lossy {
    /// Whether a loss of `lost_bytes` now means congestion: persistent congestion; a burst (random loss
    /// takes a datagram or two at a time, a queue that overflowed in slow start, before the round trip
    /// shows it, takes many at once); or a queue of more than a quarter of the path's own round trip
    /// (at least 5 ms, for jitter).
    fn is_congestion(&self, persistent: bool, lost_bytes: u64) -> bool {
        persistent
            || lost_bytes >= self.cubic.window() / 16
            || self.queueing >= (self.min_rtt / 4).max(Duration::from_millis(5))
    }
}

impl Controller for Lossy {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cubic.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.queueing = rtt.get().saturating_sub(rtt.min());
        self.min_rtt = rtt.min();
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_acked: Option<u64>) {
        self.cubic.on_end_acks(now, in_flight, app_limited, largest_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        if self.is_congestion(persistent, lost_bytes) {
            self.cubic.on_congestion_event(now, sent, persistent, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.cubic.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.cubic.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.cubic.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Lossy { cubic: self.cubic.clone_box(), queueing: self.queueing, min_rtt: self.min_rtt })
    }

    fn initial_window(&self) -> u64 {
        self.cubic.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lossy(queueing_ms: u64) -> Lossy {
        let now = Instant::now();
        let cubic = Arc::new(CubicConfig::default()).build(now, 1200);
        Lossy { cubic, queueing: Duration::from_millis(queueing_ms), min_rtt: Duration::from_millis(50) }
    }

    #[test]
    fn a_small_loss_at_an_empty_queue_keeps_the_window() {
        let mut controller = lossy(1);
        let (before, sent) = (controller.window(), Instant::now());
        controller.on_congestion_event(sent + Duration::from_millis(1), sent + Duration::from_millis(1), false, 500);
        assert_eq!(controller.window(), before);
    }

    #[test]
    fn a_queue_a_burst_or_persistent_congestion_shrink_it() {
        // A queue of 20 ms on a 50 ms path (threshold 12.5 ms); a burst of losses; persistent loss.
        for (queueing_ms, persistent, lost) in [(20, false, 500), (1, false, 6000), (1, true, 500)] {
            let mut controller = lossy(queueing_ms);
            let (before, sent) = (controller.window(), Instant::now());
            let later = sent + Duration::from_millis(1);
            controller.on_congestion_event(later, later, persistent, lost);
            assert!(controller.window() < before, "{queueing_ms} ms, persistent {persistent}, {lost} bytes");
        }
    }
}
