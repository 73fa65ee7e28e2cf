//! Server availability: what the router believes about each mailbox server, from
//! periodic probes and from delivery outcomes.
//!
//! - A failed probe (no connection, timeout, no 220 banner) marks a server **down**
//!   at once; so does a connection failure or a 421 while delivering.
//! - A 4xx banner, or a 220 slower than `busy_threshold`, marks it **busy** (the
//!   analogue of Domino's server availability threshold).
//! - Coming back needs `rise` good probes in a row, so a flapping server is not
//!   trusted at once.
//!
//! [`Tracker`] is the pure state machine; `probe` talks to servers.

pub mod monitor;
pub mod probe;

use crate::route::Availability;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The server greeted with this code after `rtt`.
    Banner { code: u16, rtt: Duration },
    /// No connection, a timeout, or no SMTP greeting.
    Failed(String),
}

/// The router's view of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub availability: Availability,
    /// Good probes in a row since the server was last not up.
    pub good_streak: u32,
    pub last_probe: Option<SystemTime>,
    pub last_rtt: Option<Duration>,
    /// Why the server was last marked down or busy.
    pub last_problem: Option<String>,
}

impl Default for Health {
    fn default() -> Self {
        // Until the first probe says otherwise a server is presumed up: the first
        // delivery failure marks it down at once anyway.
        Health {
            availability: Availability::Up,
            good_streak: 0,
            last_probe: None,
            last_rtt: None,
            last_problem: None,
        }
    }
}

/// Availability of every server, by lower-cased name.
#[derive(Debug, Clone)]
pub struct Tracker {
    servers: HashMap<String, Health>,
    /// Good probes needed to come back up.
    pub rise: u32,
    /// A 220 slower than this means busy.
    pub busy_threshold: Duration,
}

impl Tracker {
    pub fn new(rise: u32, busy_threshold: Duration) -> Tracker {
        Tracker {
            servers: HashMap::new(),
            rise: rise.max(1),
            busy_threshold,
        }
    }

    pub fn availability(&self, server: &str) -> Availability {
        self.servers
            .get(&server.to_lowercase())
            .map_or(Availability::Up, |h| h.availability)
    }

    pub fn health(&self, server: &str) -> Health {
        self.servers
            .get(&server.to_lowercase())
            .cloned()
            .unwrap_or_default()
    }

    fn entry(&mut self, server: &str) -> &mut Health {
        self.servers.entry(server.to_lowercase()).or_default()
    }

    /// Records a probe; returns the availability before and after.
    pub fn probed(
        &mut self,
        server: &str,
        probe: Probe,
        at: SystemTime,
    ) -> (Availability, Availability) {
        let rise = self.rise;
        let threshold = self.busy_threshold;
        let h = self.entry(server);
        let before = h.availability;
        h.last_probe = Some(at);
        match probe {
            Probe::Failed(why) => {
                h.availability = Availability::Down;
                h.good_streak = 0;
                h.last_rtt = None;
                h.last_problem = Some(why);
            }
            Probe::Banner { code, rtt } => {
                h.last_rtt = Some(rtt);
                let problem = match code {
                    220 if rtt <= threshold => None,
                    220 => Some((
                        Availability::Busy,
                        format!(
                            "greeted after {} ms (busy threshold {} ms)",
                            rtt.as_millis(),
                            threshold.as_millis()
                        ),
                    )),
                    400..=499 => Some((Availability::Busy, format!("greeted with {code}"))),
                    _ => Some((Availability::Down, format!("greeted with {code}"))),
                };
                match problem {
                    Some((availability, why)) => {
                        h.availability = availability;
                        h.good_streak = 0;
                        h.last_problem = Some(why);
                    }
                    None => {
                        h.good_streak = h.good_streak.saturating_add(1);
                        if h.availability != Availability::Up && h.good_streak >= rise {
                            h.availability = Availability::Up;
                            h.last_problem = None;
                        }
                    }
                }
            }
        }
        (before, h.availability)
    }

    /// A delivery could not connect, or the server answered 421: down at once,
    /// without waiting for the next probe.
    pub fn delivery_failed(&mut self, server: &str, why: &str) -> (Availability, Availability) {
        let h = self.entry(server);
        let before = h.availability;
        h.availability = Availability::Down;
        h.good_streak = 0;
        h.last_problem = Some(why.to_string());
        (before, h.availability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Availability::{Busy, Down, Up};

    fn ok(ms: u64) -> Probe {
        Probe::Banner {
            code: 220,
            rtt: Duration::from_millis(ms),
        }
    }

    #[test]
    fn down_at_once_up_after_rise_good_probes() {
        let mut t = Tracker::new(2, Duration::from_millis(500));
        let now = SystemTime::now();
        assert_eq!(t.availability("M1"), Up, "presumed up");
        assert_eq!(
            t.probed("m1", Probe::Failed("refused".into()), now),
            (Up, Down)
        );
        assert_eq!(
            t.probed("M1", ok(5), now),
            (Down, Down),
            "one good probe is not enough"
        );
        assert_eq!(
            t.probed("m1", Probe::Failed("refused".into()), now),
            (Down, Down),
            "flapping"
        );
        assert_eq!(t.probed("m1", ok(5), now).1, Down);
        assert_eq!(t.probed("m1", ok(5), now), (Down, Up), "rise = 2");
        assert_eq!(t.health("m1").last_problem, None);
    }

    #[test]
    fn busy_from_4xx_or_slow_banner() {
        let mut t = Tracker::new(2, Duration::from_millis(500));
        let now = SystemTime::now();
        assert_eq!(
            t.probed(
                "m",
                Probe::Banner {
                    code: 421,
                    rtt: Duration::from_millis(3)
                },
                now
            )
            .1,
            Busy
        );
        assert_eq!(t.probed("m", ok(5), now).1, Busy);
        assert_eq!(t.probed("m", ok(5), now).1, Up);
        assert_eq!(
            t.probed("m", ok(900), now).1,
            Busy,
            "slower than the threshold"
        );
        assert!(t.health("m").last_problem.unwrap().contains("900 ms"));
        assert_eq!(
            t.probed(
                "m",
                Probe::Banner {
                    code: 554,
                    rtt: Duration::from_millis(1)
                },
                now
            )
            .1,
            Down
        );
    }

    #[test]
    fn delivery_failures_mark_down_at_once() {
        let mut t = Tracker::new(3, Duration::from_secs(1));
        let now = SystemTime::now();
        t.probed("m", ok(1), now);
        assert_eq!(t.delivery_failed("m", "421 shutting down"), (Up, Down));
        for _ in 0..2 {
            assert_eq!(t.probed("m", ok(1), now).1, Down);
        }
        assert_eq!(t.probed("m", ok(1), now).1, Up);
    }
}
