//! The routing decision, as a pure function of the recipient's catalog entry, the
//! servers' availability and the routing policy: deliver **home**, fail over to a
//! **replica**, or **hold** and retry the home server only.
//!
//! Domino's rule, which this follows: mail goes to the home server when it is
//! available; when it is not, to an available cluster server holding a replica;
//! with no replica, or none available, the message is kept and delivery is retried
//! later to the home server *without failover*.
//!
//! Every decision carries a [`Route::why`]: the home's state and each replica
//! considered, with the reason it was or was not taken, so that it can be shown
//! (`route explain`, `queue show`).

use crate::catalog::{AdminState, Lookup, Server};
use std::fmt;
use std::sync::Arc;

/// What the health monitor knows of a server (admin states come from the catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Availability {
    Up,
    /// Answering, but slowly or with 4xx: avoided as a failover target.
    Busy,
    Down,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Availability::Up => "up",
            Availability::Busy => "busy",
            Availability::Down => "down",
        })
    }
}

/// The settings that shape a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Fail over to replicas at all (config `failover`).
    pub failover: bool,
    /// A held message's retries may fail over too (beyond Domino's behaviour).
    pub retry_failover: bool,
    /// The cluster this router serves; mail homed in another cluster goes to that
    /// cluster's routers when the catalog names some. None: every cluster is local.
    pub local_cluster: Option<String>,
    /// The catalog server this router runs beside: its replica is preferred.
    pub local_server: Option<String>,
    /// Failover also between next-hop routers of a foreign cluster (`all-hops`);
    /// otherwise only the first router named is used.
    pub all_hops: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            failover: true,
            retry_failover: false,
            local_cluster: None,
            local_server: None,
            all_hops: false,
        }
    }
}

/// Where one delivery attempt goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Home(String),
    Replica(String),
    /// Transfer to a router of the home's cluster (`host:port`), which routes again.
    NextHop(String),
    /// Keep the message; retry the home server later.
    Hold,
}

/// One server as the decision saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Considered {
    pub server: String,
    pub admin: AdminState,
    pub availability: Availability,
    /// Why it was taken or passed over.
    pub verdict: &'static str,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub decision: Decision,
    pub home: Considered,
    pub replicas: Vec<Considered>,
    /// A summary sentence.
    pub reason: String,
}

impl Route {
    /// The decision and each server considered, one per line.
    pub fn why(&self) -> String {
        let mut s = format!("{}\n", self.reason);
        for (role, c) in std::iter::once(("home", &self.home))
            .chain(self.replicas.iter().map(|c| ("replica", c)))
        {
            s.push_str(&format!(
                "  {role:7} {:20} {:14} {:5} {}\n",
                c.server,
                c.admin.as_str(),
                c.availability.to_string(),
                c.verdict
            ));
        }
        s
    }
}

/// Whether this attempt is the first routing of the recipient or a retry of a held one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    First,
    /// A retry of a held recipient: home only, unless `retry_failover`.
    Retry,
}

/// Decides where a recipient's next delivery attempt goes.
///
/// `availability(server)` is the health monitor's view; `skip` names servers (or
/// next-hop router addresses) that already failed this attempt (a 4xx or network
/// error from a replica moves on to the next one without waiting for the monitor).
/// `routers` are the next-hop routers the catalog names for the home's cluster.
pub fn decide(
    entry: &Lookup,
    availability: &dyn Fn(&Server) -> Availability,
    policy: &Policy,
    attempt: Attempt,
    skip: &[String],
    routers: &[String],
) -> Route {
    let skipped = |s: &Server| skip.iter().any(|k| k.eq_ignore_ascii_case(&s.name));
    // 4. Another cluster's mailbox: transfer to that cluster's router, which routes again.
    let foreign = policy
        .local_cluster
        .as_deref()
        .is_some_and(|local| !local.eq_ignore_ascii_case(&entry.home.cluster));
    if foreign && !routers.is_empty() {
        let home = Considered {
            server: entry.home.name.clone(),
            admin: entry.home.state,
            availability: availability(&entry.home),
            verdict: "not tried: in another cluster",
        };
        // Without all-hops failover only the first router is used (and retried later).
        let candidates = if policy.all_hops {
            routers
        } else {
            &routers[..1]
        };
        let next = candidates.iter().find(|r| !skip.iter().any(|k| k == *r));
        return match next {
            Some(r) => Route {
                decision: Decision::NextHop(r.clone()),
                reason: format!(
                    "transfer to {r}, a router of cluster {} (next hop)",
                    entry.home.cluster
                ),
                home,
                replicas: considered_unused(entry, availability, skipped),
            },
            None => Route {
                decision: Decision::Hold,
                reason: format!(
                    "hold and retry later: no router of cluster {} answered",
                    entry.home.cluster
                ),
                home,
                replicas: considered_unused(entry, availability, skipped),
            },
        };
    }
    let home_avail = if skipped(&entry.home) {
        Availability::Down
    } else {
        availability(&entry.home)
    };
    // A held recipient's scheduled retry *is* an attempt on the home server: it is
    // made whatever the monitor last saw (a server coming back may not have passed
    // `rise` probes yet), unless the home is out of service or already failed now.
    let retry_home = attempt == Attempt::Retry
        && !policy.retry_failover
        && !skipped(&entry.home)
        && entry.home.state != AdminState::OutOfService;
    let home_usable = retry_home
        || (home_avail == Availability::Up && entry.home.state != AdminState::OutOfService);
    let mut home = Considered {
        server: entry.home.name.clone(),
        admin: entry.home.state,
        availability: home_avail,
        verdict: "",
    };
    if home_usable {
        home.verdict = if home_avail == Availability::Up {
            "taken: the home server is available"
        } else {
            "taken: a held message retries its home server"
        };
        return Route {
            decision: Decision::Home(entry.home.name.clone()),
            reason: if retry_home && home_avail != Availability::Up {
                format!(
                    "retry home {} (held mail, without failover)",
                    entry.home.name
                )
            } else {
                format!("deliver home to {}", entry.home.name)
            },
            home,
            replicas: considered_unused(entry, availability, skipped),
        };
    }
    home.verdict = match (entry.home.state, home_avail) {
        (AdminState::OutOfService, _) => "passed over: out of service",
        (_, Availability::Busy) => "passed over: busy",
        _ => "passed over: down",
    };
    let failover = entry.mailbox.failover.unwrap_or(policy.failover);
    let may_fail_over = failover && (attempt == Attempt::First || policy.retry_failover);
    // Replicas in the order they are tried: this router's own mailbox server first
    // (Domino: a local replica), then the mailbox's preference order.
    let mut order: Vec<(usize, &Arc<Server>, Availability)> = entry
        .replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                i,
                r,
                if skipped(r) {
                    Availability::Down
                } else {
                    availability(r)
                },
            )
        })
        .collect();
    if let Some(local) = &policy.local_server {
        order.sort_by_key(|(i, r, _)| (!r.name.eq_ignore_ascii_case(local), *i));
    }
    let target = |r: &Server, avail: Availability| {
        may_fail_over
            && r.state == AdminState::InService
            && !skipped(r)
            && avail != Availability::Down
    };
    // An up replica if there is one; else a busy server still takes the mail when it
    // is the only one reachable: the home first, then a busy replica.
    let up_replica = order
        .iter()
        .find(|(_, r, a)| target(r, *a) && *a == Availability::Up)
        .map(|(i, _, _)| *i);
    let busy_home = up_replica.is_none()
        && home_avail == Availability::Busy
        && entry.home.state != AdminState::OutOfService
        && !skipped(&entry.home);
    let busy_replica = if up_replica.is_none() && !busy_home {
        order
            .iter()
            .find(|(_, r, a)| target(r, *a) && *a == Availability::Busy)
            .map(|(i, _, _)| *i)
    } else {
        None
    };
    let chosen = up_replica.or(busy_replica);
    let local = |r: &Server| {
        policy
            .local_server
            .as_deref()
            .is_some_and(|l| l.eq_ignore_ascii_case(&r.name))
    };
    // Replicas tried after the chosen one were not needed; those before were passed over.
    let chosen_at = chosen.and_then(|c| order.iter().position(|(i, _, _)| *i == c));
    let mut replicas: Vec<Considered> = order
        .iter()
        .enumerate()
        .map(|(at, (i, r, avail))| {
            let verdict = if Some(*i) == chosen {
                if *avail == Availability::Busy {
                    "taken: busy, but the only server reachable"
                } else if local(r) {
                    "taken: the replica on this router's own server comes first"
                } else {
                    "taken: first available replica in preference order"
                }
            } else if chosen_at.is_some_and(|c| at > c) {
                "not needed"
            } else if !may_fail_over {
                if failover {
                    "not tried: a held message retries the home server only"
                } else {
                    "not tried: failover is off"
                }
            } else if r.state == AdminState::OutOfService {
                "passed over: out of service"
            } else if r.state == AdminState::Restricted {
                "passed over: restricted (never a failover target)"
            } else if skipped(r) {
                "passed over: failed this attempt"
            } else if *avail == Availability::Busy {
                "passed over: busy"
            } else {
                "passed over: down"
            };
            Considered {
                server: r.name.clone(),
                admin: r.state,
                availability: *avail,
                verdict,
            }
        })
        .collect();
    // Shown in preference order, whatever the order tried.
    replicas.sort_by_key(|c| entry.replicas.iter().position(|r| r.name == c.server));
    if busy_home {
        home.verdict = "taken: busy, but no replica is available";
        return Route {
            decision: Decision::Home(entry.home.name.clone()),
            reason: format!(
                "deliver home to {}: busy, but no replica is available",
                entry.home.name
            ),
            home,
            replicas,
        };
    }
    match chosen.map(|i| entry.replicas[i].name.clone()) {
        Some(name) => Route {
            reason: format!(
                "fail over to replica {name}: home {} is {}",
                entry.home.name,
                short(&home)
            ),
            decision: Decision::Replica(name),
            home,
            replicas,
        },
        None => {
            let why = if entry.replicas.is_empty() {
                "no replica".to_string()
            } else if !may_fail_over {
                "no failover for this attempt".to_string()
            } else {
                "no replica available".to_string()
            };
            Route {
                reason: format!(
                    "hold and retry home {} without failover: home is {}, {why}",
                    entry.home.name,
                    short(&home)
                ),
                decision: Decision::Hold,
                home,
                replicas,
            }
        }
    }
}

fn short(c: &Considered) -> String {
    if c.admin == AdminState::OutOfService {
        "out of service".into()
    } else {
        c.availability.to_string()
    }
}

fn considered_unused(
    entry: &Lookup,
    availability: &dyn Fn(&Server) -> Availability,
    skipped: impl Fn(&Server) -> bool,
) -> Vec<Considered> {
    entry
        .replicas
        .iter()
        .map(|r| Considered {
            server: r.name.clone(),
            admin: r.state,
            availability: if skipped(r) {
                Availability::Down
            } else {
                availability(r)
            },
            verdict: "not needed",
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Mailbox;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn server(name: &str, state: AdminState) -> Arc<Server> {
        Arc::new(Server {
            name: name.into(),
            cluster: "c".into(),
            address: "127.0.0.1:25".into(),
            state,
            availability_threshold: None,
            tls: Default::default(),
            tls_name: None,
        })
    }

    fn entry(home: AdminState, replicas: &[(&str, AdminState)]) -> Lookup {
        Lookup {
            mailbox: Mailbox {
                address: "u@d.test".into(),
                home: "h".into(),
                replicas: replicas.iter().map(|(n, _)| n.to_string()).collect(),
                aliases: vec![],
                failover: None,
            },
            home: server("h", home),
            replicas: replicas.iter().map(|(n, s)| server(n, *s)).collect(),
        }
    }

    use AdminState::{InService as In, OutOfService as Oos, Restricted as Res};
    use Availability::{Busy, Down, Up};

    /// (home admin, home avail, replicas (name, admin, avail), policy, attempt, skip) → decision
    #[test]
    fn decision_table() {
        let on = Policy::default();
        let local_r2 = Policy {
            local_server: Some("R2".into()),
            ..Policy::default()
        };
        let off = Policy {
            failover: false,
            ..Policy::default()
        };
        let retry_fo = Policy {
            retry_failover: true,
            ..Policy::default()
        };
        type Row<'a> = (
            AdminState,
            Availability,
            &'a [(&'a str, AdminState, Availability)],
            &'a Policy,
            Attempt,
            &'a [&'a str],
            Decision,
        );
        let home = || Decision::Home("h".into());
        let rep = |n: &str| Decision::Replica(n.into());
        let table: Vec<Row> = vec![
            // 1. home up and in service: home, whatever the replicas.
            (In, Up, &[("r1", In, Up)], &on, Attempt::First, &[], home()),
            (In, Up, &[], &on, Attempt::First, &[], home()),
            (Res, Up, &[("r1", In, Up)], &on, Attempt::First, &[], home()),
            (In, Up, &[("r1", In, Up)], &on, Attempt::Retry, &[], home()),
            // 2. home not usable: first available in-service replica, in order.
            (
                In,
                Down,
                &[("r1", In, Up), ("r2", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r1"),
            ),
            (
                In,
                Down,
                &[("r1", In, Down), ("r2", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r2"),
            ),
            (
                In,
                Busy,
                &[("r1", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r1"),
            ),
            (
                Oos,
                Up,
                &[("r1", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r1"),
            ),
            (
                In,
                Down,
                &[("r1", Res, Up), ("r2", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r2"),
            ),
            (
                In,
                Down,
                &[("r1", In, Busy), ("r2", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r2"),
            ),
            (
                In,
                Down,
                &[("r1", Oos, Up), ("r2", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r2"),
            ),
            // a replica that just failed this attempt is skipped; so is a failed home.
            (
                In,
                Down,
                &[("r1", In, Up), ("r2", In, Up)],
                &on,
                Attempt::First,
                &["r1"],
                rep("r2"),
            ),
            (
                In,
                Up,
                &[("r1", In, Up)],
                &on,
                Attempt::First,
                &["h"],
                rep("r1"),
            ),
            // 3. no replica, none available, or failover off: hold.
            (In, Down, &[], &on, Attempt::First, &[], Decision::Hold),
            (
                In,
                Down,
                &[("r1", In, Down), ("r2", Res, Up)],
                &on,
                Attempt::First,
                &[],
                Decision::Hold,
            ),
            // a busy replica still takes the mail when it is the only one reachable...
            (
                In,
                Down,
                &[("r1", In, Busy)],
                &on,
                Attempt::First,
                &[],
                rep("r1"),
            ),
            // ...and a busy home with no replica available gets it too (not held)...
            (In, Busy, &[], &on, Attempt::First, &[], home()),
            (
                In,
                Busy,
                &[("r1", In, Down)],
                &on,
                Attempt::First,
                &[],
                home(),
            ),
            (
                In,
                Busy,
                &[("r1", In, Busy)],
                &on,
                Attempt::First,
                &[],
                home(),
            ),
            (
                In,
                Busy,
                &[("r1", In, Up)],
                &off,
                Attempt::First,
                &[],
                home(),
            ),
            // ...but an up replica is preferred to a busy home.
            (
                In,
                Busy,
                &[("r1", In, Busy), ("r2", In, Up)],
                &on,
                Attempt::First,
                &[],
                rep("r2"),
            ),
            // Only down, out-of-service and (as targets) restricted make a server unusable.
            (
                In,
                Down,
                &[("r1", Res, Busy)],
                &on,
                Attempt::First,
                &[],
                Decision::Hold,
            ),
            // The replica on this router's own server comes first.
            (
                In,
                Down,
                &[("r1", In, Up), ("r2", In, Up)],
                &local_r2,
                Attempt::First,
                &[],
                rep("r2"),
            ),
            (
                In,
                Down,
                &[("r1", In, Up), ("r2", In, Down)],
                &local_r2,
                Attempt::First,
                &[],
                rep("r1"),
            ),
            (
                In,
                Down,
                &[("r1", In, Up), ("r2", Res, Up)],
                &local_r2,
                Attempt::First,
                &[],
                rep("r1"),
            ),
            (
                In,
                Down,
                &[("r1", In, Up)],
                &off,
                Attempt::First,
                &[],
                Decision::Hold,
            ),
            (
                In,
                Down,
                &[("r1", In, Up)],
                &on,
                Attempt::First,
                &["r1"],
                Decision::Hold,
            ),
            // a held message retries the home only: the retry is an attempt on the home,
            // whatever the monitor last saw, and a replica coming back does not take it...
            (
                In,
                Down,
                &[("r1", In, Up)],
                &on,
                Attempt::Retry,
                &[],
                home(),
            ),
            (
                In,
                Busy,
                &[("r1", In, Up)],
                &on,
                Attempt::Retry,
                &[],
                home(),
            ),
            // ...when that attempt fails, or the home is out of service, it stays held...
            (
                In,
                Down,
                &[("r1", In, Up)],
                &on,
                Attempt::Retry,
                &["h"],
                Decision::Hold,
            ),
            (
                Oos,
                Up,
                &[("r1", In, Up)],
                &on,
                Attempt::Retry,
                &[],
                Decision::Hold,
            ),
            // ...unless retry_failover says so.
            (
                In,
                Down,
                &[("r1", In, Up)],
                &retry_fo,
                Attempt::Retry,
                &[],
                rep("r1"),
            ),
        ];
        for (i, (home_admin, home_avail, reps, policy, attempt, skip, want)) in
            table.into_iter().enumerate()
        {
            let e = entry(
                home_admin,
                &reps.iter().map(|(n, s, _)| (*n, *s)).collect::<Vec<_>>(),
            );
            let mut avail: HashMap<&str, Availability> =
                reps.iter().map(|(n, _, a)| (*n, *a)).collect();
            avail.insert("h", home_avail);
            let skip: Vec<String> = skip.iter().map(|s| s.to_string()).collect();
            let route = decide(&e, &|s| avail[s.name.as_str()], policy, attempt, &skip, &[]);
            assert_eq!(route.decision, want, "row {i}: {}", route.why());
            assert_eq!(
                route.replicas.len(),
                reps.len(),
                "row {i}: every replica is accounted for"
            );
        }
    }

    #[test]
    fn the_reason_names_every_server_and_its_verdict() {
        let e = entry(In, &[("r1", Res), ("r2", In), ("r3", In)]);
        let avail = |s: &Server| if s.name == "r2" { Up } else { Down };
        let route = decide(&e, &avail, &Policy::default(), Attempt::First, &[], &[]);
        assert_eq!(route.decision, Decision::Replica("r2".into()));
        let why = route.why();
        assert!(
            why.starts_with("fail over to replica r2: home h is down\n"),
            "{why}"
        );
        assert!(
            why.contains("restricted (never a failover target)"),
            "{why}"
        );
        assert!(why.contains("taken: first available replica"), "{why}");
        assert!(why.contains("r3") && why.contains("not needed"), "{why}");
        let retry = decide(&e, &avail, &Policy::default(), Attempt::Retry, &[], &[]);
        assert_eq!(retry.decision, Decision::Home("h".into()));
        assert!(
            retry
                .reason
                .starts_with("retry home h (held mail, without failover)"),
            "{}",
            retry.reason
        );
        let held = decide(
            &e,
            &avail,
            &Policy::default(),
            Attempt::Retry,
            &["h".to_string()],
            &[],
        );
        assert!(
            held.why()
                .contains("a held message retries the home server only"),
            "{}",
            held.why()
        );
        assert!(
            held.reason
                .starts_with("hold and retry home h without failover"),
            "{}",
            held.reason
        );
    }
}

#[cfg(test)]
mod next_hop_tests {
    use super::*;
    use crate::catalog::Mailbox;
    use std::sync::Arc;

    #[test]
    fn mail_for_another_cluster_goes_to_its_router() {
        let home = Arc::new(Server {
            name: "w1".into(),
            cluster: "west".into(),
            address: "127.0.0.1:25".into(),
            state: AdminState::InService,
            availability_threshold: None,
            tls: Default::default(),
            tls_name: None,
        });
        let e = Lookup {
            mailbox: Mailbox {
                address: "u@w.test".into(),
                home: "w1".into(),
                replicas: vec![],
                aliases: vec![],
                failover: None,
            },
            home,
            replicas: vec![],
        };
        let up = |_: &Server| Availability::Up;
        let routers = ["10.0.0.1:25".to_string(), "10.0.0.2:25".to_string()];
        let east = Policy {
            local_cluster: Some("east".into()),
            all_hops: true,
            ..Policy::default()
        };
        let r = decide(&e, &up, &east, Attempt::First, &[], &routers);
        assert_eq!(r.decision, Decision::NextHop("10.0.0.1:25".into()));
        let r = decide(
            &e,
            &up,
            &east,
            Attempt::First,
            &["10.0.0.1:25".into()],
            &routers,
        );
        assert_eq!(r.decision, Decision::NextHop("10.0.0.2:25".into()));
        let r = decide(&e, &up, &east, Attempt::First, &routers, &routers);
        assert_eq!(r.decision, Decision::Hold);
        // last-hop: a failed next-hop router is not replaced by another one.
        let last_hop = Policy {
            all_hops: false,
            ..east.clone()
        };
        let first_failed = ["10.0.0.1:25".to_string()];
        let r = decide(&e, &up, &last_hop, Attempt::First, &first_failed, &routers);
        assert_eq!(r.decision, Decision::Hold);
        // Local cluster, no local_cluster set, or no routers named: the normal rules.
        let west = Policy {
            local_cluster: Some("WEST".into()),
            ..Policy::default()
        };
        assert_eq!(
            decide(&e, &up, &west, Attempt::First, &[], &routers).decision,
            Decision::Home("w1".into())
        );
        assert_eq!(
            decide(&e, &up, &Policy::default(), Attempt::First, &[], &routers).decision,
            Decision::Home("w1".into())
        );
        assert_eq!(
            decide(&e, &up, &east, Attempt::First, &[], &[]).decision,
            Decision::Home("w1".into())
        );
    }
}

#[cfg(test)]
mod override_tests {
    use super::*;
    use crate::catalog::Mailbox;
    use std::sync::Arc;

    #[test]
    fn a_mailbox_may_override_the_failover_setting() {
        let server = |name: &str| {
            Arc::new(Server {
                name: name.into(),
                cluster: "c".into(),
                address: "127.0.0.1:25".into(),
                state: AdminState::InService,
                availability_threshold: None,
                tls: Default::default(),
                tls_name: None,
            })
        };
        let entry = |failover| Lookup {
            mailbox: Mailbox {
                address: "u@d.test".into(),
                home: "h".into(),
                replicas: vec!["r".into()],
                aliases: vec![],
                failover,
            },
            home: server("h"),
            replicas: vec![server("r")],
        };
        let avail = |s: &Server| {
            if s.name == "h" {
                Availability::Down
            } else {
                Availability::Up
            }
        };
        let on = Policy::default();
        let off = Policy {
            failover: false,
            ..Policy::default()
        };
        let d = |f, p: &Policy| decide(&entry(f), &avail, p, Attempt::First, &[], &[]).decision;
        assert_eq!(d(None, &on), Decision::Replica("r".into()));
        assert_eq!(
            d(Some(false), &on),
            Decision::Hold,
            "this mailbox never fails over"
        );
        assert_eq!(d(None, &off), Decision::Hold);
        assert_eq!(
            d(Some(true), &off),
            Decision::Replica("r".into()),
            "this one does"
        );
        let why = decide(&entry(Some(false)), &avail, &on, Attempt::First, &[], &[]).why();
        assert!(why.contains("not tried: failover is off"), "{why}");
    }
}
