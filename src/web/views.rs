//! HTML of the console (maud templates: every interpolated value is escaped).
//! Layout, tables, charts and confirmation forms; no handler logic.

use super::actions::{QueuePage, QueueSummary};
use super::stats::Minute;
use crate::admin::routes::ServerRow;
use maud::{html, Markup, DOCTYPE};

/// What the dashboard shows (also `GET /api/v1/stats`).
#[derive(Debug, serde::Serialize)]
pub struct Dashboard {
    pub router_name: String,
    /// The effective HA mode, when the router is one of a pair.
    pub ha_mode: Option<String>,
    pub queue: QueueSummary,
    pub servers: Vec<ServerRow>,
    pub minutes: Vec<Minute>,
}

/// The frame of every page after login.
pub struct Frame<'a> {
    pub title: &'a str,
    pub active: &'a str,
    pub router_name: &'a str,
    pub user: &'a str,
    pub csrf: &'a str,
    pub flash: Option<(bool, String)>,
}

const NAV: [(&str, &str); 6] = [
    ("/", "Dashboard"),
    ("/servers", "Servers"),
    ("/queue", "Queue"),
    ("/route", "Route"),
    ("/catalog", "Catalog"),
    ("/ha", "HA"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · clustermail" }
            link rel="stylesheet" href="/static/style.css";
            script src="/static/app.js" defer {}
        }
    }
}

pub fn page(f: Frame, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(f.title))
            body {
                header.top {
                    span.brand { "clustermail" }
                    span.router { (f.router_name) }
                    nav {
                        @for (href, name) in NAV {
                            a href=(href) class=[(href == f.active).then_some("active")] { (name) }
                        }
                    }
                    form.logout method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(f.csrf);
                        span.user { (f.user) }
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    h1 { (f.title) }
                    @if let Some((ok, text)) = &f.flash {
                        pre class={ "flash " (if *ok { "ok" } else { "bad" }) } { (text) }
                    }
                    (body)
                }
            }
        }
    }
}

pub fn login(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body.login {
                main.login {
                    h1 { "clustermail console" }
                    @if let Some(e) = error { p.flash.bad { (e) } }
                    form method="post" action="/login" {
                        label { "User" input name="user" value="admin" autocomplete="username"; }
                        label { "Password" input id="password" type="password" name="password" autocomplete="current-password" autofocus; }
                        button id="login" type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

fn age(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// The part of the dashboard that refreshes itself.
pub fn dashboard_live(d: &Dashboard) -> Markup {
    html! {
        section.cards {
            div.card { h2 { "Router" } p.big { (d.router_name) } }
            @if let Some(m) = &d.ha_mode { div.card { h2 { "HA mode" } p.big { (m) } } }
            div.card { h2 { "Queued" } p.big #queued { (d.queue.messages) }
                p { "oldest " (if d.queue.messages == 0 { "-".to_string() } else { age(d.queue.oldest_age_secs) }) } }
            div.card { h2 { "Pending" } p.big { (d.queue.pending) } }
            div.card { h2 { "Held" } p.big { (d.queue.held) } }
            div.card { h2 { "Undeliverable" } p.big { (d.queue.undeliverable) } }
        }
        h2 { "Servers" }
        (servers_table(&d.servers, None))
        h2 { "Last hour (per minute)" }
        section.charts {
            (chart("Accepted", d.minutes.iter().map(|m| m.accepted)))
            (chart("Delivered", d.minutes.iter().map(|m| m.delivered)))
            (chart("Held", d.minutes.iter().map(|m| m.held)))
            (chart("Bounced", d.minutes.iter().map(|m| m.bounced)))
            (chart("Queue size", d.minutes.iter().map(|m| m.queue)))
        }
    }
}

pub fn dashboard(d: &Dashboard) -> Markup {
    html! {
        div #live data-refresh="/live" { (dashboard_live(d)) }
        noscript { p.note { "Reload the page to refresh (live refresh needs JavaScript)." } }
    }
}

/// A bar chart of the last hour, as inline SVG (one bar a minute).
pub fn chart(title: &str, values: impl Iterator<Item = u64>) -> Markup {
    let values: Vec<u64> = values.collect();
    let top = values.iter().copied().max().unwrap_or(0);
    let max = top.max(1);
    let (w, h) = (240u64, 60u64);
    let slot = w / super::stats::MINUTES as u64;
    let offset = super::stats::MINUTES.saturating_sub(values.len()) as u64;
    let last = values.last().copied().unwrap_or(0);
    html! {
        figure.chart {
            figcaption { (title) " " span.now { (last) } " (max " (top) ")" }
            svg viewBox={ "0 0 " (w) " " (h) } width=(w) height=(h) role="img" aria-label=(title) {
                line x1="0" y1=(h) x2=(w) y2=(h) class="axis" {}
                @for (i, v) in values.iter().enumerate() {
                    @let bh = (v * (h - 2)).div_ceil(max);
                    rect x=((offset + i as u64) * slot) y=(h - bh) width=(slot.saturating_sub(1).max(1)) height=(bh) {
                        title { (v) }
                    }
                }
            }
        }
    }
}

/// The servers table; with `csrf`, each row can set the admin state.
pub fn servers_table(rows: &[ServerRow], csrf: Option<&str>) -> Markup {
    html! {
        table.servers {
            thead { tr {
                th { "Server" } th { "Cluster" } th { "Admin" } th { "Availability" } th.num { "Index" }
                th { "Last probe" } th.num { "RTT" } th.num { "Queued" } th { "Problem" }
                @if csrf.is_some() { th { "Set admin state" } }
            } }
            tbody {
                @for s in rows {
                    tr {
                        td.name { (s.name) } td { (s.cluster) } td { (s.admin_state) }
                        td { span class={ "avail " (s.availability) } { (s.availability) } }
                        td.num { (s.index) }
                        td { @if let Some(a) = s.probed_secs_ago { (a) "s ago" } @else { "never" } }
                        td.num { @if let Some(r) = s.rtt_ms { (r) "ms" } @else { "-" } }
                        td.num { (s.queued) }
                        td.problem { (s.problem.as_deref().unwrap_or("")) }
                        @if let Some(csrf) = csrf {
                            td { form.inline method="post" action={ "/servers/" (s.name) "/state" } {
                                input type="hidden" name="csrf" value=(csrf);
                                select name="state" {
                                    @for st in ["in-service", "restricted", "out-of-service"] {
                                        option value=(st) selected[st == s.admin_state] { (st) }
                                    }
                                }
                                button type="submit" { "Set" }
                            } }
                        }
                    }
                }
            }
        }
    }
}

/// The queue list with its filter form and pager.
pub fn queue(p: &QueuePage, f: &super::actions::QueueFilter) -> Markup {
    let link = |page: usize| {
        let q = serde_urlencoded::to_string([
            ("state", f.state.as_str()),
            ("server", f.server.as_str()),
            ("sender", f.sender.as_str()),
            ("recipient", f.recipient.as_str()),
            (
                "min_age",
                &f.min_age.map(|m| m.to_string()).unwrap_or_default(),
            ),
            ("page", &page.to_string()),
        ])
        .unwrap_or_default();
        format!("/queue?{q}")
    };
    html! {
        form.filters method="get" action="/queue" {
            label { "State" select name="state" {
                @for st in ["", "pending", "held", "undeliverable"] {
                    option value=(st) selected[st == f.state] { (if st.is_empty() { "any" } else { st }) }
                }
            } }
            label { "Server" input name="server" value=(f.server); }
            label { "Sender" input name="sender" value=(f.sender); }
            label { "Recipient" input name="recipient" value=(f.recipient); }
            label { "Older than (min)" input name="min_age" type="number" min="0" value=[f.min_age]; }
            button type="submit" { "Filter" }
        }
        p { (p.total) " message(s) in the queue; page " (p.page) }
        table.queue {
            thead { tr { th { "ID" } th { "Age" } th.num { "Size" } th { "Sender" } th { "Recipients" } } }
            tbody {
                @for m in &p.messages {
                    tr {
                        td { a.qid href={ "/queue/" (m.id) } { (m.id) } }
                        td { (age(m.age_secs)) }
                        td.num { (m.size) }
                        td.addr { "<" (m.sender) ">" }
                        td { ul.rcpts { @for r in &m.recipients {
                            li { span.addr { (r.address) } " " span class={ "state " (r.state) } { (r.state) }
                                @if let Some(e) = &r.last_error { " " span.err { (e) } } }
                        } } }
                    }
                }
                @if p.messages.is_empty() { tr { td colspan="5" { "No message matches." } } }
            }
        }
        nav.pager {
            @if p.page > 1 { a href=(link(p.page - 1)) { "← Previous" } }
            @if p.more { a href=(link(p.page + 1)) { "Next →" } }
        }
    }
}

/// One queued message: its recipients, the `queue show` text, the actions.
pub fn message(id: &str, item: Option<&super::actions::QueueItem>, show: &str) -> Markup {
    html! {
        @if let Some(m) = item {
            table.kv {
                tr { th { "Sender" } td.addr { "<" (m.sender) ">" } }
                tr { th { "Size" } td { (m.size) " octets" } }
                tr { th { "Age" } td { (age(m.age_secs)) } }
            }
            table.queue {
                thead { tr { th { "Recipient" } th { "State" } th.num { "Attempts" } th { "Next attempt" } th { "Last error" } } }
                tbody { @for r in &m.recipients { tr {
                    td.addr { (r.address) } td { span class={ "state " (r.state) } { (r.state) } }
                    td.num { (r.attempts) }
                    td { (next_attempt(r.next_attempt)) }
                    td.err { (r.last_error.as_deref().unwrap_or("")) }
                } } }
            }
            div.actions {
                @for a in ["retry", "release", "bounce", "delete"] {
                    a.button href={ "/queue/" (id) "/" (a) } id={ "action-" (a) } { (a) }
                }
            }
        }
        h2 { "queue show" }
        pre.output { (show) }
    }
}

fn next_attempt(at_ms: u64) -> String {
    let now = crate::queue::manager::now_ms();
    if at_ms == 0 || at_ms <= now {
        "due now".into()
    } else {
        format!("in {}", age((at_ms - now).div_ceil(1000)))
    }
}

/// "Are you sure?" with a POST form: works without JavaScript.
pub fn confirm(question: &str, action: &str, csrf: &str, back: &str, button: &str) -> Markup {
    html! {
        div.confirm {
            p { (question) }
            form method="post" action=(action) {
                input type="hidden" name="csrf" value=(csrf);
                button id="confirm" type="submit" { (button) }
                " "
                a href=(back) { "Cancel" }
            }
        }
    }
}

/// A text form with one field, and the command's text below.
pub fn lookup(action: &str, label: &str, value: &str, output: Option<&str>) -> Markup {
    html! {
        form.filters method="get" action=(action) {
            label { (label) input name="address" value=(value) size="40"; }
            button type="submit" { "Go" }
        }
        @if let Some(o) = output { pre.output { (o) } }
    }
}

pub fn catalog(search: Markup, csrf: &str, result: Option<Markup>) -> Markup {
    html! {
        h2 { "Search" }
        (search)
        h2 { "Import" }
        form method="post" action={ "/catalog/import?csrf=" (csrf) } enctype="multipart/form-data" {
            label { "File (.toml, .json, .csv)" input id="upload" type="file" name="file" accept=".toml,.json,.csv" required; }
            label { "Mode" select name="mode" { option value="merge" { "merge" } option value="replace" { "replace" } } }
            button id="check" type="submit" { "Check (dry run)" }
        }
        @if let Some(r) = result { (r) }
        h2 { "Export" }
        p { a href="/catalog/export?format=toml" { "TOML" } " · " a href="/catalog/export?format=json" { "JSON" }
            " · " a href="/catalog/export?format=csv" { "CSV (mailboxes)" } }
    }
}

pub fn import_result(text: &str, ok: bool, apply: Option<(&str, &str, &str)>) -> Markup {
    html! {
        h3 { "Dry run" }
        pre class={ "output " (if ok { "ok" } else { "bad" }) } { (text) }
        @if let Some((csrf, upload, mode)) = apply {
            form method="post" action="/catalog/apply" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="upload" value=(upload);
                input type="hidden" name="mode" value=(mode);
                button id="apply" type="submit" { "Apply (" (mode) ")" }
            }
        }
    }
}

pub fn ha(status: &str, paired: bool) -> Markup {
    html! {
        pre.output { (status) }
        @if paired {
            div.actions {
                a.button href="/ha/confirm/restore" id="action-restore" { "Restore configured operating mode" }
                a.button href="/ha/confirm/master" id="action-master" { "Set mode MASTER" }
                a.button href="/ha/confirm/slave" id="action-slave" { "Set mode SLAVE" }
            }
        }
    }
}
