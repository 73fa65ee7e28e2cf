//! Metrics: the counters and gauges kept by the parts that do the work. The
//! Prometheus endpoint that renders them (`metrics_listen`) is
//! [`crate::web::metrics`].
//!
//! The counters are process-wide statics: one router per process, and no part has
//! to carry a handle to count. This module imports no other part of the router.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub const fn new() -> Gauge {
        Gauge(AtomicU64::new(0))
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every counter of the router.
pub struct Metrics {
    /// Messages queued (250 after DATA or BDAT LAST).
    pub messages_accepted: Counter,
    /// Recipients delivered (2xx from a server).
    pub recipients_delivered: Counter,
    /// Recipients that failed and were reported in a DSN.
    pub recipients_bounced: Counter,
    /// Times a recipient was put on hold (home unusable, no replica).
    pub recipients_held: Counter,
    /// Routing decisions for delivery attempts, by kind.
    pub decided_home: Counter,
    pub decided_replica: Counter,
    pub decided_next_hop: Counter,
    pub decided_hold: Counter,
    /// HA link authentications that failed (either side): an alarm.
    pub ha_auth_failures: Counter,
    pub ha_local_failures: Counter,
    /// Octets of message data SMTP sessions hold now (`smtp::limits`).
    pub smtp_data_in_flight: Gauge,
    /// DATA or BDAT refused with 452 4.3.1: the data budget was spent.
    pub smtp_data_refused: Counter,
    /// SMTP replies sent to clients, by code.
    /// Index: the reply code (SMTP codes are 200-599); counted without a lock, as
    /// every reply of every session passes here.
    smtp_replies: [Counter; 600],
}

pub static METRICS: Metrics = Metrics::new();

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every counter at zero.
    pub const fn new() -> Metrics {
        Metrics {
            messages_accepted: Counter::new(),
            recipients_delivered: Counter::new(),
            recipients_bounced: Counter::new(),
            recipients_held: Counter::new(),
            decided_home: Counter::new(),
            decided_replica: Counter::new(),
            decided_next_hop: Counter::new(),
            decided_hold: Counter::new(),
            ha_auth_failures: Counter::new(),
            ha_local_failures: Counter::new(),
            smtp_data_in_flight: Gauge::new(),
            smtp_data_refused: Counter::new(),
            smtp_replies: [const { Counter::new() }; 600],
        }
    }

    pub fn smtp_reply(&self, code: u16) {
        if let Some(c) = self.smtp_replies.get(usize::from(code)) {
            c.inc();
        }
    }

    /// Codes sent at least once, with their counts, by code.
    pub fn smtp_replies(&self) -> BTreeMap<u16, u64> {
        (0u16..)
            .zip(&self.smtp_replies)
            .map(|(code, c)| (code, c.get()))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_counted_by_code() {
        let m = Metrics::new();
        m.smtp_reply(250);
        m.smtp_reply(250);
        m.smtp_reply(550);
        assert_eq!(
            m.smtp_replies().into_iter().collect::<Vec<_>>(),
            vec![(250, 2), (550, 1)]
        );
    }
}
