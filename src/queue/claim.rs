//! Claims: who may change a queued message right now. One holder at a time — a
//! delivery (the queue manager) or an administrator's action — reads the envelope,
//! changes it and writes it back while holding the message's claim, so no one
//! writes back a stale copy over someone else's change. A claim is released when
//! its guard drops; those waiting for it are woken.

use super::QueueId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// What holds a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The queue manager is delivering it.
    Delivery,
    /// An administrator's command is changing it.
    Admin,
}

/// Every claim held in this process. Shared by all clones of a spool.
#[derive(Debug, Default)]
pub struct Claims {
    held: Mutex<HashMap<QueueId, Holder>>,
    released: Notify,
}

/// The right to change one message; released on drop.
#[derive(Debug)]
pub struct Claim {
    claims: Arc<Claims>,
    id: QueueId,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.held().remove(&self.id);
        self.claims.released.notify_waiters();
    }
}

impl Claims {
    fn held(&self) -> MutexGuard<'_, HashMap<QueueId, Holder>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `id` for `holder` unless someone holds it.
    pub fn try_claim(self: &Arc<Self>, id: QueueId, holder: Holder) -> Option<Claim> {
        let mut held = self.held();
        if held.contains_key(&id) {
            return None;
        }
        held.insert(id, holder);
        Some(Claim {
            claims: self.clone(),
            id,
        })
    }

    /// Claims `id`, waiting up to `wait` for its holder to let go; None if it is
    /// still held then.
    pub async fn claim(
        self: &Arc<Self>,
        id: QueueId,
        holder: Holder,
        wait: Duration,
    ) -> Option<Claim> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check: a release in between is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(claim) = self.try_claim(id, holder) {
                return Some(claim);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return None;
            }
        }
    }

    /// Who holds `id`, if anyone.
    pub fn holder(&self, id: QueueId) -> Option<Holder> {
        self.held().get(&id).copied()
    }

    /// How many messages are being delivered now.
    pub fn deliveries(&self) -> usize {
        self.held()
            .values()
            .filter(|&&h| h == Holder::Delivery)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_and_waiters_get_it_on_release() {
        let claims = Arc::new(Claims::default());
        let id = QueueId(7);
        let first = claims.try_claim(id, Holder::Delivery).expect("free");
        assert!(claims.try_claim(id, Holder::Admin).is_none());
        assert_eq!(claims.holder(id), Some(Holder::Delivery));
        assert_eq!(claims.deliveries(), 1);
        // Still held after the wait: refused.
        assert!(claims
            .claim(id, Holder::Admin, Duration::from_millis(20))
            .await
            .is_none());
        let waiter = {
            let claims = claims.clone();
            tokio::spawn(async move {
                claims
                    .claim(id, Holder::Admin, Duration::from_secs(30))
                    .await
                    .is_some()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert!(waiter.await.expect("join"), "the waiter got the claim");
        assert_eq!(claims.holder(id), None, "and released it on drop");
        assert_eq!(claims.deliveries(), 0);
    }
}
