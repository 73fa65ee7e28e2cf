//! Queue views (Domino's `show queues`, Postfix's `qshape`): which queued
//! messages a `queue list` filter selects, and the `queue summary` counts of open
//! recipients by destination server, state and age. Pure: the caller streams the
//! envelopes (see `Spool::scan_after`) and says where each recipient is bound.

use super::{Envelope, Recipient, RecipientState};
use std::collections::BTreeMap;

/// The state names of the views, one per concept: `held` is the routing state
/// (retrying the home), `on-hold` the administrator's hold of a message.
pub const STATES: [&str; 5] = ["pending", "held", "paused", "on-hold", "undeliverable"];

/// A recipient's state in the views; None once it left the queue's care
/// (delivered, or failed: its bounce is queued).
pub fn state_name(s: &RecipientState) -> Option<&'static str> {
    match s {
        RecipientState::Pending => Some("pending"),
        RecipientState::Held => Some("held"),
        RecipientState::Paused => Some("paused"),
        RecipientState::OnHold => Some("on-hold"),
        RecipientState::Undeliverable { .. } => Some("undeliverable"),
        RecipientState::Delivered { .. } | RecipientState::Failed { .. } => None,
    }
}

/// The age buckets of `queue summary`, in ms, and their column names.
pub const BUCKETS: [(u64, &str); 4] = [
    (5 * 60_000, "<5m"),
    (3_600_000, "<1h"),
    (4 * 3_600_000, "<4h"),
    (24 * 3_600_000, "<1d"),
];

/// The bucket of a message `age_ms` old: an index into [`BUCKETS`], or
/// `BUCKETS.len()` for older.
pub fn bucket(age_ms: u64) -> usize {
    BUCKETS
        .iter()
        .position(|&(limit, _)| age_ms < limit)
        .unwrap_or(BUCKETS.len())
}

/// What `queue list` selects: a message matches when it passes the message
/// filters (`from`, `older_than`) and one of its open recipients passes all the
/// recipient filters (`server`, `state`, `to`). Addresses compare without case.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub server: Option<String>,
    pub state: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Only messages that arrived at least this long ago (ms).
    pub older_than_ms: Option<u64>,
}

impl Filter {
    /// Whether the filter needs each recipient's destination server.
    pub fn needs_server(&self) -> bool {
        self.server.is_some()
    }

    /// Does `env` match at `now`? `server_of` gives a recipient's destination.
    pub fn matches(
        &self,
        env: &Envelope,
        now: u64,
        server_of: &mut dyn FnMut(&Recipient) -> String,
    ) -> bool {
        if let Some(from) = &self.from {
            if !env
                .sender
                .as_deref()
                .unwrap_or("")
                .eq_ignore_ascii_case(from.trim_matches(['<', '>']))
            {
                return false;
            }
        }
        if let Some(older) = self.older_than_ms {
            if now.saturating_sub(env.received_at) < older {
                return false;
            }
        }
        env.recipients.iter().any(|r| {
            let Some(state) = state_name(&r.state) else {
                return false;
            };
            self.state.as_deref().is_none_or(|s| s == state)
                && self
                    .to
                    .as_deref()
                    .is_none_or(|t| r.address.eq_ignore_ascii_case(t.trim_matches(['<', '>'])))
                && self
                    .server
                    .as_deref()
                    .is_none_or(|s| server_of(r).eq_ignore_ascii_case(s))
        })
    }
}

/// `queue summary`: open recipients by (destination server, state), each row
/// counted by age bucket (the last column: older than a day).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub rows: BTreeMap<(String, &'static str), [usize; BUCKETS.len() + 1]>,
    pub messages: usize,
}

impl Summary {
    /// Counts the open recipients of `env` at `now`.
    pub fn add(
        &mut self,
        env: &Envelope,
        now: u64,
        server_of: &mut dyn FnMut(&Recipient) -> String,
    ) {
        let b = bucket(now.saturating_sub(env.received_at));
        let mut any = false;
        for r in &env.recipients {
            if let Some(state) = state_name(&r.state) {
                self.rows.entry((server_of(r), state)).or_default()[b] += 1;
                any = true;
            }
        }
        self.messages += usize::from(any);
    }

    /// The per-bucket totals of every row.
    pub fn totals(&self) -> [usize; BUCKETS.len() + 1] {
        let mut t = [0; BUCKETS.len() + 1];
        for row in self.rows.values() {
            for (t, n) in t.iter_mut().zip(row) {
                *t += n;
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueId;

    fn env(sender: &str, received_at: u64, rcpts: &[(&str, RecipientState)]) -> Envelope {
        Envelope {
            id: QueueId::new(),
            sender: Some(sender.into()),
            recipients: rcpts
                .iter()
                .map(|(a, s)| {
                    let mut r = Recipient::new(a.to_string(), a.to_string());
                    r.state = s.clone();
                    r
                })
                .collect(),
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "c".into(),
            received_at,
            size: 1,
            smtputf8: false,
            eight_bit: false,
        }
    }

    fn home(r: &Recipient) -> String {
        if r.address.starts_with('u') {
            "m1"
        } else {
            "m2"
        }
        .into()
    }

    #[test]
    fn a_filter_needs_one_recipient_passing_every_recipient_filter() {
        let now = 10 * 3_600_000;
        let e = env(
            "A@x.test",
            now - 2 * 3_600_000,
            &[
                ("u@c.test", RecipientState::Held),
                ("v@c.test", RecipientState::Paused),
            ],
        );
        let m = |f: Filter| f.matches(&e, now, &mut home);
        assert!(m(Filter::default()));
        assert!(m(Filter {
            from: Some("<a@X.test>".into()),
            ..Default::default()
        }));
        assert!(!m(Filter {
            from: Some("b@x.test".into()),
            ..Default::default()
        }));
        assert!(m(Filter {
            server: Some("m2".into()),
            state: Some("paused".into()),
            ..Default::default()
        }));
        assert!(
            !m(Filter {
                server: Some("m1".into()),
                state: Some("paused".into()),
                ..Default::default()
            }),
            "u is held on m1, v paused on m2: no one recipient is both"
        );
        assert!(m(Filter {
            to: Some("U@c.test".into()),
            state: Some("held".into()),
            ..Default::default()
        }));
        assert!(m(Filter {
            older_than_ms: Some(3_600_000),
            ..Default::default()
        }));
        assert!(!m(Filter {
            older_than_ms: Some(3 * 3_600_000),
            ..Default::default()
        }));
        let delivered = env(
            "a@x.test",
            now,
            &[(
                "u@c.test",
                RecipientState::Delivered {
                    server: "m1".into(),
                    reply: "250".into(),
                    at: 0,
                },
            )],
        );
        assert!(
            !Filter::default().matches(&delivered, now, &mut home),
            "nothing open"
        );
    }

    #[test]
    fn the_summary_counts_open_recipients_by_server_state_and_age() {
        let now = 100 * 3_600_000;
        let mut s = Summary::default();
        s.add(
            &env(
                "a@x.test",
                now - 60_000,
                &[("u@c.test", RecipientState::Paused)],
            ),
            now,
            &mut home,
        );
        s.add(
            &env(
                "a@x.test",
                now - 2 * 3_600_000,
                &[
                    ("u@c.test", RecipientState::Paused),
                    ("v@c.test", RecipientState::OnHold),
                ],
            ),
            now,
            &mut home,
        );
        s.add(
            &env(
                "a@x.test",
                now - 48 * 3_600_000,
                &[("v@c.test", RecipientState::OnHold)],
            ),
            now,
            &mut home,
        );
        assert_eq!(s.messages, 3);
        assert_eq!(s.rows[&("m1".to_string(), "paused")], [1, 0, 1, 0, 0]);
        assert_eq!(s.rows[&("m2".to_string(), "on-hold")], [0, 0, 1, 0, 1]);
        assert_eq!(s.totals(), [1, 0, 2, 0, 1]);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(5 * 60_000), 1);
        assert_eq!(bucket(24 * 3_600_000), 4);
    }
}
