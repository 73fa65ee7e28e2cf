//! What the consumer tells the rest of the router: connected or not, to which
//! directory server, when the catalog last changed from the directory, and the
//! entries waiting to become valid. Read by `catalog sync-status`, `servers`
//! and the metrics.
//!
//! Process-wide, like the metrics counters: one consumer per router process.

use serde::Serialize;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A directory entry that is not in the catalog as the directory has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedEntry {
    pub dn: String,
    /// The mailbox address, server or cluster name (empty when the entry is malformed).
    pub name: String,
    pub reason: String,
}

/// A copy of the consumer's state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// A `[directory]` is configured and its consumer runs in this process.
    pub enabled: bool,
    pub connected: bool,
    /// The directory server last connected to.
    pub url: Option<String>,
    /// When a change from the directory was last applied (or a refresh confirmed
    /// the catalog current).
    pub last_change: Option<SystemTime>,
    /// The last connection or sync error.
    pub last_error: Option<String>,
    /// Entries applied since the router started.
    pub applied: u64,
    /// Full refreshes (initial sync, e-syncRefreshRequired) since the router started.
    pub full_refreshes: u64,
    pub rejected: Vec<RejectedEntry>,
}

impl Snapshot {
    pub fn last_change_age(&self) -> Option<Duration> {
        self.last_change
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    }
}

/// The live state, behind one lock (written a few times per batch).
pub struct Status(Mutex<Option<Snapshot>>);

/// The consumer's status in this process (None inside: no consumer runs).
pub static STATUS: Status = Status(Mutex::new(None));

impl Status {
    fn with(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(g.get_or_insert_with(|| Snapshot {
            enabled: true,
            ..Snapshot::default()
        }));
    }

    /// A copy; `enabled == false` when no consumer runs in this process.
    pub fn snapshot(&self) -> Snapshot {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }

    pub fn started(&self) {
        self.with(|_| {});
    }

    pub fn connected(&self, url: &str) {
        self.with(|s| {
            s.connected = true;
            s.url = Some(url.to_string());
            s.last_error = None;
        });
    }

    pub fn disconnected(&self, error: String) {
        self.with(|s| {
            s.connected = false;
            s.last_error = Some(error);
        });
    }

    pub fn changed(&self, applied: usize, full: bool) {
        self.with(|s| {
            s.last_change = Some(SystemTime::now());
            s.applied += applied as u64;
            s.full_refreshes += u64::from(full);
        });
    }

    pub fn set_rejected(&self, rejected: Vec<RejectedEntry>) {
        self.with(|s| s.rejected = rejected);
    }
}

/// The Prometheus families of the consumer (none when it does not run).
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write as _;
    let s = STATUS.snapshot();
    if !s.enabled {
        return;
    }
    let families: [(&str, &str, f64); 3] = [
        (
            "clustermail_directory_connected",
            "1 while the catalog follows the LDAP directory (sync search running), else 0.",
            f64::from(u8::from(s.connected)),
        ),
        (
            "clustermail_directory_last_change_age_seconds",
            "Seconds since a change from the directory was last applied (-1: none since start).",
            s.last_change_age().map_or(-1.0, |d| d.as_secs_f64()),
        ),
        (
            "clustermail_directory_rejected_entries",
            "Directory entries not applied (malformed, or breaking a catalog invariant).",
            s.rejected.len() as f64,
        ),
    ];
    for (name, help, v) in families {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v:.3}"
        );
    }
}

/// One line for `servers`: where the catalog comes from and how current it is.
pub fn summary_line() -> Option<String> {
    let s = STATUS.snapshot();
    if !s.enabled {
        return None;
    }
    let url = s.url.as_deref().unwrap_or("-");
    let age = s.last_change_age().map_or_else(
        || "none yet".to_string(),
        |d| format!("{}s ago", d.as_secs()),
    );
    let state = if s.connected {
        "connected".to_string()
    } else {
        format!(
            "NOT CONNECTED ({}): routing on the catalog as last synced",
            s.last_error.as_deref().unwrap_or("connecting")
        )
    };
    Some(format!(
        "catalog synced from the directory {url}: {state}; last change {age}; {} rejected entr{}",
        s.rejected.len(),
        if s.rejected.len() == 1 { "y" } else { "ies" }
    ))
}
