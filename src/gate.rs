//! The gate: whether this unit may take and deliver mail right now. Always open
//! for a router running alone; in an HA pair the state machine (`ha`) opens it
//! while the unit is MASTER. The SMTP service and the queue manager only read it,
//! so neither depends on the HA code. Also the low-disk flag SMTP reads
//! ([`LowDisk`], set by `ha::local`'s disk watch).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Open while this router may take and deliver mail: always when it runs alone,
/// only as MASTER in a pair. Changes can be waited for ([`Gate::subscribe`]).
#[derive(Clone, Debug)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub fn open() -> Gate {
        Gate(Arc::new(watch::Sender::new(true)))
    }
    pub fn closed() -> Gate {
        Gate(Arc::new(watch::Sender::new(false)))
    }
    pub fn is_active(&self) -> bool {
        *self.0.borrow()
    }
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
    /// Opens or closes the gate; only the HA state machine calls this.
    pub(crate) fn set(&self, active: bool) {
        self.0
            .send_if_modified(|v| std::mem::replace(v, active) != active);
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::open()
    }
}

/// Set while the data disk is below `smtp.min_free_disk`: new mail gets
/// `452 4.3.1` instead of failing writes. Measured by `ha::local::watch_disk`.
#[derive(Clone, Debug, Default)]
pub struct LowDisk(Arc<AtomicBool>);

impl LowDisk {
    pub fn is_low(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the flag; true when that changed it.
    pub(crate) fn set(&self, low: bool) -> bool {
        self.0.swap(low, Ordering::Relaxed) != low
    }
}
