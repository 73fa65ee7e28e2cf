//! Reading and writing catalog files: `.toml` and `.json` hold `server` and
//! `mailbox` lists, `.csv` holds mailboxes (`address,home,replicas,aliases`, lists
//! separated by `;`).
//!
//! A mailbox's per-copy states are written where the copy is named: in TOML/JSON
//! `home_state = "out-of-service"` and `replicas = ["mail-2", { server = "mail-3",
//! state = "pending-delete" }]`; in CSV a `=state` suffix (`mail-1=out-of-service`,
//! `mail-2;mail-3=pending-delete`). In-service copies are written plainly.
//!
//! Reading never stops at the first bad row: every row is parsed on its own and
//! every problem is kept with its origin (`FILE:LINE` for CSV, `FILE: mailbox[i]`
//! for TOML and JSON), so an administrator fixes a file in one pass.

use super::model::{Cluster, Mailbox, Server};
use item::{named_state, with_state, MailboxItem};
use serde::de::DeserializeOwned;
use serde::Serialize;

mod item;
use std::path::{Path, PathBuf};

/// Where a row came from: an index into the list of files read, and a place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub file: u32,
    pub place: Place,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The file as a whole (it could not be read or parsed at all).
    File,
    /// A line of a text file (CSV rows, TOML/JSON syntax errors).
    Line(u64),
    /// An item of a TOML/JSON list.
    Item { kind: ItemKind, index: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    Cluster,
    Server,
    Mailbox,
}

impl ItemKind {
    fn key(self) -> &'static str {
        match self {
            ItemKind::Cluster => "cluster",
            ItemKind::Server => "server",
            ItemKind::Mailbox => "mailbox",
        }
    }
}

/// One problem found in the input, ready to print as `FILE:LINE: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Option<Origin>,
    pub message: String,
}

/// A row read from a file, with its origin.
#[derive(Debug, Clone)]
pub struct Row<T> {
    pub item: T,
    pub origin: Origin,
}

/// Everything read from the files of one import: they form one unit.
#[derive(Debug, Default)]
pub struct Input {
    pub files: Vec<PathBuf>,
    pub servers: Vec<Row<Server>>,
    pub mailboxes: Vec<Row<Mailbox>>,
    pub clusters: Vec<Row<Cluster>>,
    pub problems: Vec<Problem>,
}

impl Input {
    /// Formats an origin as the administrator reads it.
    pub fn locate_in(files: &[PathBuf], origin: Option<Origin>) -> String {
        let Some(o) = origin else {
            return "catalog".to_string();
        };
        let file = files
            .get(o.file as usize)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "?".into());
        match o.place {
            Place::File => file,
            Place::Line(n) => format!("{file}:{n}"),
            Place::Item { kind, index } => format!("{file}: {}[{index}]", kind.key()),
        }
    }

    fn problem(&mut self, file: u32, place: Place, message: impl Into<String>) {
        self.problems.push(Problem {
            origin: Some(Origin { file, place }),
            message: message.into(),
        });
    }
}

/// Catalog file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Toml,
    Json,
    Csv,
}

impl Format {
    pub fn of_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "toml" => Some(Format::Toml),
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// Reads every file into one [`Input`], collecting all problems.
pub fn read_files(paths: &[PathBuf]) -> Input {
    let mut input = Input::default();
    for path in paths {
        let file = input.files.len() as u32;
        input.files.push(path.clone());
        let Some(format) = Format::of_path(path) else {
            input.problem(
                file,
                Place::File,
                "unknown file type (expected .toml, .json or .csv)",
            );
            continue;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                input.problem(file, Place::File, format!("cannot read: {e}"));
                continue;
            }
        };
        match format {
            Format::Toml => read_toml(&mut input, file, &text),
            Format::Json => read_json(&mut input, file, &text),
            Format::Csv => read_csv(&mut input, file, &text),
        }
    }
    input
}

/// Reads one catalog text (e.g. the example built into the binary) as if from a file.
pub fn read_text(name: &str, format: Format, text: &str) -> Input {
    let mut input = Input {
        files: vec![PathBuf::from(name)],
        ..Input::default()
    };
    match format {
        Format::Toml => read_toml(&mut input, 0, text),
        Format::Json => read_json(&mut input, 0, text),
        Format::Csv => read_csv(&mut input, 0, text),
    }
    input
}

fn line_of(text: &str, offset: usize) -> u64 {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64
        + 1
}

fn read_toml(input: &mut Input, file: u32, text: &str) {
    let table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let place = e
                .span()
                .map(|s| Place::Line(line_of(text, s.start)))
                .unwrap_or(Place::File);
            input.problem(file, place, format!("TOML syntax: {}", e.message()));
            return;
        }
    };
    let doc = table.into_iter().map(|(k, v)| {
        let v = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
        (k, v)
    });
    read_document(input, file, doc);
}

fn read_json(input: &mut Input, file: u32, text: &str) {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            input.problem(
                file,
                Place::Line(e.line() as u64),
                format!("JSON syntax: {e}"),
            );
            return;
        }
    };
    let serde_json::Value::Object(map) = value else {
        input.problem(
            file,
            Place::File,
            "expected an object with \"server\" and \"mailbox\" lists",
        );
        return;
    };
    read_document(input, file, map.into_iter());
}

/// Reads the `cluster`, `server` and `mailbox` lists of a TOML or JSON document, one
/// item at a time, so that each bad item is reported on its own.
fn read_document(
    input: &mut Input,
    file: u32,
    doc: impl Iterator<Item = (String, serde_json::Value)>,
) {
    for (key, value) in doc {
        let kind = match key.as_str() {
            "cluster" => ItemKind::Cluster,
            "server" => ItemKind::Server,
            "mailbox" => ItemKind::Mailbox,
            other => {
                input.problem(
                    file,
                    Place::File,
                    format!(
                        "unknown key {other:?} (expected \"cluster\", \"server\" and \"mailbox\")"
                    ),
                );
                continue;
            }
        };
        let serde_json::Value::Array(items) = value else {
            input.problem(file, Place::File, format!("{key:?} must be a list"));
            continue;
        };
        for (index, item) in items.into_iter().enumerate() {
            let place = Place::Item {
                kind,
                index: index as u32,
            };
            let origin = Origin { file, place };
            match kind {
                ItemKind::Cluster => match parse_item::<Cluster>(item) {
                    Ok(mut c) => {
                        c.name = c.name.trim().to_string();
                        c.routers = c.routers.iter().map(|r| r.trim().to_string()).collect();
                        input.clusters.push(Row { item: c, origin })
                    }
                    Err(e) => input.problem(file, place, e),
                },
                ItemKind::Server => match parse_item::<Server>(item) {
                    Ok(s) => input.servers.push(Row {
                        item: tidy_server(s),
                        origin,
                    }),
                    Err(e) => input.problem(file, place, e),
                },
                ItemKind::Mailbox => match parse_item::<MailboxItem>(item) {
                    Ok(m) => input.mailboxes.push(Row {
                        item: tidy_mailbox(m.into()),
                        origin,
                    }),
                    Err(e) => input.problem(file, place, e),
                },
            }
        }
    }
}

fn parse_item<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| {
        let e = e.to_string();
        if e.contains("untagged enum ReplicaItem") {
            "replicas: each is a server name or { server = NAME, state = STATE } \
             (in-service, out-of-service or pending-delete)"
                .to_string()
        } else {
            e
        }
    })
}

fn tidy_server(mut s: Server) -> Server {
    s.name = s.name.trim().to_string();
    s.cluster = s.cluster.trim().to_string();
    s.address = s.address.trim().to_string();
    s
}

fn tidy_mailbox(mut m: Mailbox) -> Mailbox {
    m.address = m.address.trim().to_string();
    m.home = m.home.trim().to_string();
    for v in [&mut m.replicas, &mut m.aliases] {
        *v = v
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    m
}

/// The CSV header, in the order `export` writes it.
/// The CSV header, in the order `export` writes it; `failover` (true, false or
/// empty) is optional and written only when a mailbox overrides the global setting.
pub const CSV_COLUMNS: [&str; 5] = ["address", "home", "replicas", "aliases", "failover"];

fn read_csv(input: &mut Input, file: u32, text: &str) {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(text.as_bytes());
    let header = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            input.problem(file, Place::Line(1), format!("CSV header: {e}"));
            return;
        }
    };
    let column = match csv_columns(&header) {
        Ok(c) => c,
        Err(e) => {
            input.problem(file, Place::Line(1), e);
            return;
        }
    };
    // One row a line, less the header: the rows' array is allocated once.
    let lines = text.bytes().filter(|&b| b == b'\n').count();
    input.mailboxes.reserve(lines);
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(line);
                // A field-count error leaves the reader in sync; go on with the next row.
                if let csv::ErrorKind::UnequalLengths { len, .. } = e.kind() {
                    let want = header.len();
                    input.problem(
                        file,
                        Place::Line(line),
                        format!("row has {len} fields, the header has {want}"),
                    );
                    continue;
                }
                input.problem(file, Place::Line(line), format!("CSV: {e}"));
                break;
            }
        }
        let line = record.position().map(|p| p.line()).unwrap_or(line);
        match csv_mailbox(&record, &column) {
            Ok(None) => {}
            Ok(Some(mailbox)) => input.mailboxes.push(Row {
                item: mailbox,
                origin: Origin {
                    file,
                    place: Place::Line(line),
                },
            }),
            Err(e) => input.problem(file, Place::Line(line), e),
        }
    }
}

/// Where each of [`CSV_COLUMNS`] is in the header (address and home required).
fn csv_columns(header: &csv::StringRecord) -> Result<[Option<usize>; 5], String> {
    let mut column = [None; 5];
    for (i, name) in header.iter().enumerate() {
        match CSV_COLUMNS
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
        {
            Some(c) if column[c].is_none() => column[c] = Some(i),
            Some(_) => return Err(format!("column {name:?} appears twice")),
            None => {
                return Err(format!(
                    "unknown column {name:?} (expected address,home,replicas,aliases[,failover])"
                ))
            }
        }
    }
    if column[0].is_none() || column[1].is_none() {
        return Err("the header needs at least the columns address and home".into());
    }
    Ok(column)
}

/// One CSV row as a mailbox (None for an empty row), or what is wrong with it.
/// Each name is copied once, into a list of the size it needs.
fn csv_mailbox(
    record: &csv::StringRecord,
    column: &[Option<usize>; 5],
) -> Result<Option<Mailbox>, String> {
    if record.iter().all(str::is_empty) {
        return Ok(None);
    }
    let get = |c: Option<usize>| c.and_then(|i| record.get(i)).unwrap_or("");
    let list = |c: Option<usize>| get(c).split(';').map(str::trim).filter(|s| !s.is_empty());
    let failover = match get(column[4]) {
        "" => None,
        f if f.eq_ignore_ascii_case("true") || f.eq_ignore_ascii_case("yes") => Some(true),
        f if f.eq_ignore_ascii_case("false") || f.eq_ignore_ascii_case("no") => Some(false),
        other => {
            return Err(format!(
                "failover must be true, false or empty, not {:?}",
                other.to_ascii_lowercase()
            ))
        }
    };
    let (home, home_state) = named_state(get(column[1]))?;
    let mut replicas = Vec::with_capacity(list(column[2]).count());
    let mut replica_states = Vec::new();
    for copy in list(column[2]) {
        let (name, state) = named_state(copy)?;
        if !state.is_in_service() {
            replica_states.push((name.clone(), state));
        }
        replicas.push(name);
    }
    let mut aliases = Vec::with_capacity(list(column[3]).count());
    aliases.extend(list(column[3]).map(String::from));
    let mailbox = Mailbox {
        address: get(column[0]).to_string(),
        home,
        replicas,
        aliases,
        failover,
        home_state,
        replica_states,
    };
    if mailbox.address.is_empty() {
        return Err("address is empty".into());
    }
    if mailbox.home.is_empty() {
        return Err("home is empty".into());
    }
    Ok(Some(mailbox))
}

#[derive(Serialize)]
struct Document<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    cluster: &'a [Cluster],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    server: &'a [Server],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    mailbox: Vec<MailboxItem>,
}

/// Writes clusters, servers and mailboxes in the given format. CSV holds mailboxes only.
pub fn write(
    out: &mut dyn std::io::Write,
    format: Format,
    clusters: &[Cluster],
    servers: &[Server],
    mailboxes: &[Mailbox],
) -> anyhow::Result<()> {
    let doc = Document {
        cluster: clusters,
        server: servers,
        mailbox: mailboxes.iter().map(MailboxItem::from).collect(),
    };
    match format {
        Format::Toml => out.write_all(toml::to_string(&doc)?.as_bytes())?,
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, &doc)?;
            out.write_all(b"\n")?;
        }
        Format::Csv => {
            anyhow::ensure!(
                servers.is_empty() && clusters.is_empty(),
                "CSV holds mailboxes only"
            );
            let mut w = csv::Writer::from_writer(out);
            let overrides = mailboxes.iter().any(|m| m.failover.is_some());
            let width = if overrides { 5 } else { 4 };
            w.write_record(&CSV_COLUMNS[..width])?;
            for m in mailboxes {
                let failover = m.failover.map(|f| f.to_string()).unwrap_or_default();
                let replicas: Vec<String> = m
                    .replicas
                    .iter()
                    .map(|r| with_state(r, m.state_on(r)))
                    .collect();
                let row = [
                    m.address.as_str(),
                    &with_state(&m.home, m.home_state),
                    &replicas.join(";"),
                    &m.aliases.join(";"),
                    &failover,
                ];
                w.write_record(&row[..width])?;
            }
            w.flush()?;
        }
    }
    Ok(())
}
