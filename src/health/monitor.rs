//! The health monitor task: probes every catalog server every `probe_interval`
//! (all at once, each bounded by `probe_timeout`) and records the results.

use super::probe::probe;
use super::{Probe, Tracker};
use crate::catalog::Catalog;
use crate::config::{Live, RoutingConfig};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::watch;

/// Shared availability: written by the monitor and by deliveries, read by routing.
pub type SharedTracker = Arc<Mutex<Tracker>>;

pub fn shared(config: &RoutingConfig) -> SharedTracker {
    Arc::new(Mutex::new(
        Tracker::new(config.rise, config.busy_threshold)
            .with_availability_threshold(config.availability_threshold),
    ))
}

/// Probes all servers once; logs every change of availability.
pub async fn probe_all(catalog: &Catalog, tracker: &SharedTracker, config: &RoutingConfig) {
    let servers = catalog.servers(None);
    let handles: Vec<_> = servers
        .iter()
        .map(|s| {
            let (address, timeout) = (s.address.clone(), config.probe_timeout);
            tokio::spawn(async move { probe(&address, timeout).await })
        })
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(
            h.await
                .unwrap_or_else(|e| Probe::Failed(format!("probe task failed: {e}"))),
        );
    }
    let now = SystemTime::now();
    let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
    for (s, result) in servers.iter().zip(results) {
        let before = t.of(s);
        t.probed(&s.name, result, now);
        let after = t.of(s);
        if before != after {
            let why = t.problem(s).unwrap_or_default();
            let index = t.health(&s.name).index;
            tracing::info!(server = %s.name, %before, %after, index, why, "server availability changed");
        }
    }
}

/// Sets the tracker's thresholds from the config (at start and on a reload).
pub fn tune(tracker: &SharedTracker, config: &RoutingConfig) {
    let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
    t.rise = config.rise.max(1);
    t.busy_threshold = config.busy_threshold;
    t.availability_threshold = config.availability_threshold.min(100);
}

/// Probes every `probe_interval` (read again after each round: a reload takes
/// effect at the next one) until shutdown.
pub async fn run(
    catalog: Arc<Catalog>,
    tracker: SharedTracker,
    config: Arc<Live<RoutingConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut interval = config.get().probe_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = config.get();
                probe_all(&catalog, &tracker, &now).await;
                if now.probe_interval != interval {
                    interval = now.probe_interval;
                    tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
            }
            _ = shutdown.changed() => if *shutdown.borrow() { return },
        }
    }
}
