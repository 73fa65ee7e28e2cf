//! The queue manager: takes due messages from the spool, hands each to the
//! delivery half (`deliver`: routing, one transaction per destination server,
//! what each outcome means), and records every outcome durably.
//!
//! Within one pass over a message, a recipient whose server failed before the
//! message data could reach it (cannot connect, greeting, 421, a timeout or lost
//! connection before the data, or a 4xx to MAIL or DATA) is routed again with that
//! server excluded: a failed home fails over to a replica at once, a failed replica
//! gives way to the next one, and with none left the recipient is held. A 4xx to
//! the recipient itself, or the data sent with no reply to it, holds it for a retry
//! later instead. Held recipients are retried on the backoff schedule
//! (`retry_initial` doubling to `retry_max`) on the home server only, unless
//! `retry_failover`. Past `max_queue_lifetime` they fail as expired.
//!
//! Duplicate windows (each can deliver a recipient once more, never lose it):
//! - a crash between a server's reply to the data and the commit of the
//!   recipient's state (committed right after that reply): delivered again after
//!   restart;
//! - the server's reply to the data lost (connection lost, or no reply within
//!   `final_reply_timeout`) after the server stored the message: the recipient is
//!   held and retried later (at its home, as held mail is), never sent elsewhere in
//!   the same attempt.
//!
//! No other crash point or failure repeats or loses a delivery.

mod deliver;

use super::claim::Holder;
use super::{dsn, Envelope, QueueId, RecipientState, Spool};
use crate::catalog::Catalog;
use crate::config::{Live, RoutingConfig};
use crate::health::monitor::SharedTracker;
use anyhow::{anyhow, Result};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Semaphore};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Manager {
    pub spool: Spool,
    pub catalog: Arc<Catalog>,
    pub health: SharedTracker,
    /// Replaced by a reload; each delivery reads it once.
    pub config: Arc<Live<RoutingConfig>>,
    /// Our name in EHLO.
    pub hello_name: String,
    pub deliverer: crate::deliver::Deliverer,
    /// When each queued message next has something to do (ms since the epoch; 0:
    /// now), so that a pass reads only the envelopes that are due. Rebuilt from
    /// the store at start and whenever the spool asks for it.
    pub schedule: std::sync::Mutex<super::schedule::Schedule>,
    /// Closed while this router is not the active unit of its HA pair: no new
    /// deliveries start (those in flight finish).
    pub gate: crate::gate::Gate,
}

impl Manager {
    /// A permanent failure: bounced, or kept as undeliverable for an administrator
    /// when `hold_undeliverable` is set.
    fn failed(&self, reply: String) -> RecipientState {
        let at = now_ms();
        if self.config.get().hold_undeliverable {
            RecipientState::Undeliverable { reply, at }
        } else {
            RecipientState::Failed { reply, at }
        }
    }

    /// The wait before retry number `attempts` of a held recipient.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        let config = self.config.get();
        config
            .retry_initial
            .saturating_mul(1u32 << doublings)
            .min(config.retry_max)
    }

    /// Runs until shutdown: a pass whenever a message arrives, one falls due, or a
    /// delivery finishes. Deliveries run on their own tasks, so a slow server never
    /// holds back mail for the others; on shutdown those in flight may finish
    /// (bounded by `shutdown_wait`).
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        shutdown_wait: Duration,
    ) {
        // Fixed for the run: a reload reports a change as needing a restart.
        let max_deliveries = self.config.get().max_deliveries;
        let limit = Arc::new(Semaphore::new(max_deliveries));
        loop {
            let next = match self.pass(&limit).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "queue pass failed");
                    Some(now_ms() + 1000)
                }
            };
            // Wake for the earliest due recipient, a new message or finished delivery,
            // or shutdown; at least every second.
            let wait = next.map_or(Duration::from_secs(1), |at| {
                Duration::from_millis(at.saturating_sub(now_ms())).min(Duration::from_secs(1))
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.spool.arrival() => {}
                _ = shutdown.changed() => if *shutdown.borrow() {
                    // Every delivery in flight holds a permit: all back means all done.
                    let all = max_deliveries as u32;
                    if tokio::time::timeout(shutdown_wait, limit.acquire_many(all)).await.is_err() {
                        tracing::warn!("deliveries still in flight at shutdown: they will be retried");
                    }
                    self.deliverer.close_all().await;
                    return;
                },
            }
        }
    }

    /// One pass over the queue: starts a delivery task for every message with
    /// something due that is not already in flight; returns when the earliest
    /// recipient left waiting falls due.
    pub async fn pass(self: &Arc<Self>, limit: &Arc<Semaphore>) -> Result<Option<u64>> {
        let now = now_ms();
        if !self.gate.is_active() {
            return Ok(Some(now + 1000));
        }
        if self.spool.take_rescan() {
            let rebuilt: super::schedule::Schedule = self
                .spool
                .envelopes()?
                .iter()
                .filter_map(|e| next_due(e, self.warn_at(e)).map(|at| (e.id, at)))
                .collect();
            *self.schedule() = rebuilt;
        }
        let arrivals = self.spool.take_arrivals();
        let due = {
            let mut schedule = self.schedule();
            for id in arrivals {
                schedule.set(id, 0);
            }
            schedule.due(now)
        };
        for id in due {
            // Held by a delivery or an administrator's command: its holder wakes
            // us when done.
            if self.spool.claims().holder(id).is_some() {
                continue;
            }
            let permit = limit
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| anyhow!("{e}"))?;
            // The claim first, then the envelope: what we deliver is current.
            let Some(claim) = self.spool.claims().try_claim(id, Holder::Delivery) else {
                continue;
            };
            // One message's body that cannot be read now: its delivery waits
            // (a second), the others go on.
            let (env, message) = match self.spool.deliverable(id).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.schedule().remove(id);
                    continue;
                }
                Err(e) => {
                    tracing::error!(%id, error = %e, "queue: message not readable; retried in a second");
                    self.schedule().set(id, now_ms() + 1000);
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let result = me.process(env, &message).await;
                match &result {
                    Ok(Some(at)) => {
                        me.schedule().set(id, *at);
                    }
                    Ok(None) => {
                        me.schedule().remove(id);
                    }
                    // Not at once: a lasting error would spin; a second from now.
                    // (A message removed meanwhile is not re-created: `Removed`,
                    // and the next pass drops it from the schedule.)
                    Err(e) => {
                        tracing::error!(%id, error = %e, "delivery attempt failed");
                        me.schedule().set(id, now_ms() + 1000);
                    }
                }
                drop(claim);
                drop(permit);
                // Held recipients got a new due time: let the manager look again.
                me.spool.nudge();
            });
        }
        Ok(self.schedule().next_after(now))
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, super::schedule::Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Is a delivery of `id` running now?
    pub fn delivering(&self, id: QueueId) -> bool {
        self.spool.claims().holder(id) == Some(Holder::Delivery)
    }

    /// How many deliveries are running now.
    pub fn deliveries_running(&self) -> usize {
        self.spool.claims().deliveries()
    }

    /// Delivers what is due of one message (`message`: its octets as queued);
    /// when it next has something to do (None: it left the queue).
    pub async fn process(&self, mut env: Envelope, message: &[u8]) -> Result<Option<u64>> {
        let id = env.id;
        let now = now_ms();
        let lifetime = self.config.get().max_queue_lifetime;
        let received = env.received_at;
        let due: Vec<usize> = (0..env.recipients.len())
            .filter(|&i| {
                !env.recipients[i].state.is_final() && env.recipients[i].next_attempt <= now
            })
            .collect();
        let (expired, due): (Vec<usize>, Vec<usize>) = due
            .into_iter()
            .partition(|&i| now > env.recipients[i].deadline(received, lifetime));
        // Held by an administrator: never attempted; next looked at when it expires.
        let (on_hold, due): (Vec<usize>, Vec<usize>) = due
            .into_iter()
            .partition(|&i| env.recipients[i].state == RecipientState::OnHold);
        for i in on_hold {
            let r = &mut env.recipients[i];
            r.next_attempt = r.deadline(received, lifetime) + 1;
        }
        for i in expired {
            let r = &mut env.recipients[i];
            let why = format!(
                "4.4.7 expired after {} in the queue; last error: {}",
                humantime::format_duration(self.config.get().max_queue_lifetime),
                r.last_error.as_deref().unwrap_or("none")
            );
            tracing::warn!(%id, rcpt = %r.address, "expired");
            let end = crate::queue::track::What::Failed { reply: why.clone() };
            crate::queue::track::event(self.spool.db(), id, &r.address, end);
            r.state = self.failed(why);
        }
        let (external, catalog): (Vec<usize>, Vec<usize>) = due
            .into_iter()
            .partition(|&i| env.recipients[i].mailbox.is_empty());
        self.deliver_catalog(&mut env, catalog, message).await?;
        self.deliver_external(&mut env, external, message).await?;
        self.bounce(&mut env, message).await?;
        self.warn_delayed(&mut env, message).await?;
        self.commit(&env).await
    }

    /// Queues one bounce (DSN) for every failed recipient not yet reported, then
    /// marks them reported. The bounce is on disk before the marks: a crash between
    /// the two can repeat a bounce, never lose one. No bounce to the null sender.
    async fn bounce(&self, env: &mut Envelope, message: &[u8]) -> Result<()> {
        let failed: Vec<usize> = (0..env.recipients.len())
            .filter(|&i| env.recipients[i].needs_bounce())
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        match env.sender.clone() {
            None => tracing::warn!(id = %env.id, "recipients failed; no bounce to the null sender"),
            Some(sender) => {
                let failures: Vec<dsn::Failure> = failed
                    .iter()
                    .map(|&i| {
                        let r = &env.recipients[i];
                        let reply = match &r.state {
                            RecipientState::Failed { reply, .. } => reply.as_str(),
                            _ => "",
                        };
                        dsn::Failure {
                            address: &r.address,
                            reply,
                        }
                    })
                    .collect();
                let dsn_id = QueueId::new();
                let body = dsn::build(&self.hello_name, dsn_id, env, message, &failures);
                self.queue_report(env, &sender, dsn_id, body).await?;
                crate::metrics::METRICS
                    .recipients_bounced
                    .add(failed.len() as u64);
                tracing::info!(id = %env.id, dsn = %dsn_id, to = %sender, failed = failed.len(), "bounce queued");
            }
        }
        for i in failed {
            env.recipients[i].reported = true;
        }
        Ok(())
    }

    /// When a recipient of `env` not yet warned is owed its delay report (ms
    /// since the epoch); None when `routing.delay_warning` is off.
    fn warn_at(&self, env: &Envelope) -> Option<u64> {
        let after = self.config.get().delay_warning;
        (!after.is_zero()).then(|| env.received_at + after.as_millis() as u64)
    }

    /// Queues one delay report (DSN `Action: delayed`) for the open recipients
    /// still not delivered `routing.delay_warning` after arrival and not yet
    /// warned, then marks them warned (once per recipient; the report is on disk
    /// first). None to the null sender: marked all the same, nothing is owed.
    async fn warn_delayed(&self, env: &mut Envelope, message: &[u8]) -> Result<()> {
        let Some(at) = self.warn_at(env).filter(|&at| now_ms() >= at) else {
            return Ok(());
        };
        let owed: Vec<usize> = (0..env.recipients.len())
            .filter(|&i| {
                let r = &env.recipients[i];
                !r.state.is_final() && !r.delay_reported
            })
            .collect();
        if owed.is_empty() {
            return Ok(());
        }
        if let Some(sender) = env.sender.clone() {
            let lifetime = self.config.get().max_queue_lifetime;
            let delays: Vec<dsn::Delay> = owed
                .iter()
                .map(|&i| {
                    let r = &env.recipients[i];
                    dsn::Delay {
                        address: &r.address,
                        last_error: r.last_error.as_deref(),
                        retry_until: r.deadline(env.received_at, lifetime),
                    }
                })
                .collect();
            let dsn_id = QueueId::new();
            let body = dsn::build_delayed(&self.hello_name, dsn_id, env, message, &delays);
            self.queue_report(env, &sender, dsn_id, body).await?;
            tracing::info!(id = %env.id, dsn = %dsn_id, to = %sender, delayed = owed.len(), since = at, "delay report queued");
        }
        for i in owed {
            env.recipients[i].delay_reported = true;
        }
        Ok(())
    }

    /// Queues report `body` (a DSN about `env`) to `sender` under `dsn_id`, from
    /// the null sender, with our Received header.
    async fn queue_report(
        &self,
        env: &Envelope,
        sender: &str,
        dsn_id: QueueId,
        body: Vec<u8>,
    ) -> Result<()> {
        let header = crate::message::trace::received(&crate::message::trace::Trace {
            helo: &self.hello_name,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            router: &self.hello_name,
            esmtp: true,
            tls: false,
            smtputf8: false,
            id: &dsn_id.to_string(),
            recipients: &[],
            when: SystemTime::now(),
        });
        let mut bytes = header.into_bytes();
        bytes.extend_from_slice(&body);
        let mailbox = self
            .catalog
            .lookup(sender)?
            .map(|l| l.mailbox.address)
            .unwrap_or_default();
        let report = Envelope {
            id: dsn_id,
            sender: None,
            recipients: vec![super::Recipient::new(sender.to_string(), mailbox)],
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: self.hello_name.clone(),
            received_at: now_ms(),
            size: bytes.len() as u64,
            // To a UTF-8 address, or quoting UTF-8 headers (RFC 6531).
            smtputf8: env.smtputf8 || !sender.is_ascii(),
            eight_bit: !bytes.is_ascii(),
        };
        self.spool.enqueue(&report, &bytes).await
    }

    /// Stores the envelope, or removes the message once every recipient is done
    /// (delivered, or failed and reported).
    async fn commit(&self, env: &Envelope) -> Result<Option<u64>> {
        if env.recipients.iter().all(|r| r.is_done()) {
            self.spool.remove(env.id).await?;
            tracing::info!(id = %env.id, "every recipient done: removed from the queue");
            Ok(None)
        } else {
            self.spool.update(env).await?;
            Ok(next_due(env, self.warn_at(env)))
        }
    }
}

/// When `env` next has something to do: now for an unreported failure, else the
/// earliest retry of a recipient still open, or `warn_at` (its delay report) if a
/// recipient still open is not yet warned; None when nothing is left to do.
fn next_due(env: &Envelope, warn_at: Option<u64>) -> Option<u64> {
    if env.recipients.iter().any(|r| r.needs_bounce()) {
        return Some(0);
    }
    let open = env.recipients.iter().filter(|r| !r.state.is_final());
    let retry = open.clone().map(|r| r.next_attempt).min();
    let warn = warn_at.filter(|_| open.clone().any(|r| !r.delay_reported));
    match (retry, warn) {
        (Some(r), Some(w)) => Some(r.min(w)),
        (r, w) => r.or(w),
    }
}
