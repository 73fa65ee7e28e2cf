//! The last hour in memory, for the dashboard's charts: per minute, how many
//! messages were accepted and recipients delivered, held and bounced (from the
//! [`crate::metrics::METRICS`] counters), and the queue size at the minute's end.

use crate::metrics::{Metrics, METRICS};
use crate::queue::Spool;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// Minutes kept.
pub const MINUTES: usize = 60;

/// One minute's activity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    pub accepted: u64,
    pub delivered: u64,
    pub held: u64,
    pub bounced: u64,
    /// Messages queued when the minute was last sampled.
    pub queue: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    accepted: u64,
    delivered: u64,
    held: u64,
    bounced: u64,
}

impl Totals {
    fn read(m: &Metrics) -> Totals {
        Totals {
            accepted: m.messages_accepted.get(),
            delivered: m.recipients_delivered.get(),
            held: m.recipients_held.get(),
            bounced: m.recipients_bounced.get(),
        }
    }
}

/// The ring of the last [`MINUTES`] minutes (the current one last, still growing).
pub struct Stats {
    ring: Mutex<(VecDeque<Minute>, Totals)>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            ring: Mutex::new((VecDeque::new(), Totals::read(&METRICS))),
        }
    }

    /// Adds what the counters moved since the last sample to `minute`'s entry.
    pub fn sample(&self, m: &Metrics, minute: u64, queue: u64) {
        let now = Totals::read(m);
        let mut guard = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let (ring, last) = &mut *guard;
        if ring.back().is_none_or(|b| b.minute != minute) {
            ring.push_back(Minute {
                minute,
                ..Minute::default()
            });
            while ring.len() > MINUTES {
                ring.pop_front();
            }
        }
        if let Some(b) = ring.back_mut() {
            b.accepted += now.accepted.saturating_sub(last.accepted);
            b.delivered += now.delivered.saturating_sub(last.delivered);
            b.held += now.held.saturating_sub(last.held);
            b.bounced += now.bounced.saturating_sub(last.bounced);
            b.queue = queue;
        }
        *last = now;
    }

    /// The minutes kept, oldest first.
    pub fn minutes(&self) -> Vec<Minute> {
        let guard = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.iter().copied().collect()
    }
}

/// Samples every few seconds until shutdown.
pub async fn run(stats: std::sync::Arc<Stats>, spool: Spool, mut stopped: watch::Receiver<bool>) {
    loop {
        let minute = crate::queue::manager::now_ms() / 60_000;
        // Counting a long queue walks the store: not on an async thread.
        let queue = tokio::task::block_in_place(|| spool.len()) as u64;
        stats.sample(&METRICS, minute, queue);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_hold_deltas_and_the_ring_is_bounded() {
        let m = Metrics::new();
        let s = Stats {
            ring: Mutex::new((VecDeque::new(), Totals::read(&m))),
        };
        m.messages_accepted.add(3);
        s.sample(&m, 10, 3);
        m.messages_accepted.add(2);
        m.recipients_delivered.add(4);
        s.sample(&m, 10, 1);
        m.recipients_held.inc();
        s.sample(&m, 11, 1);
        let got = s.minutes();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].accepted, got[0].delivered, got[0].queue), (5, 4, 1));
        assert_eq!((got[1].accepted, got[1].held), (0, 1));
        for minute in 12..200 {
            s.sample(&m, minute, 0);
        }
        assert_eq!(s.minutes().len(), MINUTES);
        assert_eq!(s.minutes()[MINUTES - 1].minute, 199);
    }
}
