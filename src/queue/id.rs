//! Queue ids: 64 bits, milliseconds since the epoch in the high 44 bits and a
//! per-process counter in the low 20, shown as 16 hex digits. They sort by arrival,
//! which makes the spool's key order the queue's natural order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct QueueId(pub u64);

static LAST: AtomicU64 = AtomicU64::new(0);

impl QueueId {
    /// A new id, strictly greater than every id this process made before.
    pub fn new() -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            << 20;
        let mut last = LAST.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return QueueId(next),
                Err(seen) => last = seen,
            }
        }
    }

    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Milliseconds since the epoch when the id was made.
    pub fn millis(self) -> u64 {
        self.0 >> 20
    }
}

impl Default for QueueId {
    fn default() -> Self {
        QueueId::new()
    }
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl std::str::FromStr for QueueId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s.trim(), 16)
            .map(QueueId)
            .map_err(|_| format!("{s:?} is not a queue id (16 hex digits)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_round_trip() {
        let a = QueueId::new();
        let b = QueueId::new();
        assert!(b > a);
        assert_eq!(a.to_string().parse::<QueueId>(), Ok(a));
        assert_eq!(a.to_string().len(), 16);
    }
}
