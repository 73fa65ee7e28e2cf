//! Who may use the console: console users (argon2 password hashes) and API tokens
//! (SHA-256 of a random token) in the store's `web` tree, the first start's
//! generated admin password, in-memory sessions with server-side expiry and a
//! CSRF token each, and the per-address limit on wrong passwords.

use anyhow::{Context as _, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The user the first start creates.
pub const ADMIN: &str = "admin";
/// Where the first start writes the generated password (mode 0600).
pub const INITIAL_PASSWORD_FILE: &str = "web-initial-password";
/// Wrong passwords from one address before it must wait.
pub const MAX_FAILURES: u32 = 5;
/// How long failures count against an address.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);

const TREE: &str = "web";
/// An argon2 hash (default parameters) of a password nobody knows, checked for
/// unknown users.
const UNKNOWN_USER_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$4Xv0m1rR0ZgH3bGZ0uJp0mSgk3fGq6lJq0pP9B7xk6Q";
const USER: &str = "user:";
const TOKEN: &str = "token:";

/// `n` random octets as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // SystemRandom fails only without an OS random source; nothing can run then.
    if SystemRandom::new().fill(&mut buf).is_err() {
        panic!("no operating system random source");
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equal without leaking where they differ through timing.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn check_user_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        anyhow::bail!("user or token name {name:?}: use 1-64 letters, digits, - _ . @");
    }
    Ok(())
}

/// Console users and API tokens as stored.
#[derive(Clone)]
pub struct Store {
    tree: sled::Tree,
}

impl Store {
    pub fn open(db: &sled::Db) -> Result<Store> {
        Ok(Store {
            tree: db.open_tree(TREE)?,
        })
    }

    pub fn has_users(&self) -> bool {
        self.tree.scan_prefix(USER).next().is_some()
    }

    /// Sets (or creates) `user`'s password; only its argon2 hash is stored.
    pub fn set_password(&self, user: &str, password: &str) -> Result<()> {
        check_user_name(user)?;
        if password.chars().count() < 8 {
            anyhow::bail!("the password is too short: use at least 8 characters");
        }
        let salt = SaltString::encode_b64(random_hex(16).as_bytes())
            .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?
            .to_string();
        self.tree.insert(format!("{USER}{user}"), hash.as_bytes())?;
        self.tree.flush()?;
        Ok(())
    }

    /// Whether `password` is `user`'s (slow on purpose: call off the async threads).
    /// An unknown user costs the same hash, so timing does not tell users apart.
    pub fn verify_password(&self, user: &str, password: &str) -> bool {
        let stored = self
            .tree
            .get(format!("{USER}{user}"))
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v.to_vec()).ok());
        let known = stored.is_some();
        let text = stored.unwrap_or_else(|| UNKNOWN_USER_HASH.to_string());
        let Ok(hash) = PasswordHash::new(&text) else {
            return false;
        };
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok();
        known && matches
    }

    /// A new API token named `name` (replacing one of that name); the clear token
    /// is returned once, only its SHA-256 is kept.
    pub fn create_token(&self, name: &str) -> Result<String> {
        check_user_name(name)?;
        let token = format!("cmt_{}", random_hex(32));
        self.tree
            .insert(format!("{TOKEN}{name}"), sha256_hex(&token).as_bytes())?;
        self.tree.flush()?;
        Ok(token)
    }

    /// Removes token `name`; false when there was none.
    pub fn revoke_token(&self, name: &str) -> Result<bool> {
        let gone = self.tree.remove(format!("{TOKEN}{name}"))?.is_some();
        self.tree.flush()?;
        Ok(gone)
    }

    /// The name of the token `token` is, if it is one.
    pub fn token_name(&self, token: &str) -> Option<String> {
        let want = sha256_hex(token);
        self.tree.scan_prefix(TOKEN).flatten().find_map(|(k, v)| {
            same(std::str::from_utf8(&v).ok()?, &want)
                .then(|| String::from_utf8_lossy(&k[TOKEN.len()..]).into_owned())
        })
    }

    /// First start: with no console user yet, creates `admin` with a random
    /// password written to `data_dir/web-initial-password` (mode 0600). Returns
    /// that file's path when it made one.
    pub fn ensure_initial(&self, data_dir: &Path) -> Result<Option<PathBuf>> {
        if self.has_users() {
            return Ok(None);
        }
        let password = random_hex(12);
        let path = data_dir.join(INITIAL_PASSWORD_FILE);
        write_private(&path, &format!("{password}\n"))?;
        self.set_password(ADMIN, &password)?;
        Ok(Some(path))
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// A logged-in browser.
#[derive(Clone)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    expires: Instant,
    /// A message for the next page (what an action did).
    pub flash: Option<(bool, String)>,
    /// Catalog uploads checked by a dry run, waiting to be applied: id → file.
    pub uploads: HashMap<String, PathBuf>,
}

/// The sessions of this process (a restart logs everyone out).
pub struct Sessions {
    lifetime: Duration,
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(lifetime: Duration) -> Sessions {
        Sessions {
            lifetime,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for `user`; returns its id (the cookie value).
    pub fn create(&self, user: &str) -> String {
        let id = random_hex(32);
        let now = Instant::now();
        let mut map = self.map();
        map.retain(|_, s| s.expires > now);
        map.insert(
            id.clone(),
            Session {
                user: user.to_string(),
                csrf: random_hex(32),
                expires: now + self.lifetime,
                flash: None,
                uploads: HashMap::new(),
            },
        );
        id
    }

    /// The live session `id`, if any (an expired one is dropped).
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map();
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Changes session `id` in place.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Session)) {
        if let Some(s) = self.map().get_mut(id) {
            f(s);
        }
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

/// Wrong passwords per client address, within [`FAILURE_WINDOW`].
#[derive(Default)]
pub struct Limiter {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Limiter {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `ip` must still wait, when it has used up its tries.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let map = self.map();
        let &(n, since) = map.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (n >= MAX_FAILURES).then_some(left)
    }

    /// Counts a wrong password; returns the failures now counted.
    pub fn failed(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        let mut map = self.map();
        if map.len() > 10_000 {
            map.retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
        }
        let e = map.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) >= FAILURE_WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
        e.0
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.map().remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let store = Store::open(&db).unwrap();
        let file = store.ensure_initial(dir.path()).unwrap().unwrap();
        let password = std::fs::read_to_string(&file).unwrap();
        let password = password.trim();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(store.verify_password(ADMIN, password));
        assert!(!store.verify_password(ADMIN, "wrong password"));
        assert!(PasswordHash::new(UNKNOWN_USER_HASH).is_ok());
        assert!(!store.verify_password("nobody", password));
        assert!(store.ensure_initial(dir.path()).unwrap().is_none());
        let stored = store.tree.get("user:admin").unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&stored).contains(password));
        assert!(String::from_utf8_lossy(&stored).starts_with("$argon2"));

        let token = store.create_token("ci").unwrap();
        assert_eq!(store.token_name(&token).as_deref(), Some("ci"));
        assert_eq!(store.token_name("cmt_nope"), None);
        assert!(store.revoke_token("ci").unwrap());
        assert_eq!(store.token_name(&token), None);
    }

    #[test]
    fn five_failures_block_the_address() {
        let l = Limiter::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        for n in 1..MAX_FAILURES {
            assert_eq!(l.failed(ip), n);
            assert!(l.blocked(ip).is_none());
        }
        l.failed(ip);
        assert!(l.blocked(ip).is_some());
        assert!(l.blocked("127.0.0.10".parse().unwrap()).is_none());
    }

    #[test]
    fn sessions_expire() {
        let s = Sessions::new(Duration::from_millis(0));
        let id = s.create("admin");
        assert!(s.get(&id).is_none());
        let s = Sessions::new(Duration::from_secs(60));
        let id = s.create("admin");
        assert_eq!(s.get(&id).unwrap().user, "admin");
    }
}
