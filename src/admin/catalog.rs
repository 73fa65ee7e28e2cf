//! `clustermail catalog …`: import, validate, export, list, show, set-state.

use super::Exit;
use crate::catalog::{
    self, files, AdminState, Catalog, Format, ImportError, Mailbox, Mode, ReplicaState, Server,
};
use crate::cli::{ExportFormat, Only, What};
use anyhow::Result;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// Imports of more mailboxes than this show a progress bar (on a terminal).
const PROGRESS_FROM: usize = 20_000;

/// `catalog import` and `catalog validate` (a dry run that prints no counts).
pub fn import(
    cat: &Catalog,
    paths: &[PathBuf],
    mode: Mode,
    dry_run: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit> {
    let input = catalog::read_files(paths);
    let progress = if std::io::stderr().is_terminal() && input.mailboxes.len() >= PROGRESS_FROM {
        let pb = indicatif::ProgressBar::new(input.mailboxes.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} mailboxes ({eta})",
            )?
            .progress_chars("=> "),
        );
        pb.set_message("importing");
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    match cat.import(input, mode, dry_run, &progress) {
        Ok(report) => {
            let verb = if dry_run { "would be" } else { "" };
            if report.clusters != Default::default() {
                writeln!(out, "clusters:  {}{}", report.clusters, suffix(verb))?;
            }
            writeln!(out, "servers:   {}{}", report.servers, suffix(verb))?;
            writeln!(out, "mailboxes: {}{}", report.mailboxes, suffix(verb))?;
            Ok(Exit::Ok)
        }
        Err(ImportError::Invalid(problems)) => {
            for line in &problems {
                writeln!(err, "{line}")?;
            }
            writeln!(
                err,
                "{} problem(s); nothing was imported, the catalog is unchanged",
                problems.len()
            )?;
            Ok(Exit::Invalid)
        }
        Err(ImportError::Store(e)) => Err(e),
    }
}

fn suffix(verb: &str) -> String {
    if verb.is_empty() {
        String::new()
    } else {
        format!(" ({verb}; dry run)")
    }
}

/// `catalog validate`: the import checks in merge mode against the catalog, no write.
pub fn validate(
    cat: &Catalog,
    paths: &[PathBuf],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit> {
    let input = catalog::read_files(paths);
    let (servers, mailboxes) = (input.servers.len(), input.mailboxes.len());
    match cat.import(input, Mode::Merge, true, &indicatif::ProgressBar::hidden()) {
        Ok(_) => {
            writeln!(
                out,
                "ok: {servers} server(s), {mailboxes} mailbox(es) valid"
            )?;
            Ok(Exit::Ok)
        }
        Err(ImportError::Invalid(problems)) => {
            for line in &problems {
                writeln!(err, "{line}")?;
            }
            writeln!(err, "{} problem(s)", problems.len())?;
            Ok(Exit::Invalid)
        }
        Err(ImportError::Store(e)) => Err(e),
    }
}

/// `catalog export`: the whole catalog (or one part) in a format `import` reads
/// back, or as LDIF under `base_dn`.
pub fn export(
    cat: &Catalog,
    format: ExportFormat,
    base_dn: Option<&str>,
    only: Option<Only>,
    output: Option<&Path>,
    out: &mut dyn Write,
) -> Result<Exit> {
    let format = match (format, base_dn) {
        (ExportFormat::Toml, None) => Format::Toml,
        (ExportFormat::Json, None) => Format::Json,
        (ExportFormat::Csv, None) => Format::Csv,
        (ExportFormat::Ldif, Some(base)) => {
            let base = base.trim();
            anyhow::ensure!(
                base.contains('='),
                "--base-dn {base:?} is not a DN (e.g. dc=example,dc=com)"
            );
            return write_out(output, out, |w| {
                crate::directory::write_ldif(w, cat, base, only.map(|o| o == Only::Mailboxes))
            });
        }
        (ExportFormat::Ldif, None) => {
            anyhow::bail!("--format ldif needs --base-dn DN (the directory's catalog base)")
        }
        (_, Some(_)) => anyhow::bail!("--base-dn goes with --format ldif only"),
    };
    let only = match (format, only) {
        (Format::Csv, Some(Only::Servers)) => {
            anyhow::bail!("CSV holds mailboxes only; export servers as toml or json")
        }
        (Format::Csv, _) => Some(Only::Mailboxes),
        (_, o) => o,
    };
    let (clusters, servers) = if only == Some(Only::Mailboxes) {
        (Vec::new(), Vec::new())
    } else {
        (cat.clusters()?, cat.servers(None))
    };
    let mailboxes = if only == Some(Only::Servers) {
        Vec::new()
    } else {
        cat.mailboxes(None, None)?
    };
    write_out(output, out, |w| {
        files::write(w, format, &clusters, &servers, &mailboxes)
    })
}

/// Runs `write` into `output` (atomically: a `.partial` file renamed) or `out`.
fn write_out(
    output: Option<&Path>,
    out: &mut dyn Write,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<Exit> {
    match output {
        Some(path) => {
            let tmp = path.with_extension("partial");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            write(&mut f)?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)?;
        }
        None => write(out)?,
    }
    Ok(Exit::Ok)
}

/// `catalog list servers|mailboxes [--cluster C] [--server S]`.
pub fn list(
    cat: &Catalog,
    what: What,
    cluster: Option<&str>,
    server: Option<&str>,
    out: &mut dyn Write,
) -> Result<Exit> {
    if let Some(s) = server {
        if cat.server(s).is_none() {
            anyhow::bail!("no server named {s:?} in the catalog");
        }
    }
    match what {
        What::Servers => {
            let rows: Vec<Server> = cat
                .servers(cluster)
                .into_iter()
                .filter(|s| server.is_none_or(|n| s.name.eq_ignore_ascii_case(n)))
                .collect();
            let w = rows.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
            let cw = rows
                .iter()
                .map(|s| s.cluster.len())
                .max()
                .unwrap_or(7)
                .max(7);
            writeln!(
                out,
                "{:w$}  {:cw$}  {:14}  ADDRESS",
                "NAME", "CLUSTER", "STATE"
            )?;
            for s in rows {
                writeln!(
                    out,
                    "{:w$}  {:cw$}  {:14}  {}",
                    s.name,
                    s.cluster,
                    s.state.as_str(),
                    s.address
                )?;
            }
        }
        What::Mailboxes => {
            for m in cat.mailboxes(cluster, server)? {
                writeln!(out, "{}", mailbox_line(&m))?;
            }
        }
    }
    Ok(Exit::Ok)
}

fn mailbox_line(m: &Mailbox) -> String {
    let mut line = format!("{}  home={}", m.address, m.home);
    if !m.replicas.is_empty() {
        line.push_str(&format!("  replicas={}", m.replicas.join(",")));
    }
    if !m.aliases.is_empty() {
        line.push_str(&format!("  aliases={}", m.aliases.join(",")));
    }
    line
}

/// `catalog show ADDRESS`: the mailbox owning an address, its home and replicas.
pub fn show(
    cat: &Catalog,
    address: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit> {
    let Some(l) = cat.lookup(address)? else {
        writeln!(
            err,
            "{address}: no mailbox or alias with this address in the catalog"
        )?;
        return Ok(Exit::Invalid);
    };
    writeln!(out, "address:  {}", l.mailbox.address)?;
    if !l.mailbox.aliases.is_empty() {
        writeln!(out, "aliases:  {}", l.mailbox.aliases.join(", "))?;
    }
    writeln!(out, "cluster:  {}", l.home.cluster)?;
    let copy = |s: &Server| match l.mailbox.state_on(&s.name) {
        ReplicaState::InService => String::new(),
        st => format!("; this mailbox's copy: {st}"),
    };
    writeln!(out, "home:     {}{}", server_line(&l.home), copy(&l.home))?;
    if l.replicas.is_empty() {
        writeln!(
            out,
            "replicas: none (held on the home server when it is down)"
        )?;
    }
    for (i, r) in l.replicas.iter().enumerate() {
        writeln!(out, "replica {}: {}{}", i + 1, server_line(r), copy(r))?;
    }
    Ok(Exit::Ok)
}

fn server_line(s: &Server) -> String {
    format!(
        "{} ({}, {}, cluster {})",
        s.name, s.address, s.state, s.cluster
    )
}

/// `catalog set-state SERVER STATE`.
pub fn set_state(
    cat: &Catalog,
    server: &str,
    state: AdminState,
    out: &mut dyn Write,
) -> Result<Exit> {
    let s = cat.set_state(server, state)?;
    writeln!(out, "{}: {}", s.name, s.state)?;
    Ok(Exit::Ok)
}

/// `catalog set-state --mailbox ADDRESS SERVER STATE`: the state of one copy of
/// one mailbox (its home or a replica), written as a one-mailbox merge import
/// (validated, aliases kept in step).
pub fn set_mailbox_state(
    cat: &Catalog,
    address: &str,
    server: &str,
    state: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit> {
    let state: ReplicaState = match state.parse() {
        Ok(s) => s,
        Err(e) => {
            writeln!(err, "{e}")?;
            return Ok(Exit::Invalid);
        }
    };
    let Some(l) = cat.lookup(address)? else {
        writeln!(
            err,
            "{address}: no mailbox or alias with this address in the catalog"
        )?;
        return Ok(Exit::Invalid);
    };
    let mut mailbox = l.mailbox;
    if let Err(e) = mailbox.set_state_on(server, state) {
        writeln!(err, "{e}")?;
        return Ok(Exit::Invalid);
    }
    let address = mailbox.address.clone();
    let name = std::iter::once(&mailbox.home)
        .chain(mailbox.replicas.iter())
        .find(|s| s.eq_ignore_ascii_case(server.trim()))
        .cloned()
        .unwrap_or_else(|| server.to_string());
    let input = catalog::Input {
        files: vec![PathBuf::from("set-state")],
        mailboxes: vec![files::Row {
            item: mailbox,
            origin: files::Origin {
                file: 0,
                place: files::Place::Item {
                    kind: files::ItemKind::Mailbox,
                    index: 0,
                },
            },
        }],
        ..Default::default()
    };
    match cat.import(input, Mode::Merge, false, &indicatif::ProgressBar::hidden()) {
        Ok(_) => {
            writeln!(out, "{address} on {name}: {state}")?;
            Ok(Exit::Ok)
        }
        Err(ImportError::Invalid(problems)) => {
            for line in &problems {
                writeln!(err, "{line}")?;
            }
            Ok(Exit::Invalid)
        }
        Err(ImportError::Store(e)) => Err(e),
    }
}
