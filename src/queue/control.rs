//! The administrator's actions on queued messages — retry, delete, release,
//! bounce — as one API for the CLI (and later the web console), independent of
//! any output format.
//!
//! Every action holds the message's claim (see `claim`) while it reads, changes
//! and writes the envelope: a message being delivered is waited for (up to the
//! caller's `wait`) and then read afresh, so an action never writes back a stale
//! copy, and a message that left the queue meanwhile is never re-created. The
//! queue manager is woken afterwards to pick up the change.

use super::claim::Holder;
use super::{Envelope, QueueId, Recipient, RecipientState, Spool};
use std::time::Duration;

/// Why an action was not done.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}: no such message in the queue")]
    NoSuchMessage(QueueId),
    #[error(
        "{0}: left the queue (delivered or bounced) while this command waited for its delivery"
    )]
    LeftQueue(QueueId),
    #[error("{0}: being delivered now, still after waiting {1}: try again")]
    InDelivery(QueueId, humantime::Duration),
    #[error("{0}: no undeliverable recipient to {1}")]
    NothingUndeliverable(QueueId, &'static str),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// What `retry --all` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RetriedAll {
    /// Messages made due now.
    pub due: usize,
    /// Messages still being delivered after the wait: left as they are.
    pub in_delivery: Vec<QueueId>,
}

/// The administrator's actions on the queue in `spool`.
#[derive(Clone)]
pub struct Control {
    spool: Spool,
}

/// What an action does to an envelope it holds.
enum Change {
    /// Store the changed envelope.
    Store,
    /// Nothing to store.
    Keep,
    /// Remove the message.
    Remove,
}

impl Control {
    pub fn new(spool: Spool) -> Control {
        Control { spool }
    }

    /// Applies `change` to message `id` under its claim, then wakes the manager.
    /// The envelope is read after the claim is taken: never a stale copy.
    async fn with_message<T>(
        &self,
        id: QueueId,
        wait: Duration,
        change: impl FnOnce(&mut Envelope) -> Result<(Change, T), Refused>,
    ) -> Result<T, Refused> {
        if self.spool.envelope(id)?.is_none() {
            return Err(Refused::NoSuchMessage(id));
        }
        let waited = self.spool.claims().holder(id).is_some();
        let Some(claim) = self.spool.claims().claim(id, Holder::Admin, wait).await else {
            return Err(Refused::InDelivery(id, wait.into()));
        };
        let Some(mut env) = self.spool.envelope(id)? else {
            return Err(if waited {
                Refused::LeftQueue(id)
            } else {
                Refused::NoSuchMessage(id)
            });
        };
        let (what, result) = change(&mut env)?;
        let written = match what {
            Change::Store => self.spool.update(&env).await,
            Change::Remove => self.spool.remove(id).await,
            Change::Keep => Ok(()),
        };
        match written {
            // Removed by a writer that does not claim (an HA push).
            Err(e) if e.is::<super::spool::Removed>() => return Err(Refused::LeftQueue(id)),
            other => other?,
        }
        drop(claim);
        match what {
            Change::Store => self.spool.wake(),
            Change::Remove | Change::Keep => self.spool.nudge(),
        }
        Ok(result)
    }

    /// Makes every open recipient of `id` due now; whether there was any. Held
    /// recipients stay held: their retry goes to the home only.
    pub async fn retry(&self, id: QueueId, wait: Duration) -> Result<bool, Refused> {
        self.with_message(id, wait, |env| {
            Ok(if due_now(env) {
                (Change::Store, true)
            } else {
                (Change::Keep, false)
            })
        })
        .await
    }

    /// `retry` for every queued message. Those being delivered are done last,
    /// each waited for within one overall `wait`; one flush for all.
    pub async fn retry_all(&self, wait: Duration) -> Result<RetriedAll, Refused> {
        let deadline = tokio::time::Instant::now() + wait;
        let claims = self.spool.claims().clone();
        let mut done = RetriedAll::default();
        let mut busy = Vec::new();
        let ids: Vec<QueueId> = self.spool.envelopes()?.iter().map(|e| e.id).collect();
        for id in ids {
            match claims.try_claim(id, Holder::Admin) {
                Some(_claim) => done.due += usize::from(self.retry_held(id)?),
                None => busy.push(id),
            }
        }
        for id in busy {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match claims.claim(id, Holder::Admin, left).await {
                Some(_claim) => done.due += usize::from(self.retry_held(id)?),
                None => done.in_delivery.push(id),
            }
        }
        self.spool.durable().await?;
        self.spool.wake();
        Ok(done)
    }

    /// Makes `id` due now in the store (not yet durable); the caller holds its claim.
    fn retry_held(&self, id: QueueId) -> anyhow::Result<bool> {
        let Some(mut env) = self.spool.envelope(id)? else {
            return Ok(false); // left the queue meanwhile
        };
        if !due_now(&mut env) {
            return Ok(false);
        }
        match self.spool.put(&env) {
            Ok(()) => Ok(true),
            Err(e) if e.is::<super::spool::Removed>() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Drops message `id` from the queue (no bounce).
    pub async fn delete(&self, id: QueueId, wait: Duration) -> Result<(), Refused> {
        self.with_message(id, wait, |_| Ok((Change::Remove, ())))
            .await?;
        tracing::warn!(%id, "deleted from the queue by an administrator");
        Ok(())
    }

    /// Routes the undeliverable recipients of `id` again, with a new `lifetime`
    /// (they had expired, or were refused and the cause may be fixed); how many.
    pub async fn release(
        &self,
        id: QueueId,
        lifetime: Duration,
        wait: Duration,
    ) -> Result<usize, Refused> {
        let expires_at = super::manager::now_ms() + lifetime.as_millis() as u64;
        self.settle_undeliverable(id, wait, "release", move |r, reply, _| {
            r.last_error = Some(reply);
            r.state = RecipientState::Pending;
            r.attempts = 0;
            r.next_attempt = 0;
            r.expires_at = expires_at;
        })
        .await
    }

    /// Fails the undeliverable recipients of `id` now: the bounce goes out; how many.
    pub async fn bounce(&self, id: QueueId, wait: Duration) -> Result<usize, Refused> {
        self.settle_undeliverable(id, wait, "bounce", |r, reply, at| {
            r.state = RecipientState::Failed { reply, at };
        })
        .await
    }

    /// Applies `settle` to each undeliverable recipient of `id`; refused when
    /// there is none. `verb` names the action.
    async fn settle_undeliverable(
        &self,
        id: QueueId,
        wait: Duration,
        verb: &'static str,
        mut settle: impl FnMut(&mut Recipient, String, u64),
    ) -> Result<usize, Refused> {
        self.with_message(id, wait, |env| {
            let mut n = 0;
            for r in &mut env.recipients {
                if let RecipientState::Undeliverable { reply, at } = &r.state {
                    let (reply, at) = (reply.clone(), *at);
                    settle(r, reply, at);
                    n += 1;
                }
            }
            if n == 0 {
                return Err(Refused::NothingUndeliverable(env.id, verb));
            }
            Ok((Change::Store, n))
        })
        .await
    }
}

/// Makes every open recipient due now; whether there was any.
fn due_now(env: &mut Envelope) -> bool {
    let mut touched = false;
    for r in env.recipients.iter_mut().filter(|r| !r.state.is_final()) {
        r.next_attempt = 0;
        touched = true;
    }
    touched
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Recipient;

    fn envelope() -> Envelope {
        let mut r = Recipient::new("r@y.test".into(), "r@y.test".into());
        r.state = RecipientState::Held;
        r.next_attempt = u64::MAX;
        Envelope {
            id: QueueId::new(),
            sender: Some("s@x.test".into()),
            recipients: vec![r],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client".into(),
            received_at: 0,
            size: 4,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[tokio::test]
    async fn actions_wait_for_a_delivery_or_say_so_and_never_touch_a_removed_message() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let spool = Spool::open(&db, dir.path()).unwrap();
        let control = Control::new(spool.clone());
        let (free, busy) = (envelope(), envelope());
        spool.enqueue(&free, b"body").await.unwrap();
        spool.enqueue(&busy, b"body").await.unwrap();
        let delivery = spool.claims().try_claim(busy.id, Holder::Delivery).unwrap();
        let short = Duration::from_millis(30);
        let done = control.retry_all(short).await.unwrap();
        assert_eq!((done.due, done.in_delivery), (1, vec![busy.id]));
        let due = |id| spool.envelope(id).unwrap().unwrap().recipients[0].next_attempt;
        assert_eq!((due(free.id), due(busy.id)), (0, u64::MAX));
        assert!(matches!(
            control.delete(busy.id, Duration::ZERO).await,
            Err(Refused::InDelivery(..))
        ));
        // The delivery removes it (done) while the delete waits.
        let waiting = {
            let control = control.clone();
            tokio::spawn(async move { control.delete(busy.id, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(short).await;
        spool.remove(busy.id).await.unwrap();
        drop(delivery);
        assert!(matches!(waiting.await.unwrap(), Err(Refused::LeftQueue(_))));
        assert_eq!(spool.envelope(busy.id).unwrap(), None, "not re-created");
        assert!(matches!(
            control.bounce(free.id, short).await,
            Err(Refused::NothingUndeliverable(_, "bounce"))
        ));
        control.delete(free.id, short).await.unwrap();
        assert!(matches!(
            control.retry(free.id, short).await,
            Err(Refused::NoSuchMessage(_))
        ));
        assert!(spool.envelopes().unwrap().is_empty());
    }
}
