//! The sled store of a data dir: where it lives, how it is opened (segment size,
//! cache, a clear error when another process holds it) and kept private (0700/0600).

use anyhow::{anyhow, Context, Result};

/// sled's log segment size for a new store: 8 MiB. With the default 512 KiB a
/// segment filled every ~50 messages of 10 KB, and the flush that rolled it over
/// took up to 20 ms: that was the whole p99 of accept latency (measured: one
/// client on an idle router, p99 8 ms → 1 ms). sled refuses to open a store with
/// another size than it was made with, so an existing store keeps its own.
fn segment_size(store: &std::path::Path) -> usize {
    // The file ends in a binary checksum: not valid UTF-8 as a whole.
    std::fs::read(store.join("conf"))
        .ok()
        .and_then(|conf| {
            String::from_utf8_lossy(&conf)
                .lines()
                .find_map(|l| l.strip_prefix("segment_size: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(8 << 20)
}

/// The sled store's directory in `data_dir`.
pub fn store_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("store")
}

/// Opens (creating) the sled store of a data dir, with a clear error when another
/// process holds it. Queued mail is private whatever the umask: a new data dir is
/// made 0700, and the store's own files are kept 0600 (its directories 0700).
pub fn open_db(data_dir: &std::path::Path, cache_bytes: u64) -> Result<sled::Db> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    if let Ok(meta) = std::fs::metadata(data_dir) {
        if meta.permissions().mode() & 0o007 != 0 {
            tracing::warn!(data_dir = %data_dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the data dir is open to other users: make it 0700 (or 0750 for a group)");
        }
    }
    let path = store_path(data_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        })
        .with_context(|| format!("cannot create {}", path.display()))?;
    let db = open_sled(&path, cache_bytes)?;
    make_private(&path).with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(db)
}

/// Takes every permission of group and others off `dir` and what it holds (sled
/// made its files under the process umask; a store made by an older version may
/// be readable by all).
fn make_private(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

fn open_sled(path: &std::path::Path, cache_bytes: u64) -> Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .segment_size(segment_size(path))
        .open()
        .map_err(|e| match e {
            // sled wraps the lock's EWOULDBLOCK in an error of its own words.
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.raw_os_error() == Some(11)
                    || io.to_string().contains("could not acquire lock") =>
            {
                anyhow!(
                    "the store {} is in use by another process (is `clustermail serve` running?)",
                    path.display()
                )
            }
            other => anyhow!("cannot open the store {}: {other}", path.display()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store again once the last one is closed: sled's background
    /// threads let go of its file lock a moment after the handle is dropped.
    fn reopen(data: &std::path::Path) -> sled::Db {
        for _ in 0..200 {
            match open_db(data, 1 << 20) {
                Ok(db) => return db,
                Err(e)
                    if format!("{e:#}").contains("lock") || format!("{e:#}").contains("in use") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => panic!("{e:#}"),
            }
        }
        panic!("the store stayed locked for 10 s")
    }

    #[test]
    fn a_store_made_with_the_old_segment_size_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = sled::Config::new()
                .path(dir.path().join("store"))
                .segment_size(512 * 1024)
                .open()
                .unwrap();
            old.insert(b"k", b"v".as_slice()).unwrap();
            old.flush().unwrap();
        }
        // Opens with its own segment size.
        let db = reopen(dir.path());
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(b"v".as_slice()));
        drop(db);
        // A new store gets the large segments.
        let fresh = tempfile::tempdir().unwrap();
        drop(open_db(fresh.path(), 1 << 20).unwrap());
        assert_eq!(segment_size(&fresh.path().join("store")), 8 << 20);
    }

    #[test]
    fn a_store_left_open_to_others_is_made_private_at_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(open_db(&data, 1 << 20).unwrap());
        assert_eq!(mode(&data), 0o700, "a new data dir");
        // As an older version under umask 022 (or 000) left it.
        let store = data.join("store");
        for f in [&store, &store.join("conf"), &store.join("db")] {
            let open = if f.is_dir() { 0o777 } else { 0o666 };
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(open)).unwrap();
        }
        drop(reopen(&data));
        assert_eq!(mode(&store), 0o700);
        assert_eq!(mode(&store.join("conf")), 0o600);
        assert_eq!(mode(&store.join("db")), 0o600);
    }
}
