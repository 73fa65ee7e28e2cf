//! Local service monitoring (FortiMail's `set system ha lservice`): whether this
//! unit can serve at all — its own SMTP listener greets, its store can be
//! written, the data disk has `min_free_disk` free. A MASTER that cannot serve
//! gives up (see `state::Unit::local`); a unit alone answers new mail with
//! `452 4.3.1` while the disk is below its threshold ([`watch_disk`]).
//!
//! Also owns the free-space measurement.

use crate::health::Probe;
use std::path::Path;
use std::time::Duration;

/// Free bytes for an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a NUL-terminated string and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Human form of a byte count, for messages.
pub fn show_size(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if n as f64 >= GIB {
        format!("{:.1}GiB", n as f64 / GIB)
    } else {
        format!("{:.1}MiB", n as f64 / MIB)
    }
}

/// Why the data disk is too full, if it is (an unreadable free space counts:
/// the store cannot be trusted to take mail).
pub fn disk_problem(dir: &Path, min_free: u64, key: &str) -> Option<String> {
    match free_bytes(dir) {
        Ok(free) if free < min_free => Some(format!(
            "free space on {} is {}, below {key} ({})",
            dir.display(),
            show_size(free),
            show_size(min_free)
        )),
        Ok(_) => None,
        Err(e) => Some(format!("free space on {}: {e}", dir.display())),
    }
}

/// Why the store cannot be written, if it cannot: a small record written and
/// flushed to disk (a full disk or an I/O error fails it).
pub async fn store_problem(meta: &sled::Tree) -> Option<String> {
    let now = crate::queue::manager::now_ms().to_be_bytes();
    if let Err(e) = meta.insert(b"ha.local_check", &now) {
        return Some(format!("the store cannot be written: {e}"));
    }
    match meta.flush_async().await {
        Ok(_) => None,
        Err(e) => Some(format!("the store cannot be written: {e}")),
    }
}

/// Why this unit's own SMTP listener does not serve, if it does not: no greeting
/// at all within `timeout` (any reply code counts as serving: 421 under load is
/// not a failure of the service).
pub async fn smtp_problem(address: &str, timeout: Duration) -> Option<String> {
    match crate::health::probe::probe(address, timeout).await {
        Probe::Banner { .. } => None,
        Probe::Failed(why) => Some(format!(
            "this unit's SMTP listener {address} does not greet: {why}"
        )),
    }
}

/// The address to check this unit's SMTP listener at: the first listen address,
/// with an unspecified IP (0.0.0.0, ::) replaced by loopback.
pub fn self_address(listen: &[String]) -> Option<String> {
    let addr: std::net::SocketAddr = listen.first()?.parse().ok()?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    Some(std::net::SocketAddr::new(ip, addr.port()).to_string())
}

/// Measures the data disk every `every` until `stopped`, setting `flag` while it
/// is below `min_free` (`smtp.min_free_disk`) and logging each change.
pub async fn watch_disk(
    flag: crate::gate::LowDisk,
    dir: std::path::PathBuf,
    min_free: u64,
    every: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let problem = disk_problem(&dir, min_free, "smtp.min_free_disk");
        if flag.set(problem.is_some()) {
            match problem {
                Some(why) => {
                    tracing::error!(%why, "disk nearly full: new mail is refused with 452 4.3.1")
                }
                None => {
                    tracing::info!(dir = %dir.display(), "free disk space is back: new mail is taken again")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.changed() => if *stopped.borrow() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_disk_is_measured_and_compared() {
        let dir = std::env::temp_dir();
        assert!(free_bytes(&dir).is_ok());
        assert!(disk_problem(&dir, 0, "k").is_none());
        let why = disk_problem(&dir, u64::MAX, "ha.min_free_disk").unwrap();
        assert!(why.contains("below ha.min_free_disk"), "{why}");
        assert!(disk_problem(Path::new("/nonexistent/x"), 0, "k").is_some());
    }

    #[test]
    fn a_master_that_cannot_serve_gives_up_as_on_failure_says() {
        use super::super::state::{Mode, Tick, Unit};
        use crate::config::{HaRole, OnFailure};
        for (on_failure, after) in [
            (OnFailure::Slave, Mode::Failed),
            (OnFailure::Off, Mode::Off),
        ] {
            let mut u = Unit::new(HaRole::Primary, on_failure, 2, 0);
            for _ in 0..2 {
                u.tick(&Tick::default());
            }
            assert_eq!(u.mode, Mode::Master);
            let disk = || Some("free space below ha.min_free_disk".to_string());
            assert!(u.local(disk()).is_none(), "one failed check is not enough");
            let c = u.local(disk()).expect("gives up");
            assert_eq!((c.from, c.to), (Mode::Master, after));
            assert!(c.why.contains("cannot serve"), "{}", c.why);
        }
        // While the checks fail it does not take MASTER back on its own...
        let mut u = Unit::new(HaRole::Primary, OnFailure::Restore, 1, 0);
        u.local(Some("store cannot be written".into()));
        for _ in 0..3 {
            assert!(u.tick(&Tick::default()).is_none());
        }
        assert_eq!(u.mode, Mode::Starting);
        assert!(u.why.contains("cannot serve"), "{}", u.why);
        // ...and does once they pass.
        u.local(None);
        assert_eq!(u.tick(&Tick::default()).map(|c| c.to), Some(Mode::Master));
        // An administrator may still force it.
        let mut u = Unit::new(HaRole::Secondary, OnFailure::Slave, 1, 0);
        u.local(Some("disk".into()));
        assert_eq!(u.set_mode(true, None).map(|c| c.to), Some(Mode::Master));
    }

    #[test]
    fn an_unspecified_listen_address_is_checked_on_loopback() {
        assert_eq!(
            self_address(&["0.0.0.0:25".into()]).as_deref(),
            Some("127.0.0.1:25")
        );
        assert_eq!(
            self_address(&["[::]:2525".into()]).as_deref(),
            Some("[::1]:2525")
        );
        assert_eq!(self_address(&[]), None);
    }
}
