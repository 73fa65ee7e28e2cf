//! A mailbox as the catalog files write it: per-copy states beside the servers
//! they qualify (`home_state`, `{ server, state }` replicas in TOML/JSON, a
//! `=STATE` suffix in CSV), converted to and from the stored [`Mailbox`].

use super::super::model::{Mailbox, ReplicaState};
use serde::{Deserialize, Serialize};

/// A mailbox as TOML and JSON files hold it: replica states inside `replicas`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MailboxItem {
    address: String,
    home: String,
    #[serde(default, skip_serializing_if = "ReplicaState::is_in_service")]
    home_state: ReplicaState,
    #[serde(default)]
    replicas: Vec<ReplicaItem>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    failover: Option<bool>,
}

/// A replica in a file: a server name, or a server with its state.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum ReplicaItem {
    Name(String),
    Stated(StatedReplica),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatedReplica {
    server: String,
    #[serde(default)]
    state: ReplicaState,
}

impl From<MailboxItem> for Mailbox {
    fn from(m: MailboxItem) -> Mailbox {
        let mut replica_states = Vec::new();
        let replicas = m
            .replicas
            .into_iter()
            .map(|r| match r {
                ReplicaItem::Name(n) => n,
                ReplicaItem::Stated(StatedReplica { server, state }) => {
                    if !state.is_in_service() {
                        replica_states.push((server.trim().to_string(), state));
                    }
                    server
                }
            })
            .collect();
        Mailbox {
            address: m.address,
            home: m.home,
            replicas,
            aliases: m.aliases,
            failover: m.failover,
            home_state: m.home_state,
            replica_states,
        }
    }
}

impl From<&Mailbox> for MailboxItem {
    fn from(m: &Mailbox) -> MailboxItem {
        MailboxItem {
            address: m.address.clone(),
            home: m.home.clone(),
            home_state: m.home_state,
            replicas: m
                .replicas
                .iter()
                .map(|r| match m.state_on(r) {
                    ReplicaState::InService => ReplicaItem::Name(r.clone()),
                    state => ReplicaItem::Stated(StatedReplica {
                        server: r.clone(),
                        state,
                    }),
                })
                .collect(),
            aliases: m.aliases.clone(),
            failover: m.failover,
        }
    }
}

/// `NAME` or `NAME=STATE` (a CSV home or replica); the state in service when absent.
pub(super) fn named_state(text: &str) -> Result<(String, ReplicaState), String> {
    match text.split_once('=') {
        None => Ok((text.trim().to_string(), ReplicaState::InService)),
        Some((name, state)) => Ok((name.trim().to_string(), state.parse()?)),
    }
}

/// `NAME`, or `NAME=STATE` when the copy is not in service.
pub(super) fn with_state(name: &str, state: ReplicaState) -> String {
    match state {
        ReplicaState::InService => name.to_string(),
        state => format!("{name}={state}"),
    }
}
