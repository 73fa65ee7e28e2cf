//! The console's accounts, kept in the store's `web` tree: console users (argon2
//! password hashes), API tokens (SHA-256 of a random token), and the first start's
//! generated admin password. `clustermail web …` and the console's login share them.

use anyhow::{Context as _, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};

/// The user the first start creates.
pub const ADMIN: &str = "admin";
/// Where the first start writes the generated password (mode 0600).
pub const INITIAL_PASSWORD_FILE: &str = "web-initial-password";

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
    fn the_cli_default_user_is_the_first_start_user() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["clustermail", "web", "set-password"]).unwrap();
        let crate::cli::Command::Web {
            command: crate::cli::WebCommand::SetPassword { user, .. },
        } = cli.command
        else {
            panic!("not parsed as web set-password");
        };
        assert_eq!(user, ADMIN);
    }
}
