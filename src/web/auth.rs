//! Who is using the console now: in-memory sessions with server-side expiry and a
//! CSRF token each, and the per-address limit on wrong passwords. The accounts
//! (console users, API tokens) are kept by [`crate::admin::users`].

use crate::admin::users::random_hex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong passwords from one address before it must wait.
pub const MAX_FAILURES: u32 = 5;
/// How long failures count against an address.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);

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
