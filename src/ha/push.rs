//! The queue push: a SLAVE hands every message it holds to the MASTER, which
//! queues it durably and answers `Stored`; only then does the SLAVE remove it.
//!
//! Exactly once: the MASTER counts a pushed message as already stored only when
//! it is the very same message, id **and** digest of envelope and content
//! ([`crate::queue::tombstone`]), and it remembers every message it took this way
//! (tombstones, 7 days) in the same atomic write as its copy. A push repeated
//! after a lost answer or a crash of the SLAVE before its local remove is answered
//! `Stored` without queueing it again, even long after it was delivered.
//!
//! No relay path: each pushed recipient passes the relay policy of SMTP RCPT
//! ([`admit`]). A catalog address is delivered as usual; an outside address only
//! as the recipient of a delivery report made by clustermail (the bounce of a
//! message the pair accepted); any other is refused, logged and bounced.

use super::link::{Link, Msg};
use super::Ha;
use crate::queue::tombstone::{self, Tombstones};
use crate::queue::{Envelope, QueueId, RecipientState};
use crate::smtp::address::parse_path;
use crate::smtp::policy::CatalogPolicy;
use crate::smtp::session::{RecipientPolicy, Verdict};
use anyhow::Result;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What becomes of one pushed recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Already delivered or failed on the SLAVE: kept as it is.
    Keep,
    /// A catalog mailbox (its primary address, from this unit's catalog).
    Mailbox(String),
    /// Outside the catalog, as the recipient of a bounce: delivered outside.
    Outside,
    /// Refused by the relay policy: fails with this reply (then bounced).
    Refuse(String),
}

/// A delivery report made by clustermail's bounce (`queue::dsn`): null sender,
/// one recipient, a `multipart/report` naming the queue id it reports on.
fn is_bounce(env: &Envelope, message: &[u8]) -> bool {
    let has = |needle: &[u8]| message.windows(needle.len()).any(|w| w == needle);
    env.sender.is_none()
        && env.recipients.len() == 1
        && has(b"report-type=delivery-status")
        && has(b"\r\nX-Clustermail-Queue-ID: ")
}

/// Judges every recipient of a pushed message as SMTP RCPT would. Err: the
/// catalog could not be read (the push is refused and repeated later).
pub fn admit(
    policy: &dyn RecipientPolicy,
    env: &Envelope,
    message: &[u8],
) -> Result<Vec<Admit>, String> {
    let bounce = is_bounce(env, message);
    env.recipients
        .iter()
        .map(|r| {
            if r.state.is_final() {
                return Ok(Admit::Keep);
            }
            let verdict = match parse_path(&format!("<{}>", r.address)) {
                Ok((Some(m), "")) => policy.check(&m),
                _ => Verdict::RelayDenied("not a valid address"),
            };
            Ok(match verdict {
                Verdict::Accept(mailbox) => Admit::Mailbox(mailbox),
                Verdict::TempFail => return Err("catalog lookup failed".to_string()),
                _ if bounce => Admit::Outside,
                Verdict::UnknownUser => Admit::Refuse(format!(
                    "550 5.1.1 <{}>: pushed by the HA peer, no such mailbox in the catalog",
                    r.address
                )),
                Verdict::RelayDenied(why) => Admit::Refuse(format!(
                    "550 5.7.1 <{}>: pushed by the HA peer, relaying denied: {why}",
                    r.address
                )),
            })
        })
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How the MASTER took a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// Queued now under this id, with this many recipients refused.
    Queued(QueueId, usize),
    /// The very same message was taken before (as this id): not queued again.
    Again(QueueId),
}

impl Ha {
    /// As MASTER: queues a pushed message (durably, with its tombstone), unless
    /// it is the very same message as one taken before.
    pub(super) async fn store_pushed(&self, mut env: Envelope, message: &[u8]) -> Result<Taken> {
        let pushed = env.id;
        let digest = tombstone::digest(&env, message);
        if let Some(local) = self.tombstones.find(pushed, &digest)? {
            return Ok(Taken::Again(local));
        }
        // Here under the same id: the same message only if the digest matches.
        if let Some(have) = self.spool.envelope(pushed)? {
            let same = self
                .spool
                .message(pushed)?
                .is_some_and(|m| tombstone::digest(&have, &m) == digest);
            if same {
                return Ok(Taken::Again(pushed));
            }
            env.id = QueueId::new();
        }
        let policy = CatalogPolicy {
            catalog: self.catalog.clone(),
        };
        let admitted = admit(&policy, &env, message).map_err(|e| anyhow::anyhow!(e))?;
        let now = now_ms();
        let mut refused = 0;
        for (r, a) in env.recipients.iter_mut().zip(admitted) {
            match a {
                Admit::Keep => continue,
                Admit::Mailbox(m) => r.mailbox = m,
                Admit::Outside => r.mailbox = String::new(),
                Admit::Refuse(reply) => {
                    tracing::warn!(id = %pushed, rcpt = %r.address, %reply, "HA: pushed recipient refused by the relay policy: bounced, not relayed");
                    r.state = RecipientState::Failed { reply, at: now };
                    r.reported = false;
                    refused += 1;
                    continue;
                }
            }
            if matches!(r.state, RecipientState::Pending | RecipientState::Held) {
                r.next_attempt = now;
            }
        }
        let e = Tombstones::entry(pushed, &digest, env.id, now);
        self.spool
            .enqueue_recorded(&env, message, self.tombstones.tree(), &e.key, &e.value)
            .await?;
        Ok(Taken::Queued(env.id, refused))
    }

    /// As MASTER: answers a push.
    pub(super) async fn answer_push(&self, env: Envelope, message: Vec<u8>) -> Msg {
        let pushed = env.id;
        match self.store_pushed(env, &message).await {
            Ok(Taken::Queued(id, refused)) => {
                self.status().refused += refused as u64;
                tracing::info!(%id, pushed = %pushed, refused, "HA: message pushed by the peer queued");
                Msg::Stored
            }
            Ok(Taken::Again(id)) => {
                self.status().repeats += 1;
                tracing::info!(%id, pushed = %pushed, "HA: repeated push of a message already taken: not queued again");
                Msg::Stored
            }
            Err(e) => Msg::Refused(format!("queueing failed: {e:#}")),
        }
    }

    /// As SLAVE: pushes queued messages to the MASTER, for at most a heartbeat
    /// interval (the next tick goes on); never one being delivered.
    ///
    /// A message is *in doubt* while its push is unanswered: the MASTER may have
    /// stored it. So before it is sent, it is recorded here as a tombstone, as if
    /// this unit had taken it from a push; the record goes when `Stored` comes.
    /// If the answer is lost and the roles change before the push is repeated,
    /// this unit delivers its own copy as MASTER, and the copy the other unit
    /// stored, pushed back here later, is recognised and not delivered again.
    pub(super) async fn push(&self, l: &mut Link) -> Result<()> {
        let manager = self
            .manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let envelopes = self.spool.envelopes()?;
        self.status().push_left = envelopes.len() as u64;
        if envelopes.is_empty() {
            return Ok(());
        }
        if manager.as_ref().is_some_and(|m| m.deliveries_running() > 0) {
            return Ok(()); // deliveries from our MASTER days are finishing
        }
        let deadline = tokio::time::Instant::now() + self.config.heartbeat_interval;
        for env in envelopes {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            if manager.as_ref().is_some_and(|m| m.delivering(env.id)) {
                continue;
            }
            let Some(message) = self.spool.message(env.id)? else {
                continue;
            };
            let id = env.id;
            // In doubt from now until the answer: see `push`'s doc.
            let doubt = Tombstones::entry(id, &tombstone::digest(&env, &message), id, now_ms());
            self.tombstones.tree().insert(&doubt.key, doubt.value)?;
            self.spool.durable().await?;
            let push = Msg::Push {
                envelope: env,
                message,
            };
            match l.call(&push, Duration::from_secs(60)).await? {
                Msg::Stored => {
                    // The record first: a crash between the two removals can
                    // repeat the message (a duplicate), never lose it.
                    self.tombstones.tree().remove(&doubt.key)?;
                    self.spool.remove(id).await?;
                    let mut s = self.status();
                    s.pushed += 1;
                    s.push_left = s.push_left.saturating_sub(1);
                    s.push_error = None;
                    if s.push_left == 0 {
                        let pushed = s.pushed;
                        s.event(format!(
                            "queue push finished: {pushed} pushed to the MASTER"
                        ));
                    }
                    drop(s);
                    tracing::info!(%id, "HA: message pushed to the MASTER and removed here");
                }
                Msg::Refused(why) => {
                    let mut s = self.status();
                    if s.push_error.as_ref() != Some(&why) {
                        s.event(format!("queue push refused by the MASTER: {why}"));
                    }
                    s.push_error = Some(why);
                    break;
                }
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Recipient;
    use crate::smtp::address::Mailbox;

    /// Catalog: alice@ours.test only.
    struct Policy;
    impl RecipientPolicy for Policy {
        fn check(&self, m: &Mailbox) -> Verdict {
            if let Some(t) = m.relay_trick() {
                return Verdict::RelayDenied(t);
            }
            match (m.local.as_str(), m.domain.as_str()) {
                ("alice", "ours.test") => Verdict::Accept("alice@ours.test".into()),
                ("broken", "ours.test") => Verdict::TempFail,
                (_, "ours.test") => Verdict::UnknownUser,
                _ => Verdict::RelayDenied("this relay serves no such domain"),
            }
        }
    }

    fn env(sender: Option<&str>, rcpts: &[&str]) -> Envelope {
        Envelope {
            id: QueueId(1),
            sender: sender.map(str::to_string),
            recipients: rcpts
                .iter()
                .map(|a| Recipient::new(a.to_string(), a.to_string()))
                .collect(),
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "h".into(),
            received_at: 0,
            size: 0,
            smtputf8: false,
            eight_bit: false,
        }
    }

    const DSN: &[u8] = b"Received: x\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n\r\n--b\r\nReporting-MTA: dns; r\r\nX-Clustermail-Queue-ID: 0000000000000001\r\n";

    #[test]
    fn pushed_recipients_pass_the_relay_policy() {
        let e = env(
            Some("s@x.test"),
            &[
                "alice@ours.test",
                "nobody@ours.test",
                "victim@far.test",
                "a%b@ours.test",
            ],
        );
        let got = admit(&Policy, &e, b"Subject: hi\r\n\r\n").unwrap();
        assert_eq!(got[0], Admit::Mailbox("alice@ours.test".into()));
        assert!(
            matches!(&got[1], Admit::Refuse(r) if r.starts_with("550 5.1.1")),
            "{got:?}"
        );
        assert!(
            matches!(&got[2], Admit::Refuse(r) if r.starts_with("550 5.7.1")),
            "{got:?}"
        );
        assert!(
            matches!(&got[3], Admit::Refuse(r) if r.starts_with("550 5.7.1")),
            "{got:?}"
        );
    }

    #[test]
    fn an_outside_recipient_passes_only_as_the_recipient_of_a_bounce() {
        assert_eq!(
            admit(&Policy, &env(None, &["victim@far.test"]), DSN).unwrap(),
            [Admit::Outside]
        );
        // The same report from a real sender, or to two recipients: refused.
        for e in [
            env(Some("s@x.test"), &["victim@far.test"]),
            env(None, &["victim@far.test", "other@far.test"]),
        ] {
            let got = admit(&Policy, &e, DSN).unwrap();
            assert!(got.iter().all(|a| matches!(a, Admit::Refuse(_))), "{got:?}");
        }
        // A null-sender message that is no report: refused.
        let got = admit(
            &Policy,
            &env(None, &["victim@far.test"]),
            b"Subject: x\r\n\r\n",
        )
        .unwrap();
        assert!(matches!(&got[0], Admit::Refuse(_)), "{got:?}");
    }

    #[test]
    fn settled_recipients_are_kept_and_a_catalog_failure_refuses_the_push() {
        let mut e = env(Some("s@x.test"), &["victim@far.test"]);
        e.recipients[0].state = RecipientState::Delivered {
            server: "m".into(),
            reply: "250".into(),
            at: 1,
        };
        assert_eq!(admit(&Policy, &e, b"").unwrap(), [Admit::Keep]);
        assert!(admit(&Policy, &env(Some("s@x.test"), &["broken@ours.test"]), b"").is_err());
    }
}
