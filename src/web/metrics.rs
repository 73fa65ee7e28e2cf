//! The Prometheus endpoint (`metrics_listen`): renders the counters of
//! [`crate::metrics`] together with gauges read at scrape time (queue size and
//! oldest age, each server's availability and index, shadow copies, directory
//! sync), on the console's HTTP stack ([`super::serve_http`]) but on its own
//! listener and without authentication.

use crate::catalog::Catalog;
use crate::health::monitor::SharedTracker;
use crate::metrics::{Metrics, METRICS};
use crate::queue::Spool;
use crate::route::Availability;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the scrape reads besides the counters.
pub struct Sources {
    pub catalog: std::sync::Arc<Catalog>,
    pub spool: Spool,
    pub tracker: SharedTracker,
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text exposition (format 0.0.4) of everything.
pub fn render(m: &Metrics, sources: &Sources) -> String {
    let mut out = String::new();
    counters(&mut out, m);
    crate::ha::shadow::render_metrics(&mut out);
    decisions_and_replies(&mut out, m);
    queue(&mut out, sources);
    servers(&mut out, sources);
    crate::directory::status::render_metrics(&mut out);
    out
}

/// The plain counters.
fn counters(out: &mut String, m: &Metrics) {
    for (name, help, c) in [
        (
            "clustermail_messages_accepted_total",
            "Messages queued (250 after DATA).",
            &m.messages_accepted,
        ),
        (
            "clustermail_recipients_delivered_total",
            "Recipients delivered to a server.",
            &m.recipients_delivered,
        ),
        (
            "clustermail_recipients_bounced_total",
            "Recipients failed and reported in a DSN.",
            &m.recipients_bounced,
        ),
        (
            "clustermail_recipients_held_total",
            "Times a recipient was held (home unusable, no replica available).",
            &m.recipients_held,
        ),
        (
            "clustermail_ha_auth_failures_total",
            "HA link authentications that failed (wrong ha.password on one unit?): an alarm.",
            &m.ha_auth_failures,
        ),
        (
            "clustermail_ha_local_failures_total",
            "Times this MASTER gave up because it could not serve (local service monitoring: disk, store, SMTP).",
            &m.ha_local_failures,
        ),
        (
            "clustermail_smtp_data_refused_total",
            "DATA or BDAT refused with 452 4.3.1: smtp.max_data_in_flight was spent.",
            &m.smtp_data_refused,
        ),
    ] {
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", c.get());
    }
}

/// Routing decisions, SMTP replies, data in flight.
fn decisions_and_replies(out: &mut String, m: &Metrics) {
    let name = "clustermail_routing_decisions_total";
    family(
        out,
        name,
        "counter",
        "Routing decisions of delivery attempts, by decision.",
    );
    for (decision, c) in [
        ("home", &m.decided_home),
        ("replica", &m.decided_replica),
        ("next-hop", &m.decided_next_hop),
        ("hold", &m.decided_hold),
    ] {
        let _ = writeln!(out, "{name}{{decision=\"{decision}\"}} {}", c.get());
    }
    let name = "clustermail_smtp_replies_total";
    family(
        out,
        name,
        "counter",
        "SMTP replies sent to clients, by code.",
    );
    for (code, n) in m.smtp_replies() {
        let _ = writeln!(out, "{name}{{code=\"{code}\"}} {n}");
    }

    let name = "clustermail_smtp_data_in_flight_bytes";
    family(
        out,
        name,
        "gauge",
        "Octets of message data held by SMTP sessions (budget: smtp.max_data_in_flight).",
    );
    let _ = writeln!(out, "{name} {}", m.smtp_data_in_flight.get());
}

/// The queue's size and age (a scan of the store: rendered off the async workers).
fn queue(out: &mut String, sources: &Sources) {
    let (messages, oldest) = match sources.spool.oldest() {
        Ok(oldest) => (sources.spool.len(), oldest),
        Err(_) => (0, None),
    };
    family(
        out,
        "clustermail_queue_messages",
        "gauge",
        "Messages in the queue.",
    );
    let _ = writeln!(out, "clustermail_queue_messages {messages}");
    family(
        out,
        "clustermail_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest queued message (0 when empty).",
    );
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64;
    let age = oldest.map_or(0.0, |id| now_ms.saturating_sub(id.millis()) as f64 / 1000.0);
    let _ = writeln!(out, "clustermail_queue_oldest_age_seconds {age:.3}");
}

/// Each server's availability and availability index.
fn servers(out: &mut String, sources: &Sources) {
    let tracker = sources
        .tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let servers = sources.catalog.servers(None);
    let name = "clustermail_server_availability";
    family(
        out,
        name,
        "gauge",
        "1 for the server's current availability (up, busy, down), 0 for the others.",
    );
    for s in &servers {
        let now = tracker.of(s);
        for a in [Availability::Up, Availability::Busy, Availability::Down] {
            let _ = writeln!(
                out,
                "{name}{{server=\"{}\",cluster=\"{}\",admin_state=\"{}\",availability=\"{a}\"}} {}",
                label(&s.name),
                label(&s.cluster),
                s.state.as_str(),
                u8::from(now == a)
            );
        }
    }
    let name = "clustermail_server_availability_index";
    family(
        out,
        name,
        "gauge",
        "Availability index 0-100 (100: answering as fast as its baseline).",
    );
    for s in &servers {
        let _ = writeln!(
            out,
            "{name}{{server=\"{}\"}} {}",
            label(&s.name),
            tracker.health(&s.name).index
        );
    }
}

/// The metrics endpoint's state: what it reads, and its last answer.
struct Scrapes {
    sources: std::sync::Arc<Sources>,
    /// One scrape renders at a time (the queue gauges scan the store, off the async
    /// workers); scrapes that waited meanwhile share the next rendering started
    /// after they arrived (never an older one). With when that rendering started.
    last: tokio::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<String>)>>,
}

impl Scrapes {
    async fn text(&self) -> std::sync::Arc<String> {
        let arrived = std::time::Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, text)) = last.as_ref() {
            if *started >= arrived {
                return text.clone();
            }
        }
        let started = std::time::Instant::now();
        let sources = self.sources.clone();
        let text = tokio::task::spawn_blocking(move || render(&METRICS, &sources))
            .await
            .unwrap_or_else(|e| format!("# metrics could not be rendered: {e}\n"));
        let text = std::sync::Arc::new(text);
        *last = Some((started, text.clone()));
        text
    }
}

/// Serves `GET /metrics` on `listener` until shutdown (on the console's HTTP
/// stack, but on its own listener and without authentication).
pub async fn serve(listener: TcpListener, sources: Sources, shutdown: watch::Receiver<bool>) {
    use axum::extract::State;
    use axum::http::header;
    let scrapes = std::sync::Arc::new(Scrapes {
        sources: std::sync::Arc::new(sources),
        last: tokio::sync::Mutex::new(None),
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(s): State<std::sync::Arc<Scrapes>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    s.text().await.as_str().to_owned(),
                )
            }),
        )
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "try /metrics\n") })
        .with_state(scrapes)
        // One scrape, one connection: simple scrapers read to EOF.
        .layer(tower_http::set_header::SetResponseHeaderLayer::overriding(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        ));
    super::serve_http(listener, None, app, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
