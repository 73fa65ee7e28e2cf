//! The HA on-change hook (`ha.on_change`): a program run on every effective-mode
//! change, as keepalived's notify scripts, so that a site can move a virtual IP
//! with the MASTER. Runs one at a time in the order of the changes (a quick
//! MASTER → SLAVE → MASTER never runs out of order), each bounded by
//! `ha.on_change_timeout` (then killed); its exit status is logged. The HA
//! state machine never waits for it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// One effective-mode change for the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub new: String,
    pub old: String,
    pub epoch: u64,
    pub why: String,
}

/// Runs the hook for each change, in order, on its own task.
pub struct Hook {
    program: PathBuf,
    timeout: Duration,
    queue: Mutex<Option<mpsc::UnboundedSender<Event>>>,
}

impl Hook {
    pub fn new(program: PathBuf, timeout: Duration) -> Hook {
        Hook {
            program,
            timeout,
            queue: Mutex::new(None),
        }
    }

    /// Queues a run (the worker task starts with the first).
    pub fn changed(&self, event: Event) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.is_none() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                tracing::error!(hook = %self.program.display(), "HA on_change hook not run: no runtime");
                return;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            runtime.spawn(worker(self.program.clone(), self.timeout, rx));
            *queue = Some(tx);
        }
        if let Some(tx) = queue.as_ref() {
            let _ = tx.send(event);
        }
    }
}

async fn worker(program: PathBuf, timeout: Duration, mut rx: mpsc::UnboundedReceiver<Event>) {
    while let Some(e) = rx.recv().await {
        run(&program, timeout, &e).await;
    }
}

/// Runs the hook once and logs how it ended.
pub async fn run(program: &std::path::Path, timeout: Duration, e: &Event) {
    let hook = program.display().to_string();
    let spawned = tokio::process::Command::new(program)
        .args([&e.new, &e.old, &e.epoch.to_string()])
        .env("CLUSTERMAIL_HA_MODE", &e.new)
        .env("CLUSTERMAIL_HA_OLD_MODE", &e.old)
        .env("CLUSTERMAIL_HA_EPOCH", e.epoch.to_string())
        .env("CLUSTERMAIL_HA_REASON", &e.why)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match spawned {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(%hook, new = %e.new, old = %e.old, error = %err, "HA on_change hook could not be started");
            return;
        }
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        // Dropping the future kills the child (kill_on_drop).
        Err(_) => {
            tracing::error!(%hook, new = %e.new, old = %e.old, timeout = %humantime::format_duration(timeout), "HA on_change hook timed out: killed");
        }
        Ok(Err(err)) => {
            tracing::error!(%hook, new = %e.new, old = %e.old, error = %err, "HA on_change hook failed");
        }
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            let status = out
                .status
                .code()
                .map_or_else(|| "killed by a signal".to_string(), |c| c.to_string());
            if out.status.success() {
                tracing::info!(%hook, new = %e.new, old = %e.old, epoch = e.epoch, %status, %stderr, "HA on_change hook finished");
            } else {
                tracing::warn!(%hook, new = %e.new, old = %e.old, epoch = e.epoch, %status, %stderr, "HA on_change hook finished");
            }
        }
    }
}
