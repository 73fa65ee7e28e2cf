//! `clustermail serve`: opens the store, the catalog and the queue, starts the SMTP
//! service, the health monitor, the queue manager and the web console, and stops
//! them gracefully on SIGINT or SIGTERM; SIGHUP reloads the config (`crate::reload`).

use crate::admin::socket;
use crate::catalog::{self, files, Catalog, Mode};
use crate::config::{Config, Source};
use crate::health;
use crate::queue::manager::Manager;
use crate::queue::Spool;
use crate::smtp::server;
use anyhow::Result;
use std::sync::Arc;
use tokio::sync::watch;

/// The example catalog, built in so that `serve` works out of the box.
pub const EXAMPLE_CATALOG: &str = include_str!("../catalog/example.toml");

/// Runs the router until SIGINT or SIGTERM.
pub async fn serve(config: Config, source: Source) -> Result<()> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections, finishing transactions in progress");
        let _ = stop.send(true);
    });
    run(config, source, stopped).await
}

/// Runs the router until `stopped` turns true (the demo and embedders stop it so).
pub async fn run(config: Config, source: Source, stopped: watch::Receiver<bool>) -> Result<()> {
    tracing::info!(config = %source, data_dir = %config.data_dir.display(), "starting clustermail");
    let db = catalog::open_db(&config.data_dir, config.store_cache_mb << 20)?;
    // The admin socket, then SMTP: once the SMTP port answers, the CLI can reach us.
    let admin_listener = socket::bind(&config.data_dir)?;
    let ha_listener = match &config.ha {
        Some(ha) => Some(crate::ha::bind(ha).await?),
        None => None,
    };
    let listeners = server::bind(&config.listen_addrs()?).await?;
    let catalog = open_catalog(&config, &db, &stopped)?;
    let store = catalog::store_path(&config.data_dir);
    let spool = Spool::open(&db, &store)?;
    tracing::info!(queued = spool.len(), "queue opened");
    let ha = match &config.ha {
        Some(c) => Some(Arc::new(crate::ha::Ha::new(
            c.clone(),
            &db,
            &store,
            spool.clone(),
            catalog.clone(),
        )?)),
        None => None,
    };
    let gate = ha
        .as_ref()
        .map_or_else(crate::gate::Gate::open, |h| h.gate.clone());
    let service = smtp_service(&config, &catalog, &spool, &gate, ha.as_ref())?;
    spawn_housekeeping(&config, &db, &service, &stopped);
    let service = server::Current::new(service);
    let routing = Arc::new(crate::config::Live::new(config.routing.clone()));
    let tracker = health::monitor::shared(&config.routing);
    let monitor = tokio::spawn(health::monitor::run(
        catalog.clone(),
        tracker.clone(),
        routing.clone(),
        stopped.clone(),
    ));
    let manager = new_manager(&config, &spool, &catalog, &tracker, &routing, gate)?;
    if let (Some(ha), Some(listener)) = (&ha, ha_listener) {
        ha.set_manager(manager.clone());
        ha.set_local(&config.data_dir, &config.smtp.listen);
        tokio::spawn(crate::ha::run(ha.clone(), listener, stopped.clone()));
    }
    let reloader = Arc::new(crate::reload::Reloader {
        source,
        running: std::sync::Mutex::new(config.clone()),
        routing: routing.clone(),
        smtp: service.clone(),
        tracker: tracker.clone(),
        manager: manager.clone(),
    });
    tokio::spawn(reload_on_sighup(reloader.clone(), stopped.clone()));
    let admin = Arc::new(crate::admin::Context {
        catalog: catalog.clone(),
        spool: spool.clone(),
        tracker: tracker.clone(),
        routing,
        reload: Some(reloader),
        live: true,
        ha,
        directory: config.directory.clone(),
    });
    let admin_socket = start_consoles(&config, admin, admin_listener, &stopped).await?;
    if let Some(addr) = &config.metrics_listen {
        let sources = crate::web::metrics::Sources {
            catalog: catalog.clone(),
            spool: spool.clone(),
            tracker,
        };
        start_metrics(addr, sources, &stopped).await?;
    }
    let delivering = tokio::spawn(manager.run(stopped.clone(), config.smtp.shutdown_grace));
    server::serve(service, listeners, stopped).await?;
    let _ = monitor.await;
    let _ = delivering.await;
    let _ = admin_socket.await;
    spool.durable().await?;
    tracing::info!("stopped");
    Ok(())
}

/// The queue manager: delivers the queue, holding what cannot be delivered yet.
fn new_manager(
    config: &Config,
    spool: &Spool,
    catalog: &Arc<Catalog>,
    tracker: &health::monitor::SharedTracker,
    routing: &Arc<crate::config::Live<crate::config::RoutingConfig>>,
    gate: crate::gate::Gate,
) -> Result<Arc<Manager>> {
    Ok(Arc::new(Manager {
        spool: spool.clone(),
        catalog: catalog.clone(),
        health: tracker.clone(),
        config: routing.clone(),
        hello_name: config.router_name.clone(),
        deliverer: crate::deliver::Deliverer::new(
            config.routing.max_per_server,
            std::time::Duration::from_secs(10),
            crate::deliver::tls::TlsClient::new(config.routing.tls_ca_file.as_deref())?,
        ),
        schedule: Default::default(),
        gate,
    }))
}

/// Opens the catalog; with `[directory]`, starts following the directory, else
/// loads the built-in example into an empty catalog.
fn open_catalog(
    config: &Config,
    db: &sled::Db,
    stopped: &watch::Receiver<bool>,
) -> Result<Arc<Catalog>> {
    let catalog = Arc::new(Catalog::open(db, config.local_part_match)?);
    if let Some(dir) = &config.directory {
        let syncer =
            crate::directory::sync::Syncer::open(catalog.clone(), db, config.local_part_match)?;
        tokio::spawn(crate::directory::consumer::run(
            dir.clone(),
            syncer,
            stopped.clone(),
        ));
    } else if catalog.servers(None).is_empty() {
        let input = files::read_text(
            "catalog/example.toml (built in)",
            files::Format::Toml,
            EXAMPLE_CATALOG,
        );
        let report = catalog
            .import(input, Mode::Merge, false, &indicatif::ProgressBar::hidden())
            .map_err(|e| anyhow::anyhow!("loading the example catalog: {e}"))?;
        tracing::warn!(
            mailboxes = report.mailboxes.added,
            servers = report.servers.added,
            "the catalog was empty: loaded the built-in example catalog (catalog/example.toml); \
             import your own with `clustermail catalog import --replace FILE`"
        );
    }
    Ok(catalog)
}

/// The SMTP service, wired to the HA unit when there is one.
fn smtp_service(
    config: &Config,
    catalog: &Arc<Catalog>,
    spool: &Spool,
    gate: &crate::gate::Gate,
    ha: Option<&Arc<crate::ha::Ha>>,
) -> Result<Arc<server::Service>> {
    let service = server::Service::new(
        &config.router_name,
        &config.smtp,
        config.routing.max_hops,
        catalog.clone(),
        spool.clone(),
        gate.clone(),
        config
            .ha
            .as_ref()
            .is_some_and(|h| h.inactive_smtp == crate::config::InactiveSmtp::Closed),
    )?;
    if let Some(ha) = ha {
        let _ = service.replication.set(ha.clone());
        if config.directory.is_some() {
            ha.set_catalog_from_directory();
        }
    }
    Ok(service)
}

/// The low-disk watch (SMTP refuses new mail below `smtp.min_free_disk`) and the
/// pruning of tracking records.
fn spawn_housekeeping(
    config: &Config,
    db: &sled::Db,
    service: &Arc<server::Service>,
    stopped: &watch::Receiver<bool>,
) {
    tokio::spawn(crate::ha::local::watch_disk(
        service.low_disk.clone(),
        config.data_dir.clone(),
        config.smtp.min_free_disk.0,
        std::time::Duration::from_secs(1),
        stopped.clone(),
    ));
    tokio::spawn(crate::queue::track::prune_every(
        db.clone(),
        config.tracking.retention,
        stopped.clone(),
    ));
}

/// The web console (with its statistics sampler) and the admin socket; the
/// returned task ends when the admin socket has stopped.
async fn start_consoles(
    config: &Config,
    admin: Arc<crate::admin::Context>,
    admin_listener: tokio::net::UnixListener,
    stopped: &watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let stats = Arc::new(crate::web::stats::Stats::new());
    tokio::spawn(crate::web::stats::run(
        stats.clone(),
        admin.spool.clone(),
        stopped.clone(),
    ));
    crate::web::start(
        &config.web,
        admin.clone(),
        &config.router_name,
        config.data_dir.clone(),
        stats,
        stopped.clone(),
    )
    .await?;
    let data_dir = config.data_dir.clone();
    let admin_stop = stopped.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = socket::serve(admin_listener, &data_dir, admin, admin_stop).await {
            tracing::error!(error = %e, "admin socket failed: the CLI cannot reach this router");
        }
    }))
}

/// `GET /metrics` on `addr`.
async fn start_metrics(
    addr: &str,
    sources: crate::web::metrics::Sources,
    stopped: &watch::Receiver<bool>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics_listen {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening (GET /metrics)");
    tokio::spawn(crate::web::metrics::serve(
        listener,
        sources,
        stopped.clone(),
    ));
    Ok(())
}

/// Reloads the config on every SIGHUP until shutdown.
async fn reload_on_sighup(
    reloader: Arc<crate::reload::Reloader>,
    mut stopped: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("SIGHUP cannot be caught: reload with `clustermail reload`");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    let r = reloader.clone();
                    // Reads files: off the async workers. (Logged by `reload`.)
                    let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                }
                _ = stopped.changed() => if *stopped.borrow() { return },
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, stopped.changed().await);
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
