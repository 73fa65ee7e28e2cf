//! `[directory]`: the LDAP directory this router's catalog is a replica of.
//! Plain data and its checks; the password is read from `password_file` when the
//! consumer connects, never kept in the config.

use serde::{Deserialize, Deserializer, Serialize};
use std::path::PathBuf;

/// `[directory]`: with it, the directory is the source of truth of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// `ldap://host:port` or `ldaps://host:port`; several (a list) are tried in
    /// turn, for failover between directory servers.
    #[serde(deserialize_with = "one_or_many")]
    pub url: Vec<String>,
    /// The entry the catalog is searched under (subtree).
    pub base_dn: String,
    /// Simple bind DN; unset: anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_dn: Option<String>,
    /// A file holding the bind password (trailing line ends ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates that verify `ldaps://` servers; unset: the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// After this long without a word from the directory server, the consumer
    /// asks it a trivial question; no answer within the same time, and the
    /// connection is taken for dead (a silent partition) and made anew.
    #[serde(default = "default_idle_probe", with = "humantime_serde")]
    pub idle_probe: std::time::Duration,
}

fn default_idle_probe() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl DirectoryConfig {
    /// Checks what TOML types cannot; errors name the key.
    pub fn check(&self) -> Result<(), String> {
        if self.url.is_empty() {
            return Err("directory.url: give at least one ldap:// or ldaps:// URL".into());
        }
        for u in &self.url {
            if !(u.starts_with("ldap://") || u.starts_with("ldaps://")) {
                return Err(format!(
                    "directory.url: {u:?} is not an ldap:// or ldaps:// URL"
                ));
            }
        }
        if self.base_dn.trim().is_empty() || !self.base_dn.contains('=') {
            return Err(format!(
                "directory.base_dn: {:?} is not a DN (e.g. \"dc=example,dc=com\")",
                self.base_dn
            ));
        }
        if self.password_file.is_some() && self.bind_dn.is_none() {
            return Err("directory.password_file needs directory.bind_dn".into());
        }
        if let Some(f) = &self.password_file {
            if !f.is_file() {
                return Err(format!(
                    "directory.password_file: {} is not a file",
                    f.display()
                ));
            }
        }
        if self.idle_probe.is_zero() {
            return Err("directory.idle_probe must be above 0".into());
        }
        if let Some(f) = &self.tls_ca_file {
            if !f.is_file() {
                return Err(format!(
                    "directory.tls_ca_file: {} is not a file",
                    f.display()
                ));
            }
        }
        Ok(())
    }

    /// The bind password, read from `password_file` (empty: none).
    pub fn password(&self) -> anyhow::Result<String> {
        match &self.password_file {
            None => Ok(String::new()),
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("directory.password_file {}: {e}", f.display()))?;
                Ok(text.trim_end_matches(['\r', '\n']).to_string())
            }
        }
    }
}

/// The refusal of a catalog write while the directory is the source of truth.
pub fn refusal(what: &str) -> String {
    format!(
        "{what} is refused: this router's catalog is synced from the LDAP directory \
         ([directory] in the config), which is the source of truth; change the \
         directory instead (see README \"Many routers\")"
    )
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn one_url_or_several_and_errors_name_the_key() {
        let c = Config::parse(
            "[directory]\nurl = \"ldap://127.0.0.1:389\"\nbase_dn = \"dc=x,dc=test\"\n",
        )
        .expect("valid");
        assert_eq!(c.directory.as_ref().unwrap().url, ["ldap://127.0.0.1:389"]);
        let c = Config::parse(
            "[directory]\nurl = [\"ldaps://a.test\", \"ldap://b.test:3389\"]\nbase_dn = \"dc=x\"\n",
        )
        .expect("valid");
        assert_eq!(c.directory.as_ref().unwrap().url.len(), 2);
        let toml = c.to_toml().unwrap();
        assert!(toml.contains("[directory]"), "{toml}");
        for (bad, key) in [
            ("url = \"http://x\"\nbase_dn = \"dc=x\"\n", "directory.url"),
            ("url = \"ldap://x\"\nbase_dn = \"x\"\n", "directory.base_dn"),
            (
                "url = \"ldap://x\"\nbase_dn = \"dc=x\"\npassword_file = \"/nonexistent\"\n",
                "directory.password_file",
            ),
        ] {
            let e = Config::parse(&format!("[directory]\n{bad}")).unwrap_err();
            assert!(format!("{e:#}").contains(key), "{e:#}");
        }
    }
}
