//! The command line, shared by the `clustermail` binary and the router's admin
//! socket (which parses the same arguments), and [`execute`], which runs the
//! commands that need the store against either a running router's objects or the
//! store opened directly.

use crate::admin::catalog::{Only, What};
use crate::admin::{self, Exit};
use crate::catalog::{AdminState, Catalog, Mode};
use crate::config::RoutingConfig;
use crate::health::monitor::SharedTracker;
use crate::queue::control::Control;
use crate::queue::Spool;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "clustermail",
    version,
    about = "A Domino-style cluster mail router: deliver home, fail over to a replica, or hold and retry the home server"
)]
pub struct Cli {
    /// Config file (default: ./clustermail.toml if present, else built-in defaults).
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr (RUST_LOG sets the level: serve logs info, other
    /// commands warnings).
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the router: SMTP on the configured listeners, catalog and queue in data_dir.
    Serve,
    /// Act out home delivery, failover and hold on loopback, with a timeline.
    ///
    /// Starts the example cluster's mailbox servers (small SMTP servers storing
    /// Maildirs), a router, and sends mail while stopping and starting servers:
    /// home, then a replica, then held, then home again.
    Demo {
        /// Where the demo keeps its store and Maildirs (wiped first if it holds
        /// an earlier demo). Default: DATA_DIR/demo.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// After the timeline, keep the cluster running with its web console
        /// and print the console's URL and password (Ctrl-C stops it).
        #[arg(long)]
        web: bool,
    },
    /// Check a config file and print the effective config.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage the replica catalog (servers, mailboxes, replicas).
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Look at and act on the queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Each catalog server: admin state, availability and its index, last probe,
    /// RTT, queued count; or pause / resume deliveries to one.
    Servers {
        #[command(subcommand)]
        command: Option<ServersCommand>,
    },
    /// Explain routing decisions.
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Message tracking: when matching messages were accepted, every delivery
    /// attempt and how each recipient ended (kept `tracking.retention`).
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["message_id", "from", "to"])))]
    Track {
        /// The Message-ID header (with or without the angle brackets).
        #[arg(long)]
        message_id: Option<String>,
        /// The envelope sender.
        #[arg(long)]
        from: Option<String>,
        /// An envelope recipient.
        #[arg(long)]
        to: Option<String>,
        /// Only messages accepted this long ago or less (e.g. "2d", "3h").
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
    },
    /// Re-read the running router's config file (as SIGHUP): routing settings, SMTP
    /// limits and TLS certificates apply at once; the rest is reported as needing
    /// a restart; a config with errors is refused and the running one kept.
    Reload,
    /// The active-passive pair: status, set the mode, restore the configured mode.
    Ha {
        #[command(subcommand)]
        command: HaCommand,
    },
    /// The web console's users and API tokens.
    Web {
        #[command(subcommand)]
        command: WebCommand,
    },
}

#[derive(Subcommand)]
pub enum WebCommand {
    /// Set a console user's password (created if new), read from stdin.
    SetPassword {
        #[arg(long, default_value = crate::web::auth::ADMIN)]
        user: String,
        /// The password as read from stdin by the client (passed over the
        /// admin socket; not for the command line).
        #[arg(long, hide = true)]
        password: Option<String>,
    },
    /// Create an API token (for `Authorization: Bearer …`) and print it once.
    CreateToken {
        #[arg(long)]
        name: String,
    },
    /// Revoke the API token NAME.
    RevokeToken { name: String },
}

#[derive(Subcommand)]
pub enum HaCommand {
    /// Configured and effective mode, peer, last heartbeat, queue push, catalog sync.
    Status,
    /// Set the effective mode by hand (the way out of OFF).
    SetMode {
        #[arg(value_enum)]
        mode: HaSetMode,
    },
    /// Return this unit to its configured mode (refused while a queue push is unfinished).
    Restore,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum HaSetMode {
    Master,
    Slave,
}

#[derive(Subcommand)]
pub enum ServersCommand {
    /// No deliveries to NAME (maintenance): its mail waits in the queue as
    /// `paused`, without failover; survives restarts.
    Pause { name: String },
    /// Deliveries to NAME again: its paused mail is due now.
    Resume {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Subcommand)]
pub enum RouteCommand {
    /// What would happen now to mail for ADDRESS, and why.
    Explain { address: String },
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// List queued messages, oldest first, a page at a time, optionally filtered.
    List(ListArgs),
    /// Open recipients by destination server and state, by age of their message
    /// (<5m, <1h, <4h, <1d, older).
    Summary,
    /// Hold a message for an administrator: never attempted until `unhold`; it
    /// still expires.
    Hold {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Release a message from an administrator's hold: due now.
    Unhold {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Show one message's envelope and per-recipient route trace, or with --raw
    /// its octets as queued.
    Show {
        id: String,
        #[arg(long)]
        raw: bool,
    },
    /// Retry now: one message, or --all (held mail still retries its home only).
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a message from the queue (no bounce is sent).
    Delete {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Route a message's undeliverable recipients again (hold_undeliverable).
    Release {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Bounce a message's undeliverable recipients now (hold_undeliverable).
    Bounce {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
}

/// `queue list`'s filters and page.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ListArgs {
    /// Only messages with a recipient bound for this server (its home).
    #[arg(long, value_name = "NAME")]
    pub server: Option<String>,
    /// Only messages with a recipient in this state.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::queue::view::STATES))]
    pub state: Option<String>,
    /// Only messages from this sender (`<>`: the null sender).
    #[arg(long, value_name = "ADDR")]
    pub from: Option<String>,
    /// Only messages with this recipient.
    #[arg(long, value_name = "ADDR")]
    pub to: Option<String>,
    /// Only messages that arrived at least this long ago (e.g. "4h").
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older_than: Option<std::time::Duration>,
    /// At most N messages (0: all).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub limit: usize,
    /// Start after this queue id (the last one of the previous page).
    #[arg(long, value_name = "ID")]
    pub after: Option<crate::queue::QueueId>,
}

impl ListArgs {
    pub fn page(&self) -> admin::queue::Page {
        admin::queue::Page {
            filter: crate::queue::view::Filter {
                server: self.server.clone(),
                state: self.state.clone(),
                from: self.from.clone(),
                to: self.to.clone(),
                older_than_ms: self.older_than.map(|d| d.as_millis() as u64),
            },
            after: self.after,
            limit: self.limit,
        }
    }
}

/// How long a queue command waits for a delivery of its message in progress.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Wait {
    /// Wait this long for a delivery of the message in progress to end (e.g.
    /// "30s", "0s": do not wait); then the command is refused (exit 1).
    #[arg(long = "wait", default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate a config (FILE, or the one --config / the defaults give) and print it.
    Check { file: Option<PathBuf> },
}

#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Import catalog files (.toml, .json, .csv) as one atomic unit.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Make the catalog equal to the files (removes what they do not name).
        #[arg(long, conflicts_with = "merge")]
        replace: bool,
        /// Add and update what the files name, keep the rest (the default).
        #[arg(long)]
        merge: bool,
        /// Check and count, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check catalog files against the catalog without importing them.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write the catalog in a format `import` reads back, or as LDIF entries
    /// for an LDAP directory (`--format ldif --base-dn DN`, for `ldapadd`).
    Export {
        #[arg(long, short, value_enum, default_value = "toml")]
        format: admin::catalog::ExportFormat,
        /// The directory's catalog base DN (with `--format ldif`): entries are
        /// written under `ou=clusters`, `ou=servers`, `ou=mailboxes` of it.
        #[arg(long, value_name = "DN")]
        base_dn: Option<String>,
        /// Export only servers or only mailboxes (CSV holds mailboxes only).
        #[arg(long, value_enum)]
        only: Option<Only>,
        /// Write to FILE (atomically) instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List servers or mailboxes.
    List {
        #[arg(value_enum)]
        what: What,
        /// Only those of this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Only this server (servers) or mailboxes homed or replicated on it.
        #[arg(long)]
        server: Option<String>,
    },
    /// Show the mailbox owning ADDRESS: home, replicas, clusters, admin states.
    Show { address: String },
    /// The LDAP directory sync ([directory]): connected or not, last change,
    /// entries not applied and why.
    SyncStatus,
    /// Set a server's admin state: in-service, out-of-service or restricted; or
    /// with --mailbox the state of that mailbox's copy on SERVER: in-service,
    /// out-of-service or pending-delete (a replica only).
    SetState {
        /// Only this mailbox's copy on SERVER (its home or a replica).
        #[arg(long, value_name = "ADDRESS")]
        mailbox: Option<String>,
        server: String,
        state: String,
    },
}

impl CatalogCommand {
    /// The name of a command that writes the catalog (None: it only reads).
    pub fn writes(&self) -> Option<&'static str> {
        match self {
            CatalogCommand::Import { dry_run: false, .. } => Some("catalog import"),
            CatalogCommand::SetState { .. } => Some("catalog set-state"),
            _ => None,
        }
    }
}

pub fn parse_state(s: &str) -> Result<AdminState, String> {
    s.parse()
}

impl Command {
    /// Commands that read or change the store (catalog, queue, availability): run
    /// by the router when it runs, else against the store directly.
    pub fn needs_store(&self) -> bool {
        matches!(
            self,
            Command::Catalog { .. }
                | Command::Queue { .. }
                | Command::Servers { .. }
                | Command::Route { .. }
                | Command::Ha { .. }
                | Command::Reload
                | Command::Track { .. }
                | Command::Web { .. }
        )
    }

    /// Makes relative file arguments absolute against `cwd` (the client's).
    pub fn absolutize(&mut self, cwd: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = cwd.join(&*p);
            }
        };
        if let Command::Catalog { command } = self {
            match command {
                CatalogCommand::Import { files, .. } | CatalogCommand::Validate { files } => {
                    files.iter_mut().for_each(fix)
                }
                CatalogCommand::Export {
                    output: Some(o), ..
                } => fix(o),
                _ => {}
            }
        }
    }
}

/// What a store command runs against.
pub struct Context {
    pub catalog: Arc<Catalog>,
    pub spool: Spool,
    pub tracker: SharedTracker,
    /// The routing settings (a running router's current ones: a reload replaces them).
    pub routing: Arc<crate::config::Live<RoutingConfig>>,
    /// Re-reads the config file (`clustermail reload`): only in a running router.
    pub reload: Option<Arc<crate::reload::Reloader>>,
    /// The router is running (availability is live, not probed for this command).
    pub live: bool,
    /// The HA unit, when the running router is one of a pair.
    pub ha: Option<Arc<crate::ha::Ha>>,
    /// `[directory]`: the catalog is a replica of an LDAP directory, which is
    /// its source of truth (imports and set-state are refused).
    pub directory: Option<crate::directory::DirectoryConfig>,
}

/// Runs a store command; output goes to `out`, problems to `err`.
pub async fn execute(
    ctx: &Context,
    command: Command,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    match command {
        Command::Catalog { command } => {
            let cat = &ctx.catalog;
            if let (Some(_), Some(what)) = (&ctx.directory, command.writes()) {
                writeln!(err, "{}", crate::directory::refusal(what))?;
                return Ok(Exit::Invalid);
            }
            match command {
                CatalogCommand::SyncStatus => {
                    admin::directory::sync_status(cat, ctx.directory.as_ref(), ctx.spool.db(), out)
                }
                CatalogCommand::Import {
                    files,
                    replace,
                    merge: _,
                    dry_run,
                } => {
                    let mode = if replace { Mode::Replace } else { Mode::Merge };
                    tokio::task::block_in_place(|| {
                        admin::catalog::import(cat, &files, mode, dry_run, out, err)
                    })
                }
                CatalogCommand::Validate { files } => {
                    tokio::task::block_in_place(|| admin::catalog::validate(cat, &files, out, err))
                }
                CatalogCommand::Export {
                    format,
                    base_dn,
                    only,
                    output,
                } => tokio::task::block_in_place(|| {
                    admin::catalog::export(
                        cat,
                        format,
                        base_dn.as_deref(),
                        only,
                        output.as_deref(),
                        out,
                    )
                }),
                CatalogCommand::List {
                    what,
                    cluster,
                    server,
                } => admin::catalog::list(cat, what, cluster.as_deref(), server.as_deref(), out),
                CatalogCommand::Show { address } => admin::catalog::show(cat, &address, out, err),
                CatalogCommand::SetState {
                    mailbox: Some(address),
                    server,
                    state,
                } => tokio::task::block_in_place(|| {
                    admin::catalog::set_mailbox_state(cat, &address, &server, &state, out, err)
                }),
                CatalogCommand::SetState {
                    mailbox: None,
                    server,
                    state,
                } => match parse_state(&state) {
                    Ok(state) => admin::catalog::set_state(cat, &server, state, out),
                    Err(e) => {
                        writeln!(err, "{e}")?;
                        Ok(Exit::Invalid)
                    }
                },
            }
        }
        Command::Queue { command } => match command {
            QueueCommand::List(args) => {
                admin::queue::list_page(&ctx.spool, Some(&ctx.catalog), &args.page(), out)
            }
            QueueCommand::Summary => admin::queue::summary(&ctx.spool, Some(&ctx.catalog), out),
            QueueCommand::Hold { id, wait } => {
                let control = Control::new(ctx.spool.clone());
                admin::queue::hold(&control, &id, wait.duration, out, err).await
            }
            QueueCommand::Unhold { id, wait } => {
                let control = Control::new(ctx.spool.clone());
                admin::queue::unhold(&control, &id, wait.duration, out, err).await
            }
            QueueCommand::Show { id, raw } => admin::queue::show(&ctx.spool, &id, raw, out, err),
            QueueCommand::Retry { id, all, wait } => {
                let control = Control::new(ctx.spool.clone());
                admin::queue::retry(&control, id.as_deref(), all, wait.duration, out, err).await
            }
            QueueCommand::Delete { id, wait } => {
                let control = Control::new(ctx.spool.clone());
                let exit = admin::queue::delete(&control, &id, wait.duration, out, err).await;
                if let (Ok(Exit::Ok), Ok(qid)) = (&exit, id.parse::<crate::queue::QueueId>()) {
                    crate::track::event(ctx.spool.db(), qid, "", crate::track::What::Deleted);
                }
                exit
            }
            QueueCommand::Release { id, wait } => {
                let control = Control::new(ctx.spool.clone());
                let lifetime = ctx.routing.get().max_queue_lifetime;
                admin::queue::release(&control, &id, lifetime, wait.duration, out, err).await
            }
            QueueCommand::Bounce { id, wait } => {
                let control = Control::new(ctx.spool.clone());
                admin::queue::bounce(&control, &id, wait.duration, out, err).await
            }
        },
        Command::Servers {
            command: Some(command),
        } => {
            let control = Control::new(ctx.spool.clone());
            match command {
                ServersCommand::Pause { name } => {
                    admin::routes::pause(ctx, &control, &name, out, err).await
                }
                ServersCommand::Resume { name, wait } => {
                    admin::routes::resume(ctx, &control, &name, wait.duration, out, err).await
                }
            }
        }
        Command::Servers { command: None } => {
            if !ctx.live {
                crate::health::monitor::probe_all(&ctx.catalog, &ctx.tracker, &ctx.routing.get())
                    .await;
            }
            admin::routes::servers(ctx, out)
        }
        Command::Route {
            command: RouteCommand::Explain { address },
        } => {
            if !ctx.live {
                crate::health::monitor::probe_all(&ctx.catalog, &ctx.tracker, &ctx.routing.get())
                    .await;
            }
            admin::routes::explain(ctx, &address, out, err)
        }
        Command::Track {
            message_id,
            from,
            to,
            since,
        } => {
            let q = crate::track::Query {
                message_id,
                from,
                to,
                since,
            };
            let db = ctx.spool.db();
            let found = tokio::task::block_in_place(|| crate::track::find(db, &q))?;
            crate::track::render(&found, out)?;
            Ok(Exit::Ok)
        }
        Command::Reload => match &ctx.reload {
            None => {
                writeln!(err, "the router is not running: there is nothing to reload")?;
                Ok(Exit::Failed)
            }
            Some(r) => match r.reload() {
                Ok(report) => {
                    write!(out, "{report}")?;
                    Ok(Exit::Ok)
                }
                Err(e) => {
                    writeln!(err, "{e}")?;
                    Ok(Exit::Invalid)
                }
            },
        },
        Command::Ha { command } => {
            let Some(ha) = &ctx.ha else {
                writeln!(
                    err,
                    "{}",
                    if ctx.live {
                        "this router is not one of an HA pair (no [ha] in its config)"
                    } else {
                        "the router is not running: HA status and modes exist only in a running router"
                    }
                )?;
                return Ok(Exit::Failed);
            };
            match command {
                HaCommand::Status => {
                    ha.write_status(out)?;
                    Ok(Exit::Ok)
                }
                HaCommand::SetMode { mode } => {
                    let said = ha.set_mode(matches!(mode, HaSetMode::Master)).await;
                    writeln!(out, "{said}")?;
                    Ok(Exit::Ok)
                }
                HaCommand::Restore => match ha.restore().await {
                    Ok(msg) => {
                        writeln!(out, "{msg}")?;
                        Ok(Exit::Ok)
                    }
                    Err(why) => {
                        writeln!(err, "refused: {why}")?;
                        Ok(Exit::Failed)
                    }
                },
            }
        }
        Command::Web { command } => web_command(ctx, command, out, err),
        Command::Serve | Command::Demo { .. } | Command::Config { .. } => {
            writeln!(err, "not a store command")?;
            Ok(Exit::Invalid)
        }
    }
}

/// `web set-password|create-token|revoke-token`, against the store's `web` tree.
fn web_command(
    ctx: &Context,
    command: WebCommand,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    let store = crate::web::auth::Store::open(ctx.spool.db())?;
    match command {
        WebCommand::SetPassword { user, password } => {
            let Some(password) = password.filter(|p| !p.is_empty()) else {
                writeln!(err, "give the new password on stdin")?;
                return Ok(Exit::Invalid);
            };
            match tokio::task::block_in_place(|| store.set_password(&user, &password)) {
                Ok(()) => writeln!(out, "password of console user {user} set")?,
                Err(e) => {
                    writeln!(err, "{e:#}")?;
                    return Ok(Exit::Invalid);
                }
            }
        }
        WebCommand::CreateToken { name } => match store.create_token(&name) {
            Ok(token) => writeln!(out, "{token}")?,
            Err(e) => {
                writeln!(err, "{e:#}")?;
                return Ok(Exit::Invalid);
            }
        },
        WebCommand::RevokeToken { name } => {
            if !store.revoke_token(&name)? {
                writeln!(err, "no API token named {name}")?;
                return Ok(Exit::Invalid);
            }
            writeln!(out, "API token {name} revoked")?;
        }
    }
    Ok(Exit::Ok)
}
