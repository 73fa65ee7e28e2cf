//! The `clustermail` command: parses the command line and wires the parts together.
//! Store commands go to the running router's admin socket when there is one, else
//! to the store directly.

use anyhow::Result;
use clap::Parser;
use clustermail::admin::{socket, Exit};
use clustermail::catalog::{self, Catalog};
use clustermail::cli::{self, Cli, Command, ConfigCommand};
use clustermail::config::Config;
use clustermail::queue::Spool;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    // Every file this process makes is private to its user, whatever the umask it
    // was started with: the store (queued mail), the admin socket, exports.
    // SAFETY: umask(2) cannot fail and touches no memory; no thread runs yet.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    // The router logs what it does; other commands only what goes wrong.
    // (The demo prints its own timeline; its router logs only problems.)
    let default_level = match cli.command {
        Command::Serve => "info",
        Command::Demo { .. } => "error",
        _ => "warn",
    };
    clustermail::logging::init(cli.log_format, default_level);
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
        Command::Demo { dir, web } => {
            let (config, _) = Config::load(cli.config.as_deref())?;
            let dir = dir.unwrap_or_else(|| config.data_dir.join("demo"));
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(clustermail::demo::run(&dir, &mut out, web))?;
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
        mut command => {
            let config = match Config::load(cli.config.as_deref()) {
                // A reload of a config with errors goes to the router all the
                // same: it refuses it, logs why and says so here.
                Err(_) if matches!(command, Command::Reload) => {
                    Config::with_data_dir_of(cli.config.as_deref())
                }
                other => other?.0,
            };
            // The router holds the store: ask it over its admin socket.
            let mut args: Vec<String> = std::env::args().skip(1).collect();
            if let Command::Web {
                command: cli::WebCommand::SetPassword { password, .. },
            } = &mut command
            {
                if password.is_none() {
                    let new = read_password()?;
                    args.push(format!("--password={new}"));
                    *password = Some(new);
                }
            }
            // The generated first password is void once admin's is set.
            let initial = match &command {
                Command::Web {
                    command: cli::WebCommand::SetPassword { user, .. },
                } if user == clustermail::admin::users::ADMIN => Some(
                    config
                        .data_dir
                        .join(clustermail::admin::users::INITIAL_PASSWORD_FILE),
                ),
                _ => None,
            };
            let exit = store_command(&config, command, &args, &mut out, &mut err)?;
            if let (Exit::Ok, Some(file)) = (exit, initial) {
                let _ = std::fs::remove_file(file);
            }
            Ok(exit)
        }
    }
}

/// A store command: through the running router's admin socket, else against
/// the store opened here.
fn store_command(
    config: &Config,
    command: Command,
    args: &[String],
    out: &mut std::io::Stdout,
    err: &mut std::io::Stderr,
) -> Result<Exit> {
    if let Some(reply) = socket::request(&config.data_dir, args)? {
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
    // A replacing import may replace a catalog of an older record format.
    let replacing = matches!(
        &command,
        Command::Catalog {
            command: cli::CatalogCommand::Import {
                replace: true,
                dry_run: false,
                ..
            }
        }
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let ctx = clustermail::admin::Context {
            catalog: Arc::new(if replacing {
                Catalog::open_for_replace(&db, config.local_part_match)?
            } else {
                Catalog::open(&db, config.local_part_match)?
            }),
            spool: Spool::open(&db, &catalog::store_path(&config.data_dir))?,
            tracker: clustermail::health::monitor::shared(&config.routing),
            routing: Arc::new(clustermail::config::Live::new(config.routing.clone())),
            reload: None,
            live: false,
            ha: None,
            directory: config.directory.clone(),
        };
        let exit = clustermail::admin::execute(&ctx, command, out, err).await;
        ctx.spool.durable().await?;
        exit
    })
}

/// The first line of stdin, without its line end.
fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
