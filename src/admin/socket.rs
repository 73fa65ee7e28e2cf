//! The admin socket: sled is single-process, so while `serve` runs, the CLI sends
//! its store commands (catalog, queue, servers, route) to the router over a Unix
//! domain socket in the data dir (mode 0600), and the router runs them against its
//! live objects: a catalog import or set-state takes effect for routing at once.
//!
//! Protocol: the client writes one JSON line `{"args": [...], "cwd": "..."}`; the
//! router parses the args with the same CLI definition, runs the command, and
//! answers a JSON line `{"code": N, "stdout": LEN, "stderr": LEN}` followed by the
//! raw stdout and stderr octets (so `queue show --raw` stays byte-exact).
//!
//! Access: the socket is created 0600 (bound under umask 077, so there is no
//! moment when it is more open), and each connection's peer is checked
//! (`SO_PEERCRED`): only root and the router's own user are served, whatever the
//! permissions of the file and its directories.

use crate::admin::Context;
use crate::cli::Cli;
use anyhow::{Context as _, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

pub const SOCKET: &str = "admin.sock";
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Serialize, Deserialize)]
struct Request {
    args: Vec<String>,
    cwd: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Header {
    code: i32,
    stdout: usize,
    stderr: usize,
}

/// A command's result as the router sent it.
pub struct Reply {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Sends a command to the running router. `Ok(None)`: no router is listening (no
/// socket, or a stale one left by a crash), so the caller opens the store itself.
pub fn request(data_dir: &Path, args: &[String]) -> Result<Option<Reply>> {
    let p = path(data_dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&p) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("admin socket {}", p.display())),
    };
    let req = Request {
        args: args.to_vec(),
        cwd: std::env::current_dir()?,
    };
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let h: Header = serde_json::from_str(&head)
        .with_context(|| format!("bad answer from the router: {head:?}"))?;
    let mut stdout = vec![0; h.stdout];
    reader.read_exact(&mut stdout)?;
    let mut stderr = vec![0; h.stderr];
    reader.read_exact(&mut stderr)?;
    Ok(Some(Reply {
        code: h.code,
        stdout,
        stderr,
    }))
}

/// Binds the socket (mode 0600). Call it with the store already open: a socket
/// file left by a crash is then known to be stale and is replaced.
pub fn bind(data_dir: &Path) -> Result<tokio::net::UnixListener> {
    let p = path(data_dir);
    let _ = std::fs::remove_file(&p);
    // The file is created by bind(2) with the mode the umask leaves: 0600 from
    // the first instant. (The umask is per process; `main` sets 077 for good, so
    // this only matters to embedders, and narrows, never widens, what others make.)
    // SAFETY: umask(2) cannot fail and touches no memory.
    let old = unsafe { libc::umask(0o077) };
    let bound = tokio::net::UnixListener::bind(&p);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("admin socket {}", p.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %p.display(), "admin socket listening");
    Ok(listener)
}

/// Serves admin requests until shutdown, then removes the socket file.
pub async fn serve(
    listener: tokio::net::UnixListener,
    data_dir: &Path,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let p = path(data_dir);
    loop {
        tokio::select! {
            _ = shutdown.changed() => if *shutdown.borrow() { break },
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Err(why) = peer_allowed(&stream) {
                        tracing::warn!(%why, "admin connection refused");
                        tokio::spawn(refuse(stream, why));
                        continue;
                    }
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &ctx).await {
                            tracing::warn!(error = %e, "admin request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&p);
    Ok(())
}

/// Whether the peer may use the socket: root, or the user the router runs as.
fn peer_allowed(stream: &tokio::net::UnixStream) -> std::result::Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("the peer's credentials are unknown: {e}"))?;
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let own = unsafe { libc::geteuid() };
    match cred.uid() {
        0 => Ok(()),
        uid if uid == own => Ok(()),
        uid => Err(format!(
            "uid {uid} (pid {}) is neither root nor the router's user (uid {own})",
            cred.pid().map_or("unknown".to_string(), |p| p.to_string())
        )),
    }
}

/// Answers a refused peer, after its request (unread, unparsed), with exit code 1
/// and the reason, then closes.
async fn refuse(stream: tokio::net::UnixStream, why: String) {
    let text = format!("clustermail: admin socket: permission denied: {why}\n");
    let head = serde_json::json!({"code": 1, "stdout": 0, "stderr": text.len()});
    let answer = format!("{head}\n{text}");
    let (read, mut write) = stream.into_split();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut skipped = String::new();
        let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
        let _ = reader.read_line(&mut skipped).await;
        let _ = write.write_all(answer.as_bytes()).await;
        let _ = write.shutdown().await;
    })
    .await;
}

async fn handle(stream: tokio::net::UnixStream, ctx: &Context) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = match serde_json::from_str::<Request>(&line) {
        Err(e) => {
            writeln!(err, "bad admin request: {e}")?;
            2
        }
        Ok(req) => {
            match Cli::try_parse_from(std::iter::once("clustermail".to_string()).chain(req.args)) {
                Err(e) => {
                    write!(err, "{}", e.render())?;
                    2
                }
                Ok(parsed) if !parsed.command.needs_store() => {
                    writeln!(err, "not a command the router runs")?;
                    2
                }
                Ok(parsed) => {
                    let mut command = parsed.command;
                    command.absolutize(&req.cwd);
                    match crate::admin::execute(ctx, command, &mut out, &mut err).await {
                        Ok(exit) => exit as i32,
                        Err(e) => {
                            writeln!(err, "clustermail: {e:#}")?;
                            1
                        }
                    }
                }
            }
        }
    };
    let mut head = serde_json::to_vec(&Header {
        code,
        stdout: out.len(),
        stderr: err.len(),
    })?;
    head.push(b'\n');
    write.write_all(&head).await?;
    write.write_all(&out).await?;
    write.write_all(&err).await?;
    write.shutdown().await?;
    Ok(())
}
