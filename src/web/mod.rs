//! The web console (`[web]`): an HTTP(S) server beside the SMTP service with
//! server-rendered pages (dashboard, servers, queue, route, catalog, HA) and a
//! JSON API under `/api/v1/`. This module owns the HTTP stack (also used by
//! `metrics_listen`), the security middleware (sessions, bearer tokens, CSRF,
//! headers) and starting the console; pages, API, auth and the adapter to the
//! administration code live in the submodules.

pub mod actions;
mod api;
pub mod auth;
pub mod metrics;
mod pages;
pub mod stats;
mod views;

use crate::admin::{users, Context};
use crate::config::WebConfig;
use anyhow::{Context as _, Result};
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// The session cookie's name.
pub const COOKIE: &str = "cm_session";
/// Connections open at once on one HTTP listener (console or metrics).
const MAX_HTTP_CONNECTIONS: usize = 256;
/// The longest a request may take, its body included (a catalog upload).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest request body (a catalog upload).
const MAX_BODY: usize = 64 << 20;

/// What every handler reads.
pub struct Shared {
    pub ctx: Arc<Context>,
    pub router_name: String,
    pub store: users::Store,
    pub sessions: auth::Sessions,
    pub limiter: auth::Limiter,
    /// The console speaks HTTPS (cookies are `Secure`).
    pub tls: bool,
    pub stats: Arc<stats::Stats>,
    pub data_dir: PathBuf,
    /// The last reading of the dashboard, and when it was taken.
    pub dashboard: std::sync::Mutex<Option<(std::time::Instant, Arc<views::Dashboard>)>>,
}

pub type AppState = Arc<Shared>;

/// Who made a request that passed the session or token check.
#[derive(Clone)]
pub struct Auth {
    pub user: String,
    /// The browser session (None for a bearer token).
    pub session: Option<String>,
    pub csrf: String,
}

/// Binds and starts the console, when `[web] listen` is set. A port already
/// taken is logged and the router runs on without its console: mail must not
/// stop for a screen.
pub async fn start(
    config: &WebConfig,
    ctx: Arc<Context>,
    router_name: &str,
    data_dir: PathBuf,
    stats: Arc<stats::Stats>,
    stopped: watch::Receiver<bool>,
) -> Result<()> {
    if config.listen.is_empty() {
        tracing::info!("web console off (web.listen is empty)");
        return Ok(());
    }
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => {
            Some(crate::smtp::tls::acceptor(c, k).context("web.tls_cert / web.tls_key")?)
        }
        _ => None,
    };
    let listener = match TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e,
                "web console cannot listen: the router runs without its console");
            return Ok(());
        }
    };
    let store = users::Store::open(ctx.spool.db())?;
    // Catalog uploads waiting for "apply" belonged to sessions that are gone.
    let _ = std::fs::remove_dir_all(data_dir.join("web-uploads"));
    let initial = {
        let (store, dir) = (store.clone(), data_dir.clone());
        tokio::task::spawn_blocking(move || store.ensure_initial(&dir)).await??
    };
    if let Some(path) = initial {
        tracing::warn!(file = %path.display(),
            "web console: created user admin with a generated password, in this file (mode 0600); \
             change it with `clustermail web set-password`");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{}/", listener.local_addr()?), "web console listening");
    let shared = Arc::new(Shared {
        ctx,
        router_name: router_name.to_string(),
        store,
        sessions: auth::Sessions::new(config.session_lifetime),
        limiter: auth::Limiter::default(),
        tls: tls.is_some(),
        stats,
        data_dir,
        dashboard: Default::default(),
    });
    tokio::spawn(serve_http(listener, tls, app(shared), stopped));
    Ok(())
}

/// The console's routes and middleware.
pub fn app(state: AppState) -> axum::Router {
    let guarded = pages::routes()
        .merge(api::routes())
        .layer(middleware::from_fn(csrf_guard))
        .layer(middleware::from_fn_with_state(state.clone(), require_auth));
    axum::Router::new()
        .merge(pages::public())
        .merge(guarded)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// The strict headers every answer carries; only static assets may be cached.
async fn security_headers(req: Request, next: Next) -> Response {
    let cacheable = req.uri().path().starts_with("/static/");
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !cacheable {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store, max-age=0"),
        );
    }
    res
}

/// The value of cookie `name` in the request.
pub fn cookie<'a>(req: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    req.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Lets through a live session or a valid API token; else sends a browser to
/// `/login` and an API client a 401.
async fn require_auth(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let auth = if let Some(token) = bearer {
        state.store.token_name(token).map(|name| Auth {
            user: format!("token:{name}"),
            session: None,
            csrf: String::new(),
        })
    } else {
        cookie(headers, COOKIE).and_then(|id| {
            state.sessions.get(id).map(|s| Auth {
                user: s.user,
                session: Some(id.to_string()),
                csrf: s.csrf,
            })
        })
    };
    match auth {
        Some(a) => {
            req.extensions_mut().insert(a);
            next.run(req).await
        }
        None if req.uri().path().starts_with("/api/") => api::error(
            StatusCode::UNAUTHORIZED,
            "log in first: a session cookie or Authorization: Bearer TOKEN",
        ),
        None => Redirect::to("/login").into_response(),
    }
}

/// State-changing requests from a browser session must carry its CSRF token
/// (form field `csrf`, header `X-CSRF-Token`, or `?csrf=` on an upload form);
/// bearer-token requests need none (a browser never sends one by itself).
async fn csrf_guard(req: Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    let Some(auth) = req.extensions().get::<Auth>().cloned() else {
        return StatusCode::FORBIDDEN.into_response();
    };
    if auth.session.is_none() {
        return next.run(req).await;
    }
    let given = |v: Option<&str>| v.is_some_and(|v| users::same(v, &auth.csrf));
    let header = req
        .headers()
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok());
    let query = req.uri().query().and_then(|q| {
        url_pairs(q)
            .into_iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v)
    });
    if given(header) || given(query.as_deref()) {
        return next.run(req).await;
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return forbidden();
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let field = url_pairs(&String::from_utf8_lossy(&bytes))
        .into_iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v);
    if !given(field.as_deref()) {
        return forbidden();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        "403 Forbidden: missing or wrong CSRF token; reload the page and try again\n",
    )
        .into_response()
}

/// `application/x-www-form-urlencoded` pairs.
fn url_pairs(text: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(text).unwrap_or_default()
}

/// Serves `app` on `listener` (over TLS when `tls` is set) until shutdown: the
/// HTTP stack of the console and of `metrics_listen`.
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => if *shutdown.borrow() { return } else { continue },
        };
        // Past the cap a connection is closed at once: descriptors stay for SMTP.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "http: connection refused: {MAX_HTTP_CONNECTIONS} open");
            continue;
        };
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(stream, peer, app, shutdown).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(s)) => connection(s, peer, app, shutdown).await,
                        _ => tracing::debug!(%peer, "http: TLS handshake failed"),
                    }
                }
            }
        });
    }
}

/// One HTTP/1.1 connection (keep-alive), closed gracefully at shutdown.
async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            use tower::ServiceExt;
            // The whole request, its body included: a body trickled in for ever
            // does not hold the connection for ever.
            let answer = app.oneshot(req.map(axum::body::Body::new));
            match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                Ok(r) => r,
                Err(_) => {
                    Ok((StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response())
                }
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "http connection ended");
        },
        () = stop => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
