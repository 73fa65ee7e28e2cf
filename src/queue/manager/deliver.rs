//! The delivery half of the queue manager: routes a message's due catalog
//! recipients (`route::decide`), delivers one transaction per destination, and
//! settles every recipient by its outcome; delivers recipients outside the catalog
//! through the relay host or the domain's MX hosts.
//!
//! Owns what an outcome means ([`next_step`]): delivered; failed; *later* at the
//! same server (a 4xx to the recipient, or the data sent with no reply to it: the
//! server may hold the message, so it never goes elsewhere in this attempt); or
//! *elsewhere now* (the session failed before the data, or the transaction was
//! refused with 4xx before the data: nothing was stored, so a replica may take it).
//! Only a session failure before the data marks a server down.

use super::{now_ms, Manager};
use crate::deliver::mx::{self, Destinations};
use crate::deliver::{Outcome, Sent, Transaction};
use crate::queue::{Envelope, QueueId, Recipient, RecipientState};
use crate::route::{self, Attempt, Decision};
use anyhow::Result;
use std::collections::BTreeMap;

/// What an outcome does to its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Delivered(String),
    Failed(String),
    /// Held: retried after the backoff (at the home, as held mail is).
    Later(String),
    /// Routed again at once with this server excluded.
    Elsewhere(String),
}

pub fn next_step(outcome: Outcome) -> Step {
    match outcome {
        Outcome::Delivered(x) => Step::Delivered(x),
        Outcome::Permanent(x) => Step::Failed(x),
        Outcome::Deferred(x) | Outcome::Unconfirmed(x) => Step::Later(x),
        Outcome::Temporary(x) | Outcome::Unusable(x) => Step::Elsewhere(x),
    }
}

/// One routing round of the open recipients.
#[derive(Default)]
struct Round {
    /// Destination (name, address) → recipients: a catalog server or a next-hop router.
    plan: BTreeMap<(String, String), Vec<usize>>,
    /// Recipient → its decision's kind and reason, for the delivery log line.
    decided: BTreeMap<usize, (&'static str, String)>,
    held: Vec<usize>,
    /// Routed to a server that left the catalog meanwhile: route again.
    retry: Vec<usize>,
}

impl Manager {
    /// One message for one destination.
    fn transaction<'a>(
        &'a self,
        env: &'a Envelope,
        address: &'a str,
        recipients: &'a [String],
        message: &'a [u8],
    ) -> Transaction<'a> {
        let config = self.config.get();
        Transaction {
            server_address: address,
            hello_name: &self.hello_name,
            sender: env.sender.as_deref(),
            recipients,
            message,
            eight_bit: env.eight_bit,
            smtputf8: env.smtputf8,
            timeout: config.delivery_timeout,
            final_timeout: config.final_reply_timeout,
            tls: Default::default(),
            tls_name: None,
        }
    }

    /// A delivery attempt's log line and tracking record (with the recipient's
    /// end when the attempt settled it).
    fn attempted(&self, id: QueueId, rcpt: &str, at: &Attempted<'_>, o: &Outcome) {
        use crate::queue::track::{events, What};
        log_attempt(id, rcpt, at, o);
        let attempt = What::Attempt {
            server: at.server.to_string(),
            decision: at.kind.to_string(),
            outcome: o.name().to_string(),
            reply: o.reply().to_string(),
            tls: at.tls.map(str::to_string),
        };
        let end = match o {
            Outcome::Delivered(_) => Some(What::Delivered {
                server: at.server.to_string(),
            }),
            Outcome::Permanent(reply) => Some(What::Failed {
                reply: reply.clone(),
            }),
            _ => None,
        };
        events(
            self.spool.db(),
            id,
            rcpt,
            std::iter::once(attempt).chain(end),
        );
    }

    /// Keeps a recipient for a retry after the backoff.
    fn hold(&self, r: &mut Recipient) {
        r.state = RecipientState::Held;
        r.attempts += 1;
        r.next_attempt = now_ms() + self.backoff(r.attempts).as_millis() as u64;
    }

    /// Routes and delivers recipients that are catalog mailboxes.
    pub(super) async fn deliver_catalog(
        &self,
        env: &mut Envelope,
        due: Vec<usize>,
        message: &[u8],
    ) -> Result<()> {
        let mut skip: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut open = due;
        // Each round routes the open recipients again with the servers that failed
        // them excluded; rounds end when everyone is delivered, failed or held.
        while !open.is_empty() {
            let round = self.route_round(env, &open, &mut skip)?;
            for &i in &round.held {
                self.hold(&mut env.recipients[i]);
            }
            open = round.retry;
            for ((server, address), idxs) in round.plan {
                let recipients: Vec<String> = idxs
                    .iter()
                    .map(|&i| env.recipients[i].address.clone())
                    .collect();
                // A catalog server's STARTTLS setting (a next hop: opportunistic).
                let srv = self.catalog.server(&server);
                let mut t = self.transaction(env, &address, &recipients, message);
                if let Some(srv) = &srv {
                    t.tls = srv.tls;
                    t.tls_name = srv.tls_name.as_deref();
                }
                let sent = self.deliverer.send(&t).await;
                if self.config.get().fallback_relay.as_deref() != Some(server.as_str()) {
                    self.feed_health(&server, &sent);
                }
                for (&i, outcome) in idxs.iter().zip(sent.outcomes) {
                    let (kind, reason) = round.decided.get(&i).cloned().unwrap_or_default();
                    let at = Attempted {
                        server: &server,
                        kind,
                        why: &reason,
                        tls: sent.tls.as_deref(),
                    };
                    self.attempted(env.id, &env.recipients[i].address, &at, &outcome);
                    if self.settle(&mut env.recipients[i], &server, outcome) {
                        skip.entry(i).or_default().push(server.clone());
                        open.push(i);
                    }
                }
                // Commit right after the server's answer: the crash window.
                // (A message now done is removed by `commit` instead: one
                // flush, not two.)
                if !env.recipients.iter().all(|r| r.is_done()) {
                    self.spool.update(env).await?;
                }
            }
        }
        Ok(())
    }

    /// What a delivery says about the server: a session failure before the data
    /// marks it down; otherwise MAIL's response time feeds its index. No answer
    /// inside the transaction costs it points (see `Tracker::responded`).
    fn feed_health(&self, server: &str, sent: &Sent) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Outcome::Unusable(why)) = sent
            .outcomes
            .iter()
            .find(|o| matches!(o, Outcome::Unusable(_)))
        {
            health.delivery_failed(server, why);
        } else if let Some(rtt) = sent.response {
            health.responded(server, rtt);
        }
    }

    /// Applies an outcome to its recipient; true when it is to be routed again now.
    fn settle(&self, r: &mut Recipient, server: &str, outcome: Outcome) -> bool {
        match next_step(outcome) {
            Step::Delivered(reply) => {
                crate::metrics::METRICS.recipients_delivered.inc();
                r.state = RecipientState::Delivered {
                    server: server.to_string(),
                    reply,
                    at: now_ms(),
                };
                false
            }
            Step::Failed(reply) => {
                r.state = self.failed(reply);
                false
            }
            Step::Later(reply) => {
                r.last_error = Some(format!("{server}: {reply}"));
                self.hold(r);
                false
            }
            Step::Elsewhere(reply) => {
                r.last_error = Some(format!("{server}: {reply}"));
                true
            }
        }
    }

    /// Routes each open recipient, excluding the servers that failed it.
    fn route_round(
        &self,
        env: &mut Envelope,
        open: &[usize],
        skip: &mut BTreeMap<usize, Vec<String>>,
    ) -> Result<Round> {
        let (id, env_received) = (env.id, env.received_at);
        let config = self.config.get();
        let policy = config.policy();
        let mut round = Round::default();
        for &i in open {
            let r = &mut env.recipients[i];
            let Some(entry) = self.catalog.lookup(&r.mailbox)? else {
                r.state = self.failed(format!(
                    "5.1.1 mailbox {} is no longer in the catalog",
                    r.mailbox
                ));
                continue;
            };
            // Tried before (held, or paused or on hold after a hold): a retry.
            let attempt = if r.attempts > 0 {
                Attempt::Retry
            } else {
                Attempt::First
            };
            let avail = |s: &crate::catalog::Server| {
                self.health.lock().unwrap_or_else(|e| e.into_inner()).of(s)
            };
            let skipped = skip.get(&i).map(Vec::as_slice).unwrap_or(&[]);
            let routers = self
                .catalog
                .cluster(&entry.home.cluster)?
                .map(|c| c.routers)
                .unwrap_or_default();
            let route = route::decide(&entry, &avail, &policy, attempt, skipped, &routers);
            if let Some(server) = self.paused_server(&entry, &route.decision) {
                self.pause(r, &server, id, env_received);
                continue;
            }
            let age = std::time::Duration::from_millis(now_ms().saturating_sub(env_received));
            let relay = config.fallback_relay.as_deref();
            let route = route::fallback(route, age, relay, config.fallback_after, skipped);
            let kind = count_decision(id, &r.address, &route, relay);
            if let Decision::Hold = route.decision {
                let held = crate::queue::track::What::Held {
                    why: route.reason.clone(),
                };
                crate::queue::track::event(self.spool.db(), id, &r.address, held);
            }
            round.decided.insert(i, (kind, route.reason.clone()));
            r.last_route = Some(route.why());
            match route.decision {
                Decision::Home(s) | Decision::Replica(s) => match self.catalog.server(&s) {
                    Some(srv) => round.plan.entry((s, srv.address)).or_default().push(i),
                    None => {
                        skip.entry(i).or_default().push(s);
                        round.retry.push(i);
                    }
                },
                Decision::NextHop(router) => round
                    .plan
                    .entry((router.clone(), router))
                    .or_default()
                    .push(i),
                Decision::Hold => round.held.push(i),
            }
        }
        Ok(round)
    }

    /// Keeps `r` waiting for its paused `server`: looked at again when it
    /// expires, or when the server is resumed.
    fn pause(&self, r: &mut Recipient, server: &str, id: QueueId, received_at: u64) {
        r.state = RecipientState::Paused;
        r.next_attempt = r.deadline(received_at, self.config.get().max_queue_lifetime) + 1;
        r.last_route = Some(format!(
            "wait: server {server} is paused by an administrator (no failover)"
        ));
        tracing::info!(%id, rcpt = %r.address, %server, "paused: waits for its server");
    }

    /// The paused server that `decision` for `entry` would use: its home when
    /// paused (no failover: the administrator chose to wait), else the server
    /// decided on. None: deliver as decided.
    fn paused_server(&self, entry: &crate::catalog::Lookup, decision: &Decision) -> Option<String> {
        let pauses = self.spool.pauses();
        if pauses.is_paused(&entry.home.name) {
            return Some(entry.home.name.clone());
        }
        match decision {
            Decision::Home(s) | Decision::Replica(s) if pauses.is_paused(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Delivers recipients outside the catalog (bounces to outside senders) through
    /// the relay host or the domain's MX hosts, each host in preference order until
    /// one answers the transaction; a failed DNS lookup or no answer: retry later.
    pub(super) async fn deliver_external(
        &self,
        env: &mut Envelope,
        due: Vec<usize>,
        message: &[u8],
    ) -> Result<()> {
        for i in due {
            let address = env.recipients[i].address.clone();
            let domain = address.rsplit_once('@').map_or("", |(_, d)| d).to_string();
            let relay_host = self.config.get().relay_host.clone();
            let targets = match mx::destinations(&domain, relay_host.as_deref()).await {
                Destinations::Hosts(t) => t,
                Destinations::Fail(reply) => {
                    tracing::info!(id = %env.id, rcpt = %address, decision = %"external", outcome = %"failed", reply = %reply, "delivery attempt");
                    env.recipients[i].state = self.failed(reply);
                    continue;
                }
                Destinations::Defer(why) => {
                    env.recipients[i].last_error = Some(why);
                    Vec::new()
                }
            };
            let mut settled = false;
            for target in targets {
                let recipients = [address.clone()];
                let sent = self
                    .deliverer
                    .send(&self.transaction(env, &target, &recipients, message))
                    .await;
                let Some(outcome) = sent.outcomes.first().cloned() else {
                    continue;
                };
                let at = Attempted {
                    server: &target,
                    kind: "external",
                    why: "",
                    tls: sent.tls.as_deref(),
                };
                self.attempted(env.id, &address, &at, &outcome);
                let r = &mut env.recipients[i];
                if let Step::Elsewhere(why) = next_step(outcome.clone()) {
                    r.last_error = Some(format!("{target}: {why}"));
                    continue;
                }
                self.settle(r, &target, outcome);
                settled = true;
                break;
            }
            let r = &mut env.recipients[i];
            if !settled {
                self.hold(r);
            }
            if !r.state.is_final() {
                r.last_route = Some(format!(
                    "outside the catalog: via {}",
                    relay_host.as_deref().unwrap_or("the domain's MX hosts")
                ));
            }
            self.spool.update(env).await?;
        }
        Ok(())
    }
}

/// The kind of a decision for the log and the metrics (counted here); a
/// transfer to the fallback `relay` is `fallback`.
fn count_decision(
    id: QueueId,
    rcpt: &str,
    route: &route::Route,
    relay: Option<&str>,
) -> &'static str {
    let m = &crate::metrics::METRICS;
    match &route.decision {
        Decision::NextHop(r) if Some(r.as_str()) == relay => {
            tracing::info!(%id, %rcpt, decision = %"fallback", why = %route.reason, "to the fallback relay");
            "fallback"
        }
        Decision::Home(_) => {
            m.decided_home.inc();
            "home"
        }
        Decision::Replica(_) => {
            m.decided_replica.inc();
            "replica"
        }
        Decision::NextHop(_) => {
            m.decided_next_hop.inc();
            "next-hop"
        }
        Decision::Hold => {
            m.decided_hold.inc();
            m.recipients_held.inc();
            tracing::info!(%id, %rcpt, decision = %"hold", why = %route.reason, "held");
            "hold"
        }
    }
}

/// Where and how a recipient's delivery was attempted, for its log line.
struct Attempted<'a> {
    server: &'a str,
    kind: &'a str,
    why: &'a str,
    /// The TLS version used; None: plain text.
    tls: Option<&'a str>,
}

/// The `delivery attempt` log line (with `tls=TLSv1.3` or `tls=none`): a warning
/// when the server failed or left the outcome unknown.
fn log_attempt(id: QueueId, rcpt: &str, a: &Attempted<'_>, o: &Outcome) {
    let (outcome, reply) = (o.name(), o.reply());
    let (server, kind, why) = (a.server, a.kind, a.why);
    let tls = a.tls.unwrap_or("none");
    if matches!(o, Outcome::Unusable(_) | Outcome::Unconfirmed(_)) {
        tracing::warn!(%id, %rcpt, %server, decision = %kind, %why, %outcome, %reply, %tls, "delivery attempt");
    } else {
        tracing::info!(%id, %rcpt, %server, decision = %kind, %why, %outcome, %reply, %tls, "delivery attempt");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_before_the_data_go_elsewhere_now() {
        let s = |x: &str| x.to_string();
        assert_eq!(
            next_step(Outcome::Delivered(s("250"))),
            Step::Delivered(s("250"))
        );
        assert_eq!(
            next_step(Outcome::Permanent(s("550"))),
            Step::Failed(s("550"))
        );
        assert_eq!(
            next_step(Outcome::Deferred(s("452"))),
            Step::Later(s("452"))
        );
        assert_eq!(
            next_step(Outcome::Unconfirmed(s("timeout"))),
            Step::Later(s("timeout")),
            "data sent without a reply: never elsewhere in this attempt"
        );
        assert_eq!(
            next_step(Outcome::Temporary(s("451"))),
            Step::Elsewhere(s("451"))
        );
        assert_eq!(
            next_step(Outcome::Unusable(s("refused"))),
            Step::Elsewhere(s("refused"))
        );
    }
}
