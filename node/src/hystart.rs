//! Slow start that ends when the round trip starts to grow, before the bottleneck's queue overflows:
//! the delay rule of HyStart++ (RFC 9406), around quinn's Cubic, which leaves slow start only at a
//! loss. Linux's TCP CUBIC has done the same (HyStart) for years.
//!
//! Why: each round is a new QUIC connection, and its slow start doubles the window every round trip
//! until the bottleneck's queue overflows. On a 100 Mbit/s link with a 50 ms queue that is about 1 MB
//! sent twice in every round: 5% of a day round's bytes at 20k files (`ferry-bench --shaped 100`).
//!
//! How: the connection's time is cut into rounds of one round trip (a round ends when a packet sent
//! after it began is acknowledged). In each round, the smallest round trip among at least 8
//! acknowledgements; when it exceeds the previous round's by an eighth of that (between 4 and 16 ms),
//! the queue is building and slow start ends the way a loss ends it: Cubic takes a congestion event
//! (the window times 0.7), without a packet lost. The window has doubled since the packets that showed
//! the delay were sent, so keeping all of it would overflow the queue a round trip later anyway;
//! picoquic settled on the same (it halves).
//!
//! Not done: RFC 9406's conservative slow start (a quarter of the growth for a few more rounds, back to
//! slow start if the delay falls again). quinn's Cubic keeps its threshold private, so slow start can
//! only end the way a loss ends it.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Acknowledgements a round needs before its smallest round trip counts (RFC 9406's N_RTT_SAMPLE).
const SAMPLES: u32 = 8;
/// Bounds of the growth that ends slow start (RFC 9406's MIN_RTT_THRESH and MAX_RTT_THRESH).
const GROWTH: (Duration, Duration) = (Duration::from_millis(4), Duration::from_millis(16));

/// Builds [`HyStart`] controllers around those of `inner`.
pub(crate) struct HyStartConfig {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
}

impl HyStartConfig {
    pub(crate) fn around(inner: Arc<dyn ControllerFactory + Send + Sync>) -> Self {
        Self { inner }
    }
}

impl ControllerFactory for HyStartConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(HyStart { inner: self.inner.clone().build(now, current_mtu), rounds: Some(Rounds::new(now)) })
    }
}

/// The inner controller, and the rounds of its slow start.
pub(crate) struct HyStart {
    inner: Box<dyn Controller>,
    /// `None` once slow start is over, ended by a rising round trip or by a loss.
    rounds: Option<Rounds>,
}

/// The smallest round trips of this round and the last.
#[derive(Debug, Clone)]
struct Rounds {
    /// When this round began: the acknowledgement of a packet sent after it ends it.
    began: Instant,
    /// Acknowledgements (batches of them, one per ACK frame) in this round.
    samples: u32,
    smallest: Option<Duration>,
    last_smallest: Option<Duration>,
}

impl Rounds {
    fn new(now: Instant) -> Self {
        Self { began: now, samples: 0, smallest: None, last_smallest: None }
    }

    /// A packet sent at `sent` was acknowledged at `now`.
    fn on_ack(&mut self, now: Instant, sent: Instant) {
        if sent > self.began {
            // One round trip since this round began.
            if self.smallest.is_some() {
                self.last_smallest = self.smallest;
            }
            *self = Self { began: now, samples: 0, smallest: None, last_smallest: self.last_smallest };
        }
        let rtt = now.saturating_duration_since(sent);
        self.smallest = Some(self.smallest.map_or(rtt, |smallest| smallest.min(rtt)));
    }

    /// At the end of a batch of acknowledgements: whether the queue is building.
    fn queue_is_building(&mut self) -> bool {
        self.samples += 1;
        match (self.smallest, self.last_smallest) {
            (Some(smallest), Some(last)) if self.samples >= SAMPLES => {
                smallest >= last + (last / 8).clamp(GROWTH.0, GROWTH.1)
            }
            _ => false,
        }
    }
}

impl HyStart {
    /// Ends slow start the way a loss would, without one.
    fn end_slow_start(&mut self, now: Instant) {
        tracing::debug!(window = self.inner.window(), "the round trip grows: slow start ends before a loss");
        self.rounds = None;
        self.inner.on_congestion_event(now, now, false, 0);
    }
}

impl Controller for HyStart {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        if let Some(rounds) = &mut self.rounds {
            rounds.on_ack(now, sent);
        }
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_acked);
        if self.rounds.as_mut().is_some_and(Rounds::queue_is_building) {
            self.end_slow_start(now);
        }
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        self.rounds = None;
        self.inner.on_congestion_event(now, sent, persistent, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(HyStart { inner: self.inner.clone_box(), rounds: self.rounds.clone() })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use quinn::congestion::CubicConfig;

    use super::*;

    /// A slow start whose round trips take `rtt(round)`: per round, a window's worth of acknowledgements
    /// in batches of two packets, the window doubling each round from 10 packets. Returns the round in
    /// which the queue was seen building, or `None` after 12 rounds.
    fn slow_start(rtt: impl Fn(u32) -> Duration) -> Option<u32> {
        let start = Instant::now();
        let mut rounds = Rounds::new(start);
        let mut now = start + Duration::from_millis(1);
        for round in 0..12 {
            let sent = now;
            now += rtt(round);
            for _ in 0..(10 << round) / 2 {
                rounds.on_ack(now, sent);
                rounds.on_ack(now, sent);
                if rounds.queue_is_building() {
                    return Some(round);
                }
                now += Duration::from_micros(10);
            }
        }
        None
    }

    #[test]
    fn slow_start_goes_on_while_the_round_trip_holds() {
        assert_eq!(slow_start(|_| Duration::from_millis(50)), None);
        // Jitter under the threshold (an eighth of 50 ms) does not end it either.
        assert_eq!(slow_start(|round| Duration::from_millis(if round % 2 == 0 { 50 } else { 55 })), None);
        // Nor on a short path, where the threshold is 4 ms: 0.1 ms, then 3 ms.
        assert_eq!(slow_start(|round| Duration::from_micros(if round < 6 { 100 } else { 3_000 })), None);
    }

    #[test]
    fn a_growing_round_trip_ends_slow_start() {
        // From round 6 the queue grows by 10 ms a round: 6.25 ms (an eighth of 50) is passed there.
        let rtt = |round: u32| Duration::from_millis(50 + 10 * u64::from(round.saturating_sub(5)));
        assert_eq!(slow_start(rtt), Some(6));
        // A short path: 0.1 ms, then a queue of 5 ms.
        assert_eq!(slow_start(|round| Duration::from_micros(if round < 6 { 100 } else { 5_100 })), Some(6));
    }

    #[test]
    fn slow_start_ends_as_at_a_loss_and_is_then_left_alone() {
        let now = Instant::now();
        let cubic = Arc::new(CubicConfig::default()).build(now, 1200);
        let before = cubic.window();
        let mut controller = HyStart { inner: cubic, rounds: Some(Rounds::new(now)) };
        controller.end_slow_start(now + Duration::from_millis(1));
        assert_eq!(controller.window(), (before as f64 * 0.7) as u64);
        assert!(controller.rounds.is_none());
        // A loss, too, ends the watch.
        let mut controller =
            HyStart { inner: Arc::new(CubicConfig::default()).build(now, 1200), rounds: Some(Rounds::new(now)) };
        let later = now + Duration::from_millis(1);
        controller.on_congestion_event(later, later, false, 1200);
        assert!(controller.rounds.is_none());
    }
}
