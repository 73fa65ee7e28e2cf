//! Resource limits of the SMTP service, shared by every session: the memory
//! budget for message data (`smtp.max_data_in_flight`), and the process's
//! open-files limit (one descriptor per connection) and allocator setting for
//! big blocks.
//!
//! A session reserves the octets of a message before it holds them, as they arrive
//! (DATA) or as each chunk is announced (BDAT), and gives them back on every path
//! (queued, refused, connection lost, timeout) by dropping its [`Reservation`]. When
//! a reservation cannot grow, the data is read to its end and discarded, and the
//! transaction gets `452 4.3.1`: memory stays bounded and the session in sync.
//!
//! Data held outside the sessions (an HA shadow batch being sent) is
//! [`Budget::charge`]d to the same budget while it lives.
//!
//! Fairness: a transaction's first `small` octets may use the whole budget, growth
//! past them only up to seven eighths of it, so big messages in flight always leave
//! room for small ones ([`fits`]).

use super::reply::Reply;
use crate::metrics::METRICS;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Reserved at the start of a message's data; also the growth step's floor.
pub const INITIAL: u64 = 64 << 10;
/// Kept in every reservation beyond its data: room for the Received header the
/// router adds in place before queueing.
pub const HEADER_ROOM: u64 = 4 << 10;

/// Octets of message data all sessions may hold together.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
}

/// What one transaction holds; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    held: u64,
}

/// The reply when the budget is spent.
pub fn refusal() -> Reply {
    Reply::new(
        452,
        "4.3.1",
        "Insufficient system storage: too much mail in progress, try again later",
    )
}

/// Whether `more` octets fit beside `used` when a transaction grows to `total`: a
/// transaction's first `small` octets may take the whole `limit`, growth past them
/// must leave an eighth of it free for small messages.
pub fn fits(limit: u64, used: u64, more: u64, total: u64) -> bool {
    let small = (limit / 16).clamp(INITIAL + HEADER_ROOM, 1 << 20);
    let cap = if total <= small {
        limit
    } else {
        limit - limit / 8
    };
    used.checked_add(more).is_some_and(|u| u <= cap)
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Octets reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `more` octets for a transaction growing to `total`, if they fit.
    fn take(&self, more: u64, total: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if !fits(self.limit, used, more, total) {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + more,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    METRICS.smtp_data_in_flight.add(more);
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        METRICS.smtp_data_in_flight.sub(n);
    }

    /// Counts `n` octets of message data held outside any session (the HA
    /// shadow copy's encoded batch while it is sent) until the reservation is
    /// dropped. Taken even past the limit: the octets exist already; sessions
    /// see that much less room meanwhile.
    pub fn charge(self: &Arc<Budget>, n: u64) -> Reservation {
        self.used.fetch_add(n, Ordering::AcqRel);
        METRICS.smtp_data_in_flight.add(n);
        Reservation {
            budget: self.clone(),
            held: n,
        }
    }

    /// A reservation for a new message (its first [`INITIAL`] octets and the
    /// header room), or None when the budget is spent.
    pub fn reserve(self: &Arc<Budget>) -> Option<Reservation> {
        let first = INITIAL + HEADER_ROOM;
        self.take(first, first).then(|| Reservation {
            budget: self.clone(),
            held: first,
        })
    }
}

impl Reservation {
    /// Octets held (data and header room).
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Makes room for `data` octets of message (header room kept on top), growing
    /// by a quarter at least so that a big message does not ask at every read.
    /// False when the budget cannot give them: the caller must stop keeping data.
    pub fn ensure(&mut self, data: u64) -> bool {
        let need = data.saturating_add(HEADER_ROOM);
        if need <= self.held {
            return true;
        }
        let step = (self.held + self.held / 4).div_ceil(INITIAL) * INITIAL;
        [step.max(need), need].into_iter().any(|total| {
            let ok = self.budget.take(total - self.held, total);
            if ok {
                self.held = total;
            }
            ok
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

/// Raises the soft limit of open files to the hard limit (every connection takes
/// a descriptor; `smtp.max_connections` is 1000 by default and a common soft limit
/// is 1024). Returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// Has big blocks (message bodies, the store's copy of each) mapped on their own,
/// so that they go back to the system when freed. Otherwise glibc raises its mmap
/// threshold to the largest block freed (up to 32 MiB): the next bodies come from
/// the heap, whose freed memory the process keeps (peak RSS, tests/limits.rs).
pub fn return_big_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_grow_within_the_limit_and_come_back_when_dropped() {
        let b = Budget::new(8 << 20);
        let mut r = b.reserve().unwrap();
        assert_eq!(b.used(), INITIAL + HEADER_ROOM);
        assert!(r.ensure(INITIAL), "within what is held");
        assert!(r.ensure(3 << 20));
        assert!(r.held() >= (3 << 20) + HEADER_ROOM);
        assert_eq!(b.used(), r.held());
        // Big growth stops at seven eighths of the limit...
        assert!(!r.ensure(7 << 20));
        let held = r.held();
        assert!(held <= 7 << 20, "{held}");
        // ...leaving room for small messages.
        let small: Vec<_> = (0..4).map(|_| b.reserve().expect("room")).collect();
        assert_eq!(b.used(), held + 4 * (INITIAL + HEADER_ROOM));
        drop(r);
        drop(small);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_charge_counts_past_the_limit_and_leaves_less_room_until_dropped() {
        let b = Budget::new(1 << 20);
        let c = b.charge(1000 << 10);
        assert_eq!(b.used(), 1000 << 10);
        assert!(b.reserve().is_none(), "the charge leaves no room");
        let over = b.charge(1 << 20);
        assert_eq!(b.used(), (1000 << 10) + (1 << 20));
        drop((c, over));
        assert_eq!(b.used(), 0);
        assert!(b.reserve().is_some());
    }

    #[test]
    fn a_spent_budget_refuses_new_messages() {
        let b = Budget::new(1 << 20);
        let all: Vec<_> = std::iter::from_fn(|| b.reserve()).take(100).collect();
        assert_eq!(all.len() as u64, (1 << 20) / (INITIAL + HEADER_ROOM));
        assert!(b.reserve().is_none());
        drop(all);
        assert!(b.reserve().is_some());
    }

    #[test]
    fn fairness_rule() {
        let limit = 256 << 20;
        assert!(
            fits(limit, limit - 100, 100, 100),
            "small: the whole budget"
        );
        assert!(!fits(limit, limit - 100, 101, 101));
        assert!(
            !fits(limit, limit - limit / 8, 1, 2 << 20),
            "big: 7/8 at most"
        );
        assert!(fits(limit, limit - limit / 8 - 1, 1, 2 << 20));
        assert!(!fits(limit, u64::MAX, 1, 1), "no overflow");
    }
}
