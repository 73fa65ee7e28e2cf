//! Queue ids: 64 bits, shown as 16 hex digits. The high 44 bits are milliseconds
//! since the epoch, then one bit naming the *unit* that made the id (0: a router
//! alone or the primary of an HA pair, 1: the secondary), then a 19-bit sequence.
//! They sort by arrival (the spool's key order is the queue's natural order), and
//! the two units of a pair never make the same id, even in the same millisecond.
//! Across restarts, the spool seeds the sequence with the newest id it holds
//! ([`QueueId::observe`]), so a clock stepped back never reuses a queued id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct QueueId(pub u64);

/// Bits below the milliseconds.
const MS_SHIFT: u32 = 20;
/// The unit bit, right under the milliseconds.
const UNIT_BIT: u64 = 1 << 19;
/// The sequence within a millisecond.
const SEQ_MASK: u64 = UNIT_BIT - 1;

/// The last id made or seen, without its unit bit: `millis << 19 | seq`.
static LAST: AtomicU64 = AtomicU64::new(0);
/// This process's unit bit (0 or [`UNIT_BIT`]).
static UNIT: AtomicU64 = AtomicU64::new(0);

/// `millis << 19 | seq` of an id (its unit bit dropped).
fn counter_of(id: u64) -> u64 {
    ((id >> MS_SHIFT) << 19) | (id & SEQ_MASK)
}

/// The id of a counter value, with `unit`.
fn id_of(counter: u64, unit: u64) -> u64 {
    ((counter >> 19) << MS_SHIFT) | unit | (counter & SEQ_MASK)
}

impl QueueId {
    /// A new id, strictly greater than every id this process made or observed
    /// before (within this unit's ids), and carrying this unit's bit.
    pub fn new() -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            << 19;
        let mut last = LAST.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return QueueId(id_of(next, UNIT.load(Ordering::Relaxed))),
                Err(seen) => last = seen,
            }
        }
    }

    /// Sets this process's unit: `true` for the secondary of an HA pair.
    pub fn set_unit(secondary: bool) {
        UNIT.store(if secondary { UNIT_BIT } else { 0 }, Ordering::Relaxed);
    }

    /// Ids made from now on are above `id` (an id found in the store at start).
    pub fn observe(id: QueueId) {
        LAST.fetch_max(counter_of(id.0), Ordering::Relaxed);
    }

    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(b: [u8; 8]) -> QueueId {
        QueueId(u64::from_be_bytes(b))
    }

    /// Milliseconds since the epoch when the id was made.
    pub fn millis(self) -> u64 {
        self.0 >> MS_SHIFT
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
        assert_eq!(QueueId::from_bytes(a.to_bytes()), a);
    }

    #[test]
    fn the_units_of_a_pair_never_share_an_id_and_ids_sort_by_time() {
        // The same counter value (same millisecond, same sequence) on both units.
        let c = (1_700_000_000_000u64 << 19) | 5;
        let (p, s) = (id_of(c, 0), id_of(c, UNIT_BIT));
        assert_ne!(p, s);
        assert_eq!(QueueId(p).millis(), QueueId(s).millis());
        assert_eq!((counter_of(p), counter_of(s)), (c, c));
        // A later millisecond sorts after both units' ids of an earlier one.
        let later = id_of(1_700_000_000_001u64 << 19, 0);
        assert!(later > p && later > s);
        // A full sequence carries into the next millisecond, never into the unit bit.
        let full = (1_700_000_000_000u64 << 19) | SEQ_MASK;
        assert_eq!(id_of(full + 1, 0) & UNIT_BIT, 0);
        assert_eq!(QueueId(id_of(full + 1, 0)).millis(), 1_700_000_000_001);
    }

    #[test]
    fn an_observed_id_is_never_made_again() {
        // One second ahead (a clock stepped back by a second since it was made).
        let future = QueueId(QueueId::new().0 + (1000 << MS_SHIFT));
        QueueId::observe(future);
        let next = QueueId::new();
        assert!(counter_of(next.0) > counter_of(future.0));
    }
}
