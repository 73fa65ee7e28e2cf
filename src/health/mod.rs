//! Server availability: what the router believes about each mailbox server, from
//! periodic probes and from delivery outcomes.
//!
//! - A failed probe (no connection, timeout, no 220 banner) marks a server **down**
//!   at once; so does a connection failure or a 421 while delivering.
//! - A 4xx banner, or a 220 slower than `busy_threshold`, marks it **busy**.
//! - Coming back needs `rise` good probes in a row, so a flapping server is not
//!   trusted at once.
//! - Every server also has an **availability index** 0–100 (Domino's server
//!   availability index): 100 when it answers as fast as it usually does, lower as
//!   its recent response times (probe greetings and delivery MAIL replies) grow
//!   against its own baseline, lower still after 4xx answers. An up server whose
//!   index is below its availability threshold (`routing.availability_threshold`, or
//!   the server's own in the catalog; 0 = never) counts as busy.
//!
//! [`Tracker`] is the pure state machine; `probe` talks to servers.

pub mod monitor;
pub mod probe;

use crate::route::Availability;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

/// Response times averaged for the index.
const WINDOW: usize = 8;
/// Response times below this count as this: loopback jitter is not load.
const FLOOR: Duration = Duration::from_millis(5);
/// Index points taken by each 4xx answer; given back 5 per good answer.
const PENALTY_4XX: u8 = 25;
const PENALTY_RECOVERY: u8 = 5;
/// How far the baseline follows a slower sample (1/N of the gap), so that a lasting
/// change of a server's normal speed is learnt within a few hundred samples.
const BASELINE_DRIFT: u32 = 128;

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
    /// From probe and delivery events; [`Tracker::availability`] adds the index.
    pub availability: Availability,
    /// Good probes in a row since the server was last not up.
    pub good_streak: u32,
    pub last_probe: Option<SystemTime>,
    pub last_rtt: Option<Duration>,
    /// Why the server was last marked down or busy.
    pub last_problem: Option<String>,
    /// Availability index, 0 (down or swamped) to 100 (as fast as ever).
    pub index: u8,
    /// The server's usual response time: the fastest seen, drifting slowly upwards.
    pub baseline: Option<Duration>,
    recent: VecDeque<Duration>,
    penalty: u8,
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
            index: 100,
            baseline: None,
            recent: VecDeque::with_capacity(WINDOW),
            penalty: 0,
        }
    }
}

/// The availability index from a baseline and recent response times (both floored
/// at [`FLOOR`]) less a penalty: `100 × baseline / mean(recent) − penalty`.
pub fn availability_index(baseline: Duration, recent: &[Duration], penalty: u8) -> u8 {
    if recent.is_empty() {
        return 100u8.saturating_sub(penalty);
    }
    let mean = recent.iter().sum::<Duration>() / recent.len() as u32;
    let ratio = baseline.max(FLOOR).as_secs_f64() / mean.max(FLOOR).as_secs_f64();
    let index = (100.0 * ratio).round().clamp(0.0, 100.0) as u8;
    index.saturating_sub(penalty)
}

impl Health {
    /// A response time (probe greeting or delivery reply), and whether the answer
    /// was a 4xx.
    fn sample(&mut self, rtt: Duration, temporary_failure: bool) {
        self.baseline = Some(match self.baseline {
            None => rtt,
            Some(b) if rtt <= b => rtt,
            Some(b) => b + (rtt - b) / BASELINE_DRIFT,
        });
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(rtt);
        self.penalty = if temporary_failure {
            self.penalty.saturating_add(PENALTY_4XX).min(100)
        } else {
            self.penalty.saturating_sub(PENALTY_RECOVERY)
        };
        self.reindex();
    }

    fn reindex(&mut self) {
        // No baseline means no sample yet: the index is 100 less any penalty.
        let baseline = self.baseline.unwrap_or(FLOOR);
        self.index = match self.availability {
            Availability::Down => 0,
            _ => availability_index(baseline, self.recent.make_contiguous(), self.penalty),
        };
    }

    fn down(&mut self, why: String) {
        self.availability = Availability::Down;
        self.good_streak = 0;
        self.last_problem = Some(why);
        self.recent.clear();
        self.index = 0;
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
    /// An up server whose index is below this is busy (0: never), unless the
    /// server has its own threshold in the catalog.
    pub availability_threshold: u8,
}

impl Tracker {
    pub fn new(rise: u32, busy_threshold: Duration) -> Tracker {
        Tracker {
            servers: HashMap::new(),
            rise: rise.max(1),
            busy_threshold,
            availability_threshold: 0,
        }
    }

    pub fn with_availability_threshold(mut self, threshold: u8) -> Tracker {
        self.availability_threshold = threshold.min(100);
        self
    }

    /// The threshold that applies to a server: its own, else the default.
    pub fn threshold(&self, own: Option<u8>) -> u8 {
        own.unwrap_or(self.availability_threshold)
    }

    /// What routing should assume of `server`: down and busy as probes and
    /// deliveries left them, and busy too when its index is below `threshold`
    /// (the server's own from the catalog, else the default).
    pub fn availability(&self, server: &str, threshold: Option<u8>) -> Availability {
        let Some(h) = self.servers.get(&server.to_lowercase()) else {
            return Availability::Up;
        };
        match h.availability {
            Availability::Up if h.index < self.threshold(threshold) => Availability::Busy,
            a => a,
        }
    }

    /// [`Tracker::availability`] of a catalog server, with its own threshold.
    pub fn of(&self, server: &crate::catalog::Server) -> Availability {
        self.availability(&server.name, server.availability_threshold)
    }

    /// Why `server` counts as not up, if it does not.
    pub fn problem(&self, server: &crate::catalog::Server) -> Option<String> {
        let h = self.health(&server.name);
        let threshold = self.threshold(server.availability_threshold);
        match h.availability {
            Availability::Up if h.index < threshold => Some(format!(
                "availability index {} below threshold {threshold}",
                h.index
            )),
            Availability::Up => None,
            _ => h.last_problem,
        }
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

    /// Records a probe; returns the event-driven availability before and after
    /// (without the index: see [`Tracker::availability`]).
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
                h.last_rtt = None;
                h.down(why);
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
                    Some((Availability::Down, why)) => h.down(why),
                    Some((availability, why)) => {
                        h.availability = availability;
                        h.good_streak = 0;
                        h.last_problem = Some(why);
                        h.sample(rtt, (400..500).contains(&code));
                    }
                    None => {
                        h.good_streak = h.good_streak.saturating_add(1);
                        if h.availability != Availability::Up && h.good_streak >= rise {
                            h.availability = Availability::Up;
                            h.last_problem = None;
                        }
                        h.sample(rtt, false);
                    }
                }
            }
        }
        (before, h.availability)
    }

    /// A delivery got its MAIL reply after `rtt`. Feeds the index's response
    /// times only: a 4xx inside a transaction (to MAIL, an RCPT or the data) may
    /// be the sender's or the recipient's doing, so it never costs the server
    /// points; only session-level trouble does (a 4xx greeting, 421, no answer).
    pub fn responded(&mut self, server: &str, rtt: Duration) {
        let h = self.entry(server);
        if h.availability != Availability::Down {
            h.sample(rtt, false);
        }
    }

    /// A delivery could not connect, or the server answered 421: down at once,
    /// without waiting for the next probe.
    pub fn delivery_failed(&mut self, server: &str, why: &str) -> (Availability, Availability) {
        let h = self.entry(server);
        let before = h.availability;
        h.down(why.to_string());
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
        assert_eq!(t.availability("M1", None), Up, "presumed up");
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

    #[test]
    fn index_is_the_baseline_over_recent_response_times() {
        let ms = Duration::from_millis;
        assert_eq!(availability_index(ms(20), &[ms(20); 4], 0), 100);
        assert_eq!(availability_index(ms(20), &[ms(40); 4], 0), 50);
        assert_eq!(availability_index(ms(20), &[ms(20), ms(60)], 0), 50);
        assert_eq!(availability_index(ms(20), &[ms(40)], 25), 25, "4xx penalty");
        assert_eq!(
            availability_index(ms(20), &[ms(40)], 90),
            0,
            "never below 0"
        );
        // Sub-floor jitter is not load: 1 ms against 4 ms is still 100.
        assert_eq!(availability_index(ms(1), &[ms(4)], 0), 100);
        assert_eq!(availability_index(ms(1), &[ms(10)], 0), 50);
        assert_eq!(availability_index(ms(20), &[], 10), 90);
    }

    #[test]
    fn slow_answers_make_a_server_busy_below_its_threshold() {
        let mut t = Tracker::new(1, Duration::from_secs(5)).with_availability_threshold(60);
        let now = SystemTime::now();
        for _ in 0..WINDOW {
            t.probed("m", ok(20), now);
        }
        assert_eq!(t.health("m").index, 100);
        assert_eq!(t.availability("m", None), Up);
        // The server slows to 4x its baseline: index about 25 (30: the baseline has
        // moved a little towards the slower answers), busy for threshold 60...
        for _ in 0..WINDOW {
            t.probed("m", ok(80), now);
        }
        let h = t.health("m");
        assert_eq!(h.availability, Up, "the events alone say up");
        assert!((25..=32).contains(&h.index), "index {}", h.index);
        assert_eq!(t.availability("m", None), Busy);
        // ...not for a server whose own threshold is lower, nor with the default 0.
        assert_eq!(t.availability("m", Some(20)), Up);
        assert_eq!(
            t.clone()
                .with_availability_threshold(0)
                .availability("m", None),
            Up
        );
        // Fast again: the index recovers as the window refills.
        for _ in 0..WINDOW {
            t.probed("m", ok(20), now);
        }
        assert!(t.health("m").index >= 95, "index {}", t.health("m").index);
        assert_eq!(t.availability("m", None), Up);
    }

    #[test]
    fn delivery_replies_feed_the_index_and_4xx_greetings_cost_points() {
        let mut t = Tracker::new(1, Duration::from_secs(5)).with_availability_threshold(50);
        let now = SystemTime::now();
        t.probed("m", ok(10), now);
        t.responded("m", Duration::from_millis(10));
        assert_eq!(t.health("m").index, 100);
        t.responded("m", Duration::from_millis(20));
        assert!(t.health("m").index < 100, "slower replies lower the index");
        let mut t = Tracker::new(1, Duration::from_secs(5)).with_availability_threshold(50);
        t.probed("m", ok(10), now);
        let busy = Probe::Banner {
            code: 421,
            rtt: Duration::from_millis(10),
        };
        t.probed("m", busy.clone(), now);
        t.probed("m", busy, now);
        assert_eq!(t.health("m").index, 50, "two 4xx greetings: 50 points");
        for _ in 0..5 {
            t.responded("m", Duration::from_millis(10));
        }
        assert_eq!(t.health("m").index, 75, "good answers give points back");
        // Down means index 0; deliveries to a down server do not revive it.
        t.delivery_failed("m", "refused");
        t.responded("m", Duration::from_millis(10));
        assert_eq!((t.health("m").index, t.availability("m", None)), (0, Down));
    }

    #[test]
    fn the_baseline_follows_a_lasting_change_slowly() {
        let mut t = Tracker::new(1, Duration::from_secs(5));
        let now = SystemTime::now();
        t.probed("m", ok(10), now);
        for _ in 0..50 {
            t.probed("m", ok(40), now);
        }
        let b = t.health("m").baseline.unwrap_or_default();
        assert!(
            b > Duration::from_millis(10) && b < Duration::from_millis(25),
            "{b:?}"
        );
        for _ in 0..1000 {
            t.probed("m", ok(40), now);
        }
        assert!(t.health("m").index >= 95, "learnt: {}", t.health("m").index);
    }
}
