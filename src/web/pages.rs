//! The console's HTML pages and form posts: each reads through [`actions`] and
//! renders with [`views`]; actions redirect back with a flash message (the
//! command's own text).

use super::actions::{self, QueueAction, QueueFilter};
use super::views::{self, Dashboard, Frame};
use super::{auth, AppState, Auth, COOKIE};
use crate::catalog::{AdminState, Format};
use axum::extract::{ConnectInfo, Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::Markup;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const STYLE: &str = include_str!("static/style.css");
const SCRIPT: &str = include_str!("static/app.js");

/// Pages anyone may fetch.
pub fn public() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/static/{file}", get(asset))
        // Nothing public takes more than a login form.
        .layer(axum::extract::DefaultBodyLimit::max(8 << 10))
}

/// Pages behind the login.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(dashboard))
        .route("/live", get(live))
        .route("/logout", post(logout))
        .route("/servers", get(servers))
        .route("/servers/{name}/state", post(set_state))
        .route("/queue", get(queue))
        .route("/queue/{id}", get(message))
        .route(
            "/queue/{id}/{action}",
            get(confirm_queue).post(queue_action),
        )
        .route("/route", get(route))
        .route("/catalog", get(catalog))
        .route("/catalog/import", post(catalog_import))
        .route("/catalog/apply", post(catalog_apply))
        .route("/catalog/export", get(catalog_export))
        .route("/ha", get(ha))
        .route("/ha/confirm/{action}", get(confirm_ha))
        .route("/ha/{action}", post(ha_action))
}

async fn asset(Path(file): Path<String>) -> Response {
    let (kind, body) = match file.as_str() {
        "style.css" => ("text/css; charset=utf-8", STYLE),
        "app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn login_form() -> Html<String> {
    Html(views::login(None).into_string())
}

#[derive(Deserialize)]
struct Login {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

/// Password checks running at once (each holds argon2's memory).
static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<Login>,
) -> Response {
    let ip = peer.ip();
    if let Some(wait) = state.limiter.blocked(ip) {
        return too_many(wait);
    }
    // The try is counted before the password is checked, so requests sent at once
    // get no more tries than requests sent one after the other.
    let n = state.limiter.failed(ip);
    if n > auth::MAX_FAILURES {
        return too_many(state.limiter.blocked(ip).unwrap_or(Duration::from_secs(1)));
    }
    // Each check costs argon2's memory (19 MiB): only a few at once.
    let Ok(_checking) = CHECKS.try_acquire() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many logins at once, try again",
        )
            .into_response();
    };
    let ok = {
        let (store, user, password) = (state.store.clone(), form.user.clone(), form.password);
        tokio::task::spawn_blocking(move || store.verify_password(&user, &password))
            .await
            .unwrap_or(false)
    };
    if !ok {
        let user: String = form.user.chars().take(64).collect();
        tracing::warn!(%ip, user = %user, failures = n, "web console: wrong user or password");
        if let Some(wait) = state.limiter.blocked(ip) {
            return too_many(wait);
        }
        let page = views::login(Some("Wrong user or password."));
        return (StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response();
    }
    state.limiter.succeeded(ip);
    let id = state.sessions.create(&form.user);
    tracing::info!(%ip, user = %form.user, "web console: logged in");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        state.sessions.lifetime().as_secs(),
        if state.tls { "; Secure" } else { "" }
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

fn too_many(wait: std::time::Duration) -> Response {
    let text = format!(
        "Too many wrong passwords from your address: try again in {} s.",
        wait.as_secs() + 1
    );
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, (wait.as_secs() + 1).to_string())],
        Html(views::login(Some(&text)).into_string()),
    )
        .into_response()
}

async fn logout(State(state): State<AppState>, Extension(a): Extension<Auth>) -> Response {
    if let Some(id) = &a.session {
        state.sessions.remove(id);
    }
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// Renders `body` in the frame; shows (and clears) the session's flash message.
fn render(state: &AppState, a: &Auth, title: &str, active: &str, body: Markup) -> Response {
    let mut flash = None;
    if let Some(id) = &a.session {
        state.sessions.update(id, |s| flash = s.flash.take());
    }
    let f = Frame {
        title,
        active,
        router_name: &state.router_name,
        user: &a.user,
        csrf: &a.csrf,
        flash,
    };
    Html(views::page(f, body).into_string()).into_response()
}

/// Remembers what an action printed, and goes to `to`.
fn done(state: &AppState, a: &Auth, outcome: &actions::Outcome, to: &str) -> Response {
    if let Some(id) = &a.session {
        let flash = (outcome.ok, outcome.text());
        state.sessions.update(id, |s| s.flash = Some(flash));
    }
    Redirect::to(to).into_response()
}

fn failure(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "web console: page failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the router could not answer: {e:#}\n"),
    )
        .into_response()
}

/// How long one reading of the dashboard serves every browser polling it (a
/// reading scans the whole queue).
const DASHBOARD_FRESH: std::time::Duration = std::time::Duration::from_secs(3);

/// The dashboard's data, read at most every [`DASHBOARD_FRESH`].
pub fn dashboard_data(state: &AppState) -> anyhow::Result<Arc<Dashboard>> {
    // Blocking: the queue scan, and waiting for another request's scan.
    tokio::task::block_in_place(|| read_dashboard(state))
}

fn read_dashboard(state: &AppState) -> anyhow::Result<Arc<Dashboard>> {
    let mut cached = state.dashboard.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, d)) = cached.as_ref() {
        if at.elapsed() < DASHBOARD_FRESH {
            return Ok(d.clone());
        }
    }
    let ctx = &state.ctx;
    let d = Arc::new(Dashboard {
        router_name: state.router_name.clone(),
        ha_mode: actions::ha_mode(ctx),
        queue: actions::queue_summary(ctx)?,
        servers: actions::servers(ctx)?,
        minutes: state.stats.minutes(),
    });
    *cached = Some((std::time::Instant::now(), d.clone()));
    Ok(d)
}

async fn dashboard(State(state): State<AppState>, Extension(a): Extension<Auth>) -> Response {
    match dashboard_data(&state) {
        Ok(d) => render(&state, &a, "Dashboard", "/", views::dashboard(&d)),
        Err(e) => failure(e),
    }
}

async fn live(State(state): State<AppState>) -> Response {
    match dashboard_data(&state) {
        Ok(d) => Html(views::dashboard_live(&d).into_string()).into_response(),
        Err(e) => failure(e),
    }
}

async fn servers(State(state): State<AppState>, Extension(a): Extension<Auth>) -> Response {
    match actions::servers(&state.ctx) {
        Ok(rows) => {
            let body = views::servers_table(&rows, Some(&a.csrf));
            render(&state, &a, "Servers", "/servers", body)
        }
        Err(e) => failure(e),
    }
}

#[derive(Deserialize)]
struct SetState {
    state: String,
}

async fn set_state(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Path(name): Path<String>,
    Form(form): Form<SetState>,
) -> Response {
    let outcome = match form.state.parse::<AdminState>() {
        Ok(s) => actions::set_state(&state.ctx, &name, s).await,
        Err(e) => actions::Outcome {
            ok: false,
            exit: 2,
            stdout: String::new(),
            stderr: e,
        },
    };
    done(&state, &a, &outcome, "/servers")
}

async fn queue(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Query(filter): Query<QueueFilter>,
) -> Response {
    match tokio::task::block_in_place(|| actions::queue_page(&state.ctx, &filter)) {
        Ok(p) => render(&state, &a, "Queue", "/queue", views::queue(&p, &filter)),
        Err(e) => failure(e),
    }
}

/// A queue id from a path, written as the queue writes it: only that goes into a
/// page and the paths its links and forms are built from (a decoded `..%2F`
/// must not turn a form's path into another action's).
fn canonical_id(id: &str) -> Option<String> {
    id.parse::<crate::queue::QueueId>()
        .ok()
        .map(|q| q.to_string())
}

async fn message(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = canonical_id(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (show, env) = actions::queue_show(&state.ctx, &id).await;
    let item = env.map(|e| actions::item(&e, crate::queue::manager::now_ms()));
    let title = format!("Message {id}");
    let body = views::message(&id, item.as_ref(), &show.text());
    let mut res = render(&state, &a, &title, "/queue", body);
    if item.is_none() {
        *res.status_mut() = StatusCode::NOT_FOUND;
    }
    res
}

async fn confirm_queue(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let Some(act) = QueueAction::parse(&action) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(id) = canonical_id(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let body = views::confirm(
        act.question(),
        &format!("/queue/{id}/{}", act.as_str()),
        &a.csrf,
        &format!("/queue/{id}"),
        act.as_str(),
    );
    render(&state, &a, &format!("Message {id}"), "/queue", body)
}

async fn queue_action(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let Some(act) = QueueAction::parse(&action) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let outcome = actions::queue_action(&state.ctx, act, &id).await;
    tracing::info!(user = %a.user, %id, action = act.as_str(), ok = outcome.ok, "web console: queue action");
    let to = if act == QueueAction::Delete && outcome.ok {
        "/queue".to_string()
    } else {
        format!("/queue/{id}")
    };
    done(&state, &a, &outcome, &to)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct AddressQuery {
    pub address: String,
}

async fn route(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Query(q): Query<AddressQuery>,
) -> Response {
    let output = if q.address.trim().is_empty() {
        None
    } else {
        Some(
            actions::route_explain(&state.ctx, q.address.trim())
                .await
                .text(),
        )
    };
    let body = views::lookup("/route", "Address", &q.address, output.as_deref());
    render(&state, &a, "Route explain", "/route", body)
}

async fn catalog(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Query(q): Query<AddressQuery>,
) -> Response {
    let output = if q.address.trim().is_empty() {
        None
    } else {
        Some(
            actions::catalog_show(&state.ctx, q.address.trim())
                .await
                .text(),
        )
    };
    let search = views::lookup(
        "/catalog",
        "Address or alias",
        &q.address,
        output.as_deref(),
    );
    let body = views::catalog(search, &a.csrf, None);
    render(&state, &a, "Catalog", "/catalog", body)
}

/// Keeps an upload in `data_dir/web-uploads/ID/NAME` until it is applied.
async fn save_upload(
    state: &AppState,
    name: &str,
    bytes: &[u8],
) -> anyhow::Result<(String, std::path::PathBuf)> {
    let ext = std::path::Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .filter(|e| ["toml", "json", "csv"].contains(&e.as_str()))
        .ok_or_else(|| anyhow::anyhow!("{name}: name the file .toml, .json or .csv"))?;
    let id = crate::admin::users::random_hex(12);
    let dir = state.data_dir.join("web-uploads").join(&id);
    tokio::fs::create_dir_all(&dir).await?;
    let path = dir.join(format!("upload.{ext}"));
    tokio::fs::write(&path, bytes).await?;
    Ok((id, path))
}

/// The command's text with the upload's temporary path replaced by its name.
fn as_named(text: &str, path: &std::path::Path, name: &str) -> String {
    text.replace(&path.display().to_string(), name)
}

async fn catalog_import(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    mut form: Multipart,
) -> Response {
    let (mut file, mut mode) = (None, "merge".to_string());
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.toml").to_string();
                match field.bytes().await {
                    Ok(b) => file = Some((name, b)),
                    Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
                }
            }
            Some("mode") => mode = field.text().await.unwrap_or_default(),
            _ => {}
        }
    }
    let replace = mode == "replace";
    let mode = if replace { "replace" } else { "merge" };
    let Some((name, bytes)) = file else {
        return (StatusCode::BAD_REQUEST, "no file in the form\n").into_response();
    };
    let (result, ok) = match save_upload(&state, &name, &bytes).await {
        Err(e) => (views::import_result(&format!("{e:#}"), false, None), false),
        Ok((id, path)) => {
            let out = actions::catalog_import(&state.ctx, path.clone(), replace, true).await;
            let text = as_named(&out.text(), &path, &name);
            if out.ok {
                if let Some(s) = &a.session {
                    state.sessions.update(s, |s| {
                        s.uploads.insert(id.clone(), path.clone());
                    });
                }
                (
                    views::import_result(&text, true, Some((&a.csrf, &id, mode))),
                    true,
                )
            } else {
                let _ = tokio::fs::remove_dir_all(path.parent().unwrap_or(&path)).await;
                (views::import_result(&text, false, None), false)
            }
        }
    };
    let search = views::lookup("/catalog", "Address or alias", "", None);
    let mut res = render(
        &state,
        &a,
        "Catalog",
        "/catalog",
        views::catalog(search, &a.csrf, Some(result)),
    );
    if !ok {
        *res.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
    }
    res
}

#[derive(Deserialize)]
struct Apply {
    upload: String,
    mode: String,
}

async fn catalog_apply(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Form(form): Form<Apply>,
) -> Response {
    let mut path = None;
    if let Some(s) = &a.session {
        state
            .sessions
            .update(s, |s| path = s.uploads.remove(&form.upload));
    }
    let Some(path) = path else {
        return (
            StatusCode::BAD_REQUEST,
            "no such checked upload: import the file again\n",
        )
            .into_response();
    };
    let out =
        actions::catalog_import(&state.ctx, path.clone(), form.mode == "replace", false).await;
    let _ = tokio::fs::remove_dir_all(path.parent().unwrap_or(&path)).await;
    let out = actions::Outcome {
        stdout: as_named(&out.stdout, &path, "the upload"),
        stderr: as_named(&out.stderr, &path, "the upload"),
        ..out
    };
    done(&state, &a, &out, "/catalog")
}

#[derive(Deserialize)]
struct ExportQuery {
    format: String,
}

async fn catalog_export(State(state): State<AppState>, Query(q): Query<ExportQuery>) -> Response {
    let (format, kind) = match q.format.as_str() {
        "toml" => (Format::Toml, "application/toml"),
        "json" => (Format::Json, "application/json"),
        "csv" => (Format::Csv, "text/csv"),
        _ => return (StatusCode::BAD_REQUEST, "format: toml, json or csv\n").into_response(),
    };
    let out = actions::catalog_export(&state.ctx, format).await;
    if !out.ok {
        return (StatusCode::INTERNAL_SERVER_ERROR, out.text()).into_response();
    }
    let disposition = format!("attachment; filename=\"catalog.{}\"", q.format);
    (
        [
            (header::CONTENT_TYPE, kind.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        out.stdout,
    )
        .into_response()
}

async fn ha(State(state): State<AppState>, Extension(a): Extension<Auth>) -> Response {
    let status = actions::ha_status(&state.ctx).await;
    let body = views::ha(&status.text(), state.ctx.ha.is_some());
    render(&state, &a, "High availability", "/ha", body)
}

fn ha_question(action: &str) -> Option<(&'static str, &'static str)> {
    Some(match action {
        "restore" => (
            "Restore this unit's configured operating mode? (refused while a queue push is unfinished)",
            "Restore configured operating mode",
        ),
        "master" => ("Make this unit MASTER by hand?", "Set MASTER"),
        "slave" => ("Make this unit SLAVE by hand?", "Set SLAVE"),
        _ => return None,
    })
}

async fn confirm_ha(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Path(action): Path<String>,
) -> Response {
    let Some((question, button)) = ha_question(&action) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let body = views::confirm(question, &format!("/ha/{action}"), &a.csrf, "/ha", button);
    render(&state, &a, "High availability", "/ha", body)
}

async fn ha_action(
    State(state): State<AppState>,
    Extension(a): Extension<Auth>,
    Path(action): Path<String>,
) -> Response {
    let outcome = match action.as_str() {
        "restore" => actions::ha_restore(&state.ctx).await,
        "master" => actions::ha_set_mode(&state.ctx, true).await,
        "slave" => actions::ha_set_mode(&state.ctx, false).await,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    tracing::info!(user = %a.user, %action, ok = outcome.ok, "web console: HA action");
    done(&state, &a, &outcome, "/ha")
}
