//! The queue manager's schedule: when each queued message next has something to
//! do, indexed both ways so that a pass costs O(log n + due) however many messages
//! wait (100,000 held messages must not be walked on every arrival).

use super::QueueId;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
pub struct Schedule {
    by_id: HashMap<QueueId, u64>,
    by_time: BTreeSet<(u64, QueueId)>,
}

impl Schedule {
    /// `id` is next due at `at` (ms since the epoch; 0: now), replacing any earlier time.
    pub fn set(&mut self, id: QueueId, at: u64) {
        if let Some(old) = self.by_id.insert(id, at) {
            self.by_time.remove(&(old, id));
        }
        self.by_time.insert((at, id));
    }

    pub fn remove(&mut self, id: QueueId) {
        if let Some(old) = self.by_id.remove(&id) {
            self.by_time.remove(&(old, id));
        }
    }

    /// Every message due at `now`, earliest first (ties: oldest first).
    pub fn due(&self, now: u64) -> Vec<QueueId> {
        self.by_time
            .range(..=(now, QueueId(u64::MAX)))
            .map(|&(_, id)| id)
            .collect()
    }

    /// The earliest time after `now` something falls due.
    pub fn next_after(&self, now: u64) -> Option<u64> {
        self.by_time
            .range((now.saturating_add(1), QueueId(0))..)
            .next()
            .map(|&(at, _)| at)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

impl FromIterator<(QueueId, u64)> for Schedule {
    fn from_iter<I: IntoIterator<Item = (QueueId, u64)>>(iter: I) -> Self {
        let mut s = Schedule::default();
        for (id, at) in iter {
            s.set(id, at);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_and_next_follow_the_latest_time_of_each_message() {
        let mut s: Schedule = [(QueueId(3), 0), (QueueId(1), 0), (QueueId(2), 500)]
            .into_iter()
            .collect();
        assert_eq!(s.due(100), vec![QueueId(1), QueueId(3)], "oldest first");
        assert_eq!(s.next_after(100), Some(500));
        s.set(QueueId(1), 900); // delivered in part, retried later
        s.remove(QueueId(3)); // left the queue
        assert_eq!(s.due(100), Vec::<QueueId>::new());
        assert_eq!(s.due(500), vec![QueueId(2)]);
        assert_eq!(s.next_after(500), Some(900));
        assert_eq!(s.next_after(900), None);
        assert_eq!(s.len(), 2);
        s.remove(QueueId(7)); // unknown: nothing happens
        assert_eq!(s.len(), 2);
    }
}
