//! The `clustermail` command: parses the command line and wires the parts together.
//! Store commands go to the running router's admin socket when there is one, else
//! to the store directly.

use anyhow::Result;
use clap::Parser;
use clustermail::admin::{socket, Exit};
use clustermail::catalog::{self, Catalog};
use clustermail::cli::{self, Cli, Command, ConfigCommand, LogFormat};
use clustermail::config::Config;
use clustermail::queue::Spool;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The router logs what it does; other commands only what goes wrong.
    // (The demo prints its own timeline; its router logs only problems.)
    let default_level = match cli.command {
        Command::Serve => "info",
        Command::Demo { .. } => "error",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
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
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    match cli.command {
        Command::Serve => {
            let (config, source) = Config::load(cli.config.as_deref())?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(clustermail::router::serve(config, source))?;
            Ok(Exit::Ok)
        }
        Command::Demo { dir } => {
            let (config, _) = Config::load(cli.config.as_deref())?;
            let dir = dir.unwrap_or_else(|| config.data_dir.join("demo"));
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(clustermail::demo::run(&dir, &mut out))?;
            Ok(Exit::Ok)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(file.or(cli.config).as_deref()) {
            Ok((config, source)) => {
                writeln!(out, "# effective config, from {source}")?;
                write!(out, "{}", config.to_toml()?)?;
                Ok(Exit::Ok)
            }
            Err(e) => {
                eprintln!("{e:#}");
                Ok(Exit::Invalid)
            }
        },
        command => {
            let config = match Config::load(cli.config.as_deref()) {
                // A reload of a config with errors goes to the router all the
                // same: it refuses it, logs why and says so here.
                Err(_) if matches!(command, Command::Reload) => {
                    Config::with_data_dir_of(cli.config.as_deref())
                }
                other => other?.0,
            };
            // The router holds the store: ask it over its admin socket.
            let args: Vec<String> = std::env::args().skip(1).collect();
            if let Some(reply) = socket::request(&config.data_dir, &args)? {
                out.write_all(&reply.stdout)?;
                err.write_all(&reply.stderr)?;
                return Ok(if reply.code == 0 {
                    Exit::Ok
                } else if reply.code == 2 {
                    Exit::Invalid
                } else {
                    Exit::Failed
                });
            }
            let db = catalog::open_db(&config.data_dir, config.store_cache_mb << 20)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let ctx = cli::Context {
                    catalog: Arc::new(Catalog::open(&db, config.local_part_match)?),
                    spool: Spool::open(&db, &catalog::store_path(&config.data_dir))?,
                    tracker: clustermail::health::monitor::shared(&config.routing),
                    routing: Arc::new(clustermail::config::Live::new(config.routing.clone())),
                    reload: None,
                    live: false,
                    ha: None,
                };
                let exit = cli::execute(&ctx, command, &mut out, &mut err).await;
                ctx.spool.durable().await?;
                exit
            })
        }
    }
}
