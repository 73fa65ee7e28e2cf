//! `/api/v1/…`: each page's data as JSON, and each action, for scripts holding
//! an API token (`Authorization: Bearer …`) or a browser session (with its
//! `X-CSRF-Token`). Same adapter as the pages: [`actions`].

use super::actions::{self, Outcome, QueueAction, QueueFilter};
use super::pages::{dashboard_data, AddressQuery};
use super::AppState;
use crate::catalog::AdminState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/servers", get(servers))
        .route("/api/v1/servers/{name}/state", post(set_state))
        .route("/api/v1/queue", get(queue))
        .route("/api/v1/queue/{id}", get(message))
        .route("/api/v1/queue/{id}/{action}", post(queue_action))
        .route("/api/v1/route", get(route))
        .route("/api/v1/catalog/mailbox/{address}", get(mailbox))
        .route("/api/v1/catalog/import", post(import))
        .route("/api/v1/ha", get(ha))
        .route("/api/v1/ha/restore", post(ha_restore))
        .route("/api/v1/ha/mode", post(ha_mode))
}

/// `{"error": …}` with `status`.
pub fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

fn failed(e: anyhow::Error) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}"))
}

/// A command's outcome: 200 when it succeeded, 400 for invalid input, 409 when
/// refused or failed; the body holds its text either way.
fn outcome(o: Outcome) -> Response {
    let status = match o.exit {
        0 => StatusCode::OK,
        2 => StatusCode::BAD_REQUEST,
        _ => StatusCode::CONFLICT,
    };
    (status, Json(o)).into_response()
}

async fn stats(State(state): State<AppState>) -> Response {
    match dashboard_data(&state) {
        Ok(d) => Json(&*d).into_response(),
        Err(e) => failed(e),
    }
}

async fn servers(State(state): State<AppState>) -> Response {
    match actions::servers(&state.ctx) {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => failed(e),
    }
}

#[derive(Deserialize)]
struct StateQuery {
    state: String,
}

async fn set_state(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<StateQuery>,
) -> Response {
    match q.state.parse::<AdminState>() {
        Ok(s) => outcome(actions::set_state(&state.ctx, &name, s).await),
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

async fn queue(State(state): State<AppState>, Query(filter): Query<QueueFilter>) -> Response {
    match tokio::task::block_in_place(|| actions::queue_page(&state.ctx, &filter)) {
        Ok(p) => Json(p).into_response(),
        Err(e) => failed(e),
    }
}

async fn message(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let (show, env) = actions::queue_show(&state.ctx, &id).await;
    match env {
        Some(env) => Json(json!({
            "message": actions::item(&env, crate::queue::manager::now_ms()),
            "show": show.stdout,
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, show.text().trim()),
    }
}

async fn queue_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    match QueueAction::parse(&action) {
        Some(a) => outcome(actions::queue_action(&state.ctx, a, &id).await),
        None => error(
            StatusCode::NOT_FOUND,
            "action: retry, delete, release or bounce",
        ),
    }
}

async fn route(State(state): State<AppState>, Query(q): Query<AddressQuery>) -> Response {
    if q.address.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "give ?address=");
    }
    outcome(actions::route_explain(&state.ctx, q.address.trim()).await)
}

async fn mailbox(State(state): State<AppState>, Path(address): Path<String>) -> Response {
    match state.ctx.catalog.lookup(&address) {
        Ok(Some(l)) => Json(json!({
            "mailbox": l.mailbox,
            "home": &*l.home,
            "replicas": l.replicas.iter().map(|r| &**r).collect::<Vec<_>>(),
            "show": actions::catalog_show(&state.ctx, &address).await.stdout,
        }))
        .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            &format!("{address}: no mailbox or alias with this address in the catalog"),
        ),
        Err(e) => failed(e),
    }
}

#[derive(Deserialize)]
struct ImportQuery {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    dry_run: Option<bool>,
    format: String,
}

/// The request body is one catalog file; it is checked and applied exactly as
/// `catalog import` would, through a temporary file.
async fn import(
    State(state): State<AppState>,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> Response {
    let ext = match q.format.as_str() {
        "toml" | "json" | "csv" => q.format.clone(),
        _ => return error(StatusCode::BAD_REQUEST, "format: toml, json or csv"),
    };
    let replace = match q.mode.as_deref().unwrap_or("merge") {
        "merge" => false,
        "replace" => true,
        _ => return error(StatusCode::BAD_REQUEST, "mode: merge or replace"),
    };
    let dir = state
        .data_dir
        .join("web-uploads")
        .join(crate::admin::users::random_hex(12));
    let path = dir.join(format!("upload.{ext}"));
    let saved = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(&path, &body).await
    };
    if let Err(e) = saved.await {
        return failed(e.into());
    }
    let o = actions::catalog_import(
        &state.ctx,
        path.clone(),
        replace,
        q.dry_run.unwrap_or(false),
    )
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let name = format!("upload.{ext}");
    outcome(Outcome {
        stdout: o.stdout.replace(&path.display().to_string(), &name),
        stderr: o.stderr.replace(&path.display().to_string(), &name),
        ..o
    })
}

async fn ha(State(state): State<AppState>) -> Response {
    let status = actions::ha_status(&state.ctx).await;
    Json(json!({
        "paired": state.ctx.ha.is_some(),
        "mode": actions::ha_mode(&state.ctx),
        "status": status.text(),
    }))
    .into_response()
}

async fn ha_restore(State(state): State<AppState>) -> Response {
    outcome(actions::ha_restore(&state.ctx).await)
}

#[derive(Deserialize)]
struct ModeQuery {
    mode: String,
}

async fn ha_mode(State(state): State<AppState>, Query(q): Query<ModeQuery>) -> Response {
    match q.mode.as_str() {
        "master" => outcome(actions::ha_set_mode(&state.ctx, true).await),
        "slave" => outcome(actions::ha_set_mode(&state.ctx, false).await),
        _ => error(StatusCode::BAD_REQUEST, "mode: master or slave"),
    }
}
