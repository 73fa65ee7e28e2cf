//! The one adapter between the console and the router's administration code:
//! every page and API call goes through here, and every action runs the same
//! command the CLI and the admin socket run ([`crate::admin::execute`]), its text captured.
//! Re-point a function here and both the HTML pages and the API follow.

use crate::admin::routes::ServerRow;
use crate::admin::Context;
use crate::admin::Exit;
use crate::catalog::{AdminState, Format};
use crate::cli::{self, CatalogCommand, Command, HaCommand, HaSetMode, QueueCommand};
use crate::queue::{Envelope, QueueId, RecipientState};
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;

/// What a command printed, and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub ok: bool,
    /// 0 ok, 1 failed, 2 invalid input (the CLI's exit status).
    pub exit: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The text to show a person: what it printed, problems included.
    pub fn text(&self) -> String {
        let mut t = self.stdout.clone();
        t.push_str(&self.stderr);
        t.trim_end().to_string()
    }
}

/// Runs `command` as the CLI would against the running router.
pub async fn run(ctx: &Context, command: Command) -> Outcome {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = match crate::admin::execute(ctx, command, &mut out, &mut err).await {
        Ok(e) => e as i32,
        Err(e) => {
            err.extend_from_slice(format!("clustermail: {e:#}\n").as_bytes());
            Exit::Failed as i32
        }
    };
    Outcome {
        ok: exit == 0,
        exit,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// A queue action a page or the API may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueAction {
    Retry,
    Delete,
    Release,
    Bounce,
}

impl QueueAction {
    pub fn parse(s: &str) -> Option<QueueAction> {
        Some(match s {
            "retry" => QueueAction::Retry,
            "delete" => QueueAction::Delete,
            "release" => QueueAction::Release,
            "bounce" => QueueAction::Bounce,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueueAction::Retry => "retry",
            QueueAction::Delete => "delete",
            QueueAction::Release => "release",
            QueueAction::Bounce => "bounce",
        }
    }

    /// What the confirmation asks.
    pub fn question(self) -> &'static str {
        match self {
            QueueAction::Retry => {
                "Retry this message now? (held recipients retry their home server only)"
            }
            QueueAction::Delete => {
                "Delete this message from the queue? No bounce is sent: the mail is lost."
            }
            QueueAction::Release => "Route this message's undeliverable recipients again?",
            QueueAction::Bounce => "Bounce this message's undeliverable recipients now?",
        }
    }
}

/// `queue retry|delete|release|bounce ID`.
pub async fn queue_action(ctx: &Context, action: QueueAction, id: &str) -> Outcome {
    let id = id.to_string();
    // As the CLI's default: a message in delivery is waited for up to 10 s, then
    // the action is refused with that reason.
    let wait = crate::cli::Wait {
        duration: std::time::Duration::from_secs(10),
    };
    let command = match action {
        QueueAction::Retry => QueueCommand::Retry {
            id: Some(id),
            all: false,
            wait,
        },
        QueueAction::Delete => QueueCommand::Delete { id, wait },
        QueueAction::Release => QueueCommand::Release { id, wait },
        QueueAction::Bounce => QueueCommand::Bounce { id, wait },
    };
    run(ctx, Command::Queue { command }).await
}

/// `queue show ID`: its text (route trace included) and the envelope it is built from.
pub async fn queue_show(ctx: &Context, id: &str) -> (Outcome, Option<Envelope>) {
    let outcome = run(
        ctx,
        Command::Queue {
            command: QueueCommand::Show {
                id: id.to_string(),
                raw: false,
            },
        },
    )
    .await;
    let env = id
        .parse::<QueueId>()
        .ok()
        .and_then(|id| ctx.spool.envelope(id).ok().flatten());
    (outcome, env)
}

/// `servers`, as the rows it prints.
pub fn servers(ctx: &Context) -> Result<Vec<ServerRow>> {
    crate::admin::routes::server_rows(ctx)
}

/// `catalog set-state SERVER STATE`.
pub async fn set_state(ctx: &Context, server: &str, state: AdminState) -> Outcome {
    run(
        ctx,
        Command::Catalog {
            command: CatalogCommand::SetState {
                mailbox: None,
                server: server.to_string(),
                state: state.to_string(),
            },
        },
    )
    .await
}

/// `route explain ADDRESS`.
pub async fn route_explain(ctx: &Context, address: &str) -> Outcome {
    run(
        ctx,
        Command::Route {
            command: cli::RouteCommand::Explain {
                address: address.to_string(),
            },
        },
    )
    .await
}

/// `catalog show ADDRESS`.
pub async fn catalog_show(ctx: &Context, address: &str) -> Outcome {
    run(
        ctx,
        Command::Catalog {
            command: CatalogCommand::Show {
                address: address.to_string(),
            },
        },
    )
    .await
}

/// `catalog import [--replace] [--dry-run] FILE`.
pub async fn catalog_import(ctx: &Context, file: PathBuf, replace: bool, dry_run: bool) -> Outcome {
    run(
        ctx,
        Command::Catalog {
            command: CatalogCommand::Import {
                files: vec![file],
                replace,
                merge: !replace,
                dry_run,
            },
        },
    )
    .await
}

/// `catalog export --format F`.
pub async fn catalog_export(ctx: &Context, format: Format) -> Outcome {
    run(
        ctx,
        Command::Catalog {
            command: CatalogCommand::Export {
                format: format.into(),
                base_dn: None,
                only: None,
                output: None,
            },
        },
    )
    .await
}

/// `ha status`.
pub async fn ha_status(ctx: &Context) -> Outcome {
    run(
        ctx,
        Command::Ha {
            command: HaCommand::Status,
        },
    )
    .await
}

/// `ha restore`.
pub async fn ha_restore(ctx: &Context) -> Outcome {
    run(
        ctx,
        Command::Ha {
            command: HaCommand::Restore,
        },
    )
    .await
}

/// `ha set-mode master|slave`.
pub async fn ha_set_mode(ctx: &Context, master: bool) -> Outcome {
    let mode = if master {
        HaSetMode::Master
    } else {
        HaSetMode::Slave
    };
    run(
        ctx,
        Command::Ha {
            command: HaCommand::SetMode { mode },
        },
    )
    .await
}

/// The effective HA mode, when the router is one of a pair.
pub fn ha_mode(ctx: &Context) -> Option<String> {
    ctx.ha.as_ref().map(|h| h.mode().to_string())
}

/// A recipient's state in one word, for lists and filters.
pub fn state_word(s: &RecipientState) -> &'static str {
    match s {
        RecipientState::Pending => "pending",
        RecipientState::Held => "held",
        RecipientState::Delivered { .. } => "delivered",
        RecipientState::Failed { .. } => "failed",
        RecipientState::Undeliverable { .. } => "undeliverable",
        RecipientState::Paused => "paused",
        RecipientState::OnHold => "on-hold",
    }
}

/// Which queued messages a list shows.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct QueueFilter {
    /// pending, held or undeliverable: a recipient in that state.
    pub state: String,
    /// A recipient homed on this server.
    pub server: String,
    /// Part of the sender address.
    pub sender: String,
    /// Part of a recipient address.
    pub recipient: String,
    /// Older than this many minutes.
    pub min_age: Option<u64>,
    /// 1-based page.
    pub page: Option<usize>,
}

/// One page of the queue.
#[derive(Debug, Serialize)]
pub struct QueuePage {
    pub page: usize,
    pub per_page: usize,
    pub messages: Vec<QueueItem>,
    /// Another page follows.
    pub more: bool,
    /// Messages in the whole queue (unfiltered).
    pub total: usize,
}

#[derive(Debug, Serialize)]
pub struct QueueItem {
    pub id: String,
    pub sender: String,
    pub received_at: u64,
    pub age_secs: u64,
    pub size: u64,
    pub recipients: Vec<QueueRecipient>,
}

#[derive(Debug, Serialize)]
pub struct QueueRecipient {
    pub address: String,
    pub state: &'static str,
    pub attempts: u32,
    pub next_attempt: u64,
    pub last_error: Option<String>,
}

pub const PER_PAGE: usize = 50;

impl QueueFilter {
    fn matches(&self, ctx: &Context, env: &Envelope, now_ms: u64) -> bool {
        let open = || env.recipients.iter().filter(|r| !r.state.is_final());
        if !self.state.is_empty() && !open().any(|r| state_word(&r.state) == self.state) {
            return false;
        }
        if !self.sender.is_empty()
            && !contains_ci(env.sender.as_deref().unwrap_or(""), &self.sender)
        {
            return false;
        }
        if !self.recipient.is_empty()
            && !env
                .recipients
                .iter()
                .any(|r| contains_ci(&r.address, &self.recipient))
        {
            return false;
        }
        if let Some(min) = self.min_age {
            if now_ms.saturating_sub(env.received_at) < min.saturating_mul(60_000) {
                return false;
            }
        }
        if !self.server.is_empty() {
            let homed = |mailbox: &str| {
                ctx.catalog
                    .lookup(mailbox)
                    .ok()
                    .flatten()
                    .is_some_and(|l| l.home.name.eq_ignore_ascii_case(&self.server))
            };
            if !open().any(|r| homed(&r.mailbox)) {
                return false;
            }
        }
        true
    }
}

fn contains_ci(hay: &str, needle: &str) -> bool {
    hay.to_lowercase().contains(&needle.to_lowercase())
}

/// One page of the queue, oldest first: envelopes are decoded lazily and only
/// up to the end of the page asked for, so the first pages stay fast however
/// long the queue is.
pub fn queue_page(ctx: &Context, filter: &QueueFilter) -> Result<QueuePage> {
    let page = filter.page.unwrap_or(1).max(1);
    let now = crate::queue::manager::now_ms();
    let skip = (page - 1) * PER_PAGE;
    let mut matched = ctx
        .spool
        .scan()
        .filter(|r| match r {
            Ok(env) => filter.matches(ctx, env, now),
            Err(_) => true,
        })
        .skip(skip)
        .take(PER_PAGE + 1)
        .collect::<Result<Vec<_>>>()?;
    let more = matched.len() > PER_PAGE;
    matched.truncate(PER_PAGE);
    Ok(QueuePage {
        page,
        per_page: PER_PAGE,
        more,
        total: ctx.spool.len(),
        messages: matched.iter().map(|e| item(e, now)).collect(),
    })
}

pub fn item(env: &Envelope, now_ms: u64) -> QueueItem {
    QueueItem {
        id: env.id.to_string(),
        sender: env.sender.clone().unwrap_or_default(),
        received_at: env.received_at,
        age_secs: now_ms.saturating_sub(env.received_at) / 1000,
        size: env.size,
        recipients: env
            .recipients
            .iter()
            .map(|r| QueueRecipient {
                address: r.address.clone(),
                state: state_word(&r.state),
                attempts: r.attempts,
                next_attempt: r.next_attempt,
                last_error: r.last_error.clone(),
            })
            .collect(),
    }
}

/// The queue at a glance: size, oldest age, open recipients by state.
#[derive(Debug, Default, Clone, Serialize)]
pub struct QueueSummary {
    pub messages: usize,
    pub oldest_age_secs: u64,
    pub pending: usize,
    pub held: usize,
    pub undeliverable: usize,
}

pub fn queue_summary(ctx: &Context) -> Result<QueueSummary> {
    let now = crate::queue::manager::now_ms();
    let mut s = QueueSummary::default();
    for env in ctx.spool.scan() {
        let env = env?;
        if s.messages == 0 {
            s.oldest_age_secs = now.saturating_sub(env.received_at) / 1000;
        }
        s.messages += 1;
        for r in &env.recipients {
            match r.state {
                RecipientState::Pending => s.pending += 1,
                RecipientState::Held => s.held += 1,
                RecipientState::Undeliverable { .. } => s.undeliverable += 1,
                _ => {}
            }
        }
    }
    Ok(s)
}
