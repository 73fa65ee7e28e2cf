//! The command-line grammar: every command and option of the `clustermail` binary,
//! parsed by the binary and, from the arguments a remote CLI sends, by the router's
//! admin socket. Types only; `admin::execute` runs the commands.

use crate::catalog::{AdminState, Format};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

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
        // The first start's user (`admin::users::ADMIN`; a unit test there checks).
        #[arg(long, default_value = "admin")]
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
    /// Write the catalog in a format `import` reads back.
    /// Write the catalog as LDIF entries for an LDAP directory with `--format
    /// ldif --base-dn DN` (for `ldapadd`).
    Export {
        #[arg(long, short, value_enum, default_value = "toml")]
        format: ExportFormat,
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

/// What `catalog export` writes the catalog as: a catalog file format, or LDIF
/// entries for an LDAP directory (`ldapadd`; see README "Many routers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Toml,
    Json,
    Csv,
    Ldif,
}

impl From<Format> for ExportFormat {
    fn from(f: Format) -> ExportFormat {
        match f {
            Format::Toml => ExportFormat::Toml,
            Format::Json => ExportFormat::Json,
            Format::Csv => ExportFormat::Csv,
        }
    }
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

/// What `catalog export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    Servers,
    Mailboxes,
}

/// What `catalog list` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Servers,
    Mailboxes,
}
