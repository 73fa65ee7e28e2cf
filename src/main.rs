//! The `clustermail` command: parses the command line and wires the parts together.

use anyhow::Result;
use clap::{Parser, Subcommand};
use clustermail::admin::{self, catalog::Only, catalog::What, Exit};
use clustermail::catalog::{self, AdminState, Catalog, Format, Mode};
use clustermail::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "clustermail",
    version,
    about = "A Domino-style cluster mail router: deliver home, fail over to a replica, or hold and retry the home server"
)]
struct Cli {
    /// Config file (default: ./clustermail.toml if present, else built-in defaults).
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format on stderr (RUST_LOG sets the level, default info).
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router: SMTP on the configured listeners, catalog and queue in data_dir.
    Serve,
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
    /// Look at the queue (with the router stopped).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queued messages, oldest first.
    List,
    /// Show one message's envelope, or with --raw its octets as queued.
    Show {
        id: String,
        #[arg(long)]
        raw: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config (FILE, or the one --config / the defaults give) and print it.
    Check { file: Option<PathBuf> },
}

#[derive(Subcommand)]
enum CatalogCommand {
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
    Export {
        #[arg(long, short, value_enum, default_value = "toml")]
        format: Format,
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
    /// Set a server's admin state: in-service, out-of-service or restricted.
    SetState {
        server: String,
        #[arg(value_parser = parse_state)]
        state: AdminState,
    },
}

fn parse_state(s: &str) -> Result<AdminState, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Pretty => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(e) => {
            eprintln!("clustermail: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<Exit> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    match cli.command {
        Command::Serve => {
            let (config, source) = Config::load(cli.config.as_deref())?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(clustermail::router::serve(config, source))?;
            Ok(Exit::Ok)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let path = file.or(cli.config);
            match Config::load(path.as_deref()) {
                Ok((config, source)) => {
                    use std::io::Write;
                    writeln!(out, "# effective config, from {source}")?;
                    write!(out, "{}", config.to_toml()?)?;
                    Ok(Exit::Ok)
                }
                Err(e) => {
                    eprintln!("{e:#}");
                    Ok(Exit::Invalid)
                }
            }
        }
        Command::Queue { command } => {
            let (config, _) = Config::load(cli.config.as_deref())?;
            let db = catalog::open_db(&config.data_dir, config.store_cache_mb << 20)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _guard = runtime.enter();
            let spool = clustermail::queue::Spool::open(&db)?;
            match command {
                QueueCommand::List => admin::queue::list(&spool, &mut out),
                QueueCommand::Show { id, raw } => {
                    admin::queue::show(&spool, &id, raw, &mut out, &mut err)
                }
            }
        }
        Command::Catalog { command } => {
            let (config, _) = Config::load(cli.config.as_deref())?;
            let db = catalog::open_db(&config.data_dir, config.store_cache_mb << 20)?;
            let cat = Catalog::open(&db, config.local_part_match)?;
            match command {
                CatalogCommand::Import {
                    files,
                    replace,
                    merge: _,
                    dry_run,
                } => {
                    let mode = if replace { Mode::Replace } else { Mode::Merge };
                    admin::catalog::import(&cat, &files, mode, dry_run, &mut out, &mut err)
                }
                CatalogCommand::Validate { files } => {
                    admin::catalog::validate(&cat, &files, &mut out, &mut err)
                }
                CatalogCommand::Export {
                    format,
                    only,
                    output,
                } => admin::catalog::export(&cat, format, only, output.as_deref(), &mut out),
                CatalogCommand::List {
                    what,
                    cluster,
                    server,
                } => admin::catalog::list(
                    &cat,
                    what,
                    cluster.as_deref(),
                    server.as_deref(),
                    &mut out,
                ),
                CatalogCommand::Show { address } => {
                    admin::catalog::show(&cat, &address, &mut out, &mut err)
                }
                CatalogCommand::SetState { server, state } => {
                    admin::catalog::set_state(&cat, &server, state, &mut out)
                }
            }
        }
    }
}
