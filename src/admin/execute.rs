//! Runs one administrator command (the CLI's grammar, `crate::cli`) against a
//! [`Context`]: a running router's objects (from the admin socket or the web
//! console) or the store opened directly by the `clustermail` binary.

use super::Exit;
use crate::admin;
use crate::catalog::{Catalog, Mode};
use crate::cli::*;
use crate::config::RoutingConfig;
use crate::health::monitor::SharedTracker;
use crate::queue::control::Control;
use crate::queue::Spool;
use anyhow::Result;
use std::io::Write;
use std::sync::Arc;

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
        Command::Catalog { command } => catalog_command(ctx, command, out, err),
        Command::Queue { command } => queue_command(ctx, command, out, err).await,
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
            let q = crate::queue::track::Query {
                message_id,
                from,
                to,
                since,
            };
            let db = ctx.spool.db();
            let found = tokio::task::block_in_place(|| crate::queue::track::find(db, &q))?;
            crate::queue::track::render(&found, &mut crate::logging::TerminalSafe(out))?;
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
        Command::Ha { command } => ha_command(ctx, command, out, err).await,
        Command::Web { command } => web_command(ctx, command, out, err),
        Command::Serve | Command::Demo { .. } | Command::Config { .. } => {
            writeln!(err, "not a store command")?;
            Ok(Exit::Invalid)
        }
    }
}

/// `catalog …`.
fn catalog_command(
    ctx: &Context,
    command: CatalogCommand,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
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

/// `queue …`.
async fn queue_command(
    ctx: &Context,
    command: QueueCommand,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    match command {
        QueueCommand::List(args) => admin::queue::list_page(
            &ctx.spool,
            Some(&ctx.catalog),
            &admin::queue::Page::from(&args),
            out,
        ),
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
                crate::queue::track::event(
                    ctx.spool.db(),
                    qid,
                    "",
                    crate::queue::track::What::Deleted,
                );
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
    }
}

/// `ha status|set-mode|restore`: only in a running router of a pair.
async fn ha_command(
    ctx: &Context,
    command: HaCommand,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
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

/// `web set-password|create-token|revoke-token`, against the store's `web` tree.
fn web_command(
    ctx: &Context,
    command: WebCommand,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    let store = super::users::Store::open(ctx.spool.db())?;
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
