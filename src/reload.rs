//! Reload without restart (Domino's `tell router update config`): SIGHUP and
//! `clustermail reload` read the config file again and apply routing settings,
//! SMTP limits and TLS certificates (inbound and the outbound CA file) to the
//! running router, without dropping connections or queued mail. Settings that a
//! running router cannot change ([`needs_restart`]) are reported, not applied. A
//! config with errors is refused whole and the running one kept.

use crate::config::{Config, Live, RoutingConfig, Source};
use crate::deliver::tls::TlsClient;
use crate::health::monitor::{self, SharedTracker};
use crate::queue::manager::Manager;
use crate::smtp::server::Current;
use std::sync::{Arc, Mutex};

/// What a reload changes in the running router.
pub struct Reloader {
    pub source: Source,
    /// The config in effect (settings needing a restart keep their running value).
    pub running: Mutex<Config>,
    pub routing: Arc<Live<RoutingConfig>>,
    pub smtp: Current,
    pub tracker: SharedTracker,
    pub manager: Arc<Manager>,
}

/// The settings that differ between `old` and `new` but take effect only when
/// the router starts: its name, store and listeners, fixed-size limits, `[ha]`.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (old, new);
    let checks = [
        ("router_name", o.router_name != n.router_name),
        ("data_dir", o.data_dir != n.data_dir),
        ("local_part_match", o.local_part_match != n.local_part_match),
        ("store_cache_mb", o.store_cache_mb != n.store_cache_mb),
        ("metrics_listen", o.metrics_listen != n.metrics_listen),
        ("smtp.listen", o.smtp.listen != n.smtp.listen),
        (
            "smtp.max_connections",
            o.smtp.max_connections != n.smtp.max_connections,
        ),
        (
            "smtp.max_data_in_flight",
            o.smtp.max_data_in_flight != n.smtp.max_data_in_flight,
        ),
        (
            "routing.max_deliveries",
            o.routing.max_deliveries != n.routing.max_deliveries,
        ),
        (
            "routing.max_per_server",
            o.routing.max_per_server != n.routing.max_per_server,
        ),
        ("ha", o.ha != n.ha),
    ];
    checks
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(name, _)| name)
        .collect()
}

/// `new` with every setting that needs a restart kept as in `old`: what runs
/// after the reload.
fn effective(old: &Config, new: &Config) -> Config {
    let mut e = new.clone();
    e.router_name = old.router_name.clone();
    e.data_dir = old.data_dir.clone();
    e.local_part_match = old.local_part_match;
    e.store_cache_mb = old.store_cache_mb;
    e.metrics_listen = old.metrics_listen.clone();
    e.smtp.listen = old.smtp.listen.clone();
    e.smtp.max_connections = old.smtp.max_connections;
    e.smtp.max_data_in_flight = old.smtp.max_data_in_flight;
    e.routing.max_deliveries = old.routing.max_deliveries;
    e.routing.max_per_server = old.routing.max_per_server;
    e.ha = old.ha.clone();
    e
}

impl Reloader {
    /// Reads the config file again and applies it: the report, or why it was
    /// refused (the running config is then unchanged). Both are logged.
    pub fn reload(&self) -> Result<String, String> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match self.apply(&mut running) {
            Ok(report) => {
                tracing::info!(config = %self.source, report = %report.replace('\n', "; "), "config reloaded");
                Ok(report)
            }
            Err(e) => {
                let why = format!("reload refused, the running config is kept: {e}");
                tracing::error!(config = %self.source, error = %e, "config reload refused: the running config is kept");
                Err(why)
            }
        }
    }

    fn apply(&self, running: &mut Config) -> Result<String, String> {
        let Source::File(path) = &self.source else {
            return Err(
                "the router runs on built-in defaults: there is no config file to read".into(),
            );
        };
        let (new, _) = Config::load(Some(path)).map_err(|e| format!("{e:#}"))?;
        let restart = needs_restart(running, &new);
        let next = effective(running, &new);
        // Everything that can fail first: nothing is applied unless all of it works.
        let tls =
            TlsClient::new(next.routing.tls_ca_file.as_deref()).map_err(|e| format!("{e:#}"))?;
        let service = self
            .smtp
            .get()
            .reconfigured(&next.router_name, &next.smtp, next.routing.max_hops)
            .map_err(|e| format!("{e:#}"))?;
        let mut applied = Vec::new();
        if next.routing != running.routing {
            applied.push("routing");
        }
        if next.smtp != running.smtp {
            applied.push("smtp");
        }
        self.smtp.set(service);
        self.routing.set(next.routing.clone());
        monitor::tune(&self.tracker, &next.routing);
        self.manager.deliverer.set_tls(tls);
        *running = next;
        let mut report = format!("reloaded {}\n", path.display());
        if applied.is_empty() {
            report.push_str("applied: no setting changed (TLS certificates read again)\n");
        } else {
            report.push_str(&format!(
                "applied: {} (TLS certificates read again)\n",
                applied.join(", ")
            ));
        }
        if !restart.is_empty() {
            report.push_str(&format!(
                "needs a restart (running value kept): {}\n",
                restart.join(", ")
            ));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_store_and_ha_need_a_restart_and_keep_their_running_value() {
        let old = Config::default();
        let mut new = old.clone();
        new.routing.retry_max = std::time::Duration::from_secs(7);
        new.smtp.max_recipients = 3;
        assert!(needs_restart(&old, &new).is_empty());
        new.smtp.listen = vec!["127.0.0.1:1".into()];
        new.data_dir = "/elsewhere".into();
        assert_eq!(needs_restart(&old, &new), ["data_dir", "smtp.listen"]);
        let e = effective(&old, &new);
        assert_eq!(e.smtp.listen, old.smtp.listen);
        assert_eq!(e.data_dir, old.data_dir);
        assert_eq!(e.smtp.max_recipients, 3);
        assert_eq!(e.routing.retry_max, std::time::Duration::from_secs(7));
    }
}
