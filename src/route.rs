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

use crate::catalog::{AdminState, Lookup, ReplicaState, Server};

mod copies;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

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
    /// The state of this mailbox's copy on the server.
    pub copy: ReplicaState,
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
///
/// A copy of the mailbox that is not in service (`copies`) counts as a server
/// out of service for this mailbox only.
pub fn decide(
    entry: &Lookup,
    availability: &dyn Fn(&Server) -> Availability,
    policy: &Policy,
    attempt: Attempt,
    skip: &[String],
    routers: &[String],
) -> Route {
    let effective = copies::effective(entry);
    let mut route = decide_servers(&effective, availability, policy, attempt, skip, routers);
    copies::explain(&mut route, entry);
    route
}

/// The servers a decision looks at, and how.
struct Ctx<'a> {
    entry: &'a Lookup,
    availability: &'a dyn Fn(&Server) -> Availability,
    policy: &'a Policy,
    attempt: Attempt,
    skip: &'a [String],
}

impl Ctx<'_> {
    fn skipped(&self, s: &Server) -> bool {
        self.skip.iter().any(|k| k.eq_ignore_ascii_case(&s.name))
    }

    /// The monitor's view, or down when the server failed this attempt.
    fn avail(&self, s: &Server) -> Availability {
        if self.skipped(s) {
            Availability::Down
        } else {
            (self.availability)(s)
        }
    }

    fn unused(&self) -> Vec<Considered> {
        considered_unused(self.entry, self.availability, |s| self.skipped(s))
    }
}

/// `decide` on the servers' admin states alone.
fn decide_servers(
    entry: &Lookup,
    availability: &dyn Fn(&Server) -> Availability,
    policy: &Policy,
    attempt: Attempt,
    skip: &[String],
    routers: &[String],
) -> Route {
    let cx = Ctx {
        entry,
        availability,
        policy,
        attempt,
        skip,
    };
    // 4. Another cluster's mailbox: transfer to that cluster's router, which routes again.
    if let Some(route) = next_hop(&cx, routers) {
        return route;
    }
    let home_avail = cx.avail(&entry.home);
    // A held recipient's scheduled retry *is* an attempt on the home server: it is
    // made whatever the monitor last saw (a server coming back may not have passed
    // `rise` probes yet), unless the home is out of service or already failed now.
    let retry_home = attempt == Attempt::Retry
        && !policy.retry_failover
        && !cx.skipped(&entry.home)
        && entry.home.state != AdminState::OutOfService;
    let home_usable = retry_home
        || (home_avail == Availability::Up && entry.home.state != AdminState::OutOfService);
    let mut home = Considered {
        server: entry.home.name.clone(),
        admin: entry.home.state,
        copy: ReplicaState::InService,
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
            replicas: cx.unused(),
        };
    }
    home.verdict = match (entry.home.state, home_avail) {
        (AdminState::OutOfService, _) => "passed over: out of service",
        (_, Availability::Busy) => "passed over: busy",
        _ => "passed over: down",
    };
    fail_over(&cx, home)
}

/// Mail for another cluster: to that cluster's router (the first one, or with
/// all-hops the first that has not failed); None for a local mailbox.
fn next_hop(cx: &Ctx, routers: &[String]) -> Option<Route> {
    let (entry, policy) = (cx.entry, cx.policy);
    let foreign = policy
        .local_cluster
        .as_deref()
        .is_some_and(|local| !local.eq_ignore_ascii_case(&entry.home.cluster));
    if !foreign || routers.is_empty() {
        return None;
    }
    let home = Considered {
        server: entry.home.name.clone(),
        admin: entry.home.state,
        copy: ReplicaState::InService,
        availability: (cx.availability)(&entry.home),
        verdict: "not tried: in another cluster",
    };
    // Without all-hops failover only the first router is used (and retried later).
    let candidates = if policy.all_hops {
        routers
    } else {
        &routers[..1]
    };
    let next = candidates.iter().find(|r| !cx.skip.iter().any(|k| k == *r));
    Some(match next {
        Some(r) => Route {
            decision: Decision::NextHop(r.clone()),
            reason: format!(
                "transfer to {r}, a router of cluster {} (next hop)",
                entry.home.cluster
            ),
            home,
            replicas: cx.unused(),
        },
        None => Route {
            decision: Decision::Hold,
            reason: format!(
                "hold and retry later: no router of cluster {} answered",
                entry.home.cluster
            ),
            home,
            replicas: cx.unused(),
        },
    })
}

/// Which replica (if any) takes the mail when the home is not usable.
struct Choice<'a> {
    /// The replicas in the order they are tried, with their index in the
    /// mailbox's preference order and their availability.
    order: Vec<(usize, &'a Arc<Server>, Availability)>,
    /// Whether this mailbox fails over at all, and on this attempt.
    failover: bool,
    may_fail_over: bool,
    /// No replica is up but the home is only busy: it still takes the mail.
    busy_home: bool,
    /// The chosen replica (index in preference order).
    chosen: Option<usize>,
}

/// An up replica if there is one; else a busy server still takes the mail when
/// it is the only one reachable: the home first, then a busy replica.
fn choose<'a>(cx: &Ctx<'a>, home_avail: Availability) -> Choice<'a> {
    let (entry, policy) = (cx.entry, cx.policy);
    let failover = entry.mailbox.failover.unwrap_or(policy.failover);
    let may_fail_over = failover && (cx.attempt == Attempt::First || policy.retry_failover);
    // Replicas in the order they are tried: this router's own mailbox server first
    // (Domino: a local replica), then the mailbox's preference order.
    let mut order: Vec<(usize, &Arc<Server>, Availability)> = entry
        .replicas
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r, cx.avail(r)))
        .collect();
    if let Some(local) = &policy.local_server {
        order.sort_by_key(|(i, r, _)| (!r.name.eq_ignore_ascii_case(local), *i));
    }
    let target = |r: &Server, avail: Availability| {
        may_fail_over
            && r.state == AdminState::InService
            && !cx.skipped(r)
            && avail != Availability::Down
    };
    let first = |want: Availability| {
        order
            .iter()
            .find(|(_, r, a)| target(r, *a) && *a == want)
            .map(|(i, _, _)| *i)
    };
    let up_replica = first(Availability::Up);
    let busy_home = up_replica.is_none()
        && home_avail == Availability::Busy
        && entry.home.state != AdminState::OutOfService
        && !cx.skipped(&entry.home);
    let chosen = match (up_replica, busy_home) {
        (Some(i), _) => Some(i),
        (None, true) => None,
        (None, false) => first(Availability::Busy),
    };
    Choice {
        order,
        failover,
        may_fail_over,
        busy_home,
        chosen,
    }
}

/// The home is not usable: a replica, the busy home, or hold.
fn fail_over(cx: &Ctx, mut home: Considered) -> Route {
    let (entry, policy) = (cx.entry, cx.policy);
    let Choice {
        order,
        failover,
        may_fail_over,
        busy_home,
        chosen,
    } = choose(cx, home.availability);
    // Replicas tried after the chosen one were not needed; those before were passed over.
    let chosen_at = chosen.and_then(|c| order.iter().position(|(i, _, _)| *i == c));
    let mut replicas: Vec<Considered> = order
        .iter()
        .enumerate()
        .map(|(at, (i, r, avail))| Considered {
            server: r.name.clone(),
            admin: r.state,
            copy: ReplicaState::InService,
            availability: *avail,
            verdict: if Some(*i) == chosen {
                taken_verdict(r, *avail, policy)
            } else if chosen_at.is_some_and(|c| at > c) {
                "not needed"
            } else {
                passed_verdict(cx, r, *avail, may_fail_over, failover)
            },
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
    let Some(name) = chosen.map(|i| entry.replicas[i].name.clone()) else {
        let why = if entry.replicas.is_empty() {
            "no replica"
        } else if !may_fail_over {
            "no failover for this attempt"
        } else {
            "no replica available"
        };
        return Route {
            reason: format!(
                "hold and retry home {} without failover: home is {}, {why}",
                entry.home.name,
                short(&home)
            ),
            decision: Decision::Hold,
            home,
            replicas,
        };
    };
    Route {
        reason: format!(
            "fail over to replica {name}: home {} is {}",
            entry.home.name,
            short(&home)
        ),
        decision: Decision::Replica(name),
        home,
        replicas,
    }
}

/// Why the chosen replica was taken.
fn taken_verdict(r: &Server, avail: Availability, policy: &Policy) -> &'static str {
    let local = policy
        .local_server
        .as_deref()
        .is_some_and(|l| l.eq_ignore_ascii_case(&r.name));
    if avail == Availability::Busy {
        "taken: busy, but the only server reachable"
    } else if local {
        "taken: the replica on this router's own server comes first"
    } else {
        "taken: first available replica in preference order"
    }
}

/// Why a replica before the chosen one (or any, when none was) was passed over.
fn passed_verdict(
    cx: &Ctx,
    r: &Server,
    avail: Availability,
    may_fail_over: bool,
    failover: bool,
) -> &'static str {
    if !may_fail_over {
        if failover {
            "not tried: a held message retries the home server only"
        } else {
            "not tried: failover is off"
        }
    } else if r.state == AdminState::OutOfService {
        "passed over: out of service"
    } else if r.state == AdminState::Restricted {
        "passed over: restricted (never a failover target)"
    } else if cx.skipped(r) {
        "passed over: failed this attempt"
    } else if avail == Availability::Busy {
        "passed over: busy"
    } else {
        "passed over: down"
    }
}

/// The fallback relay (`routing.fallback_relay`, Postfix's
/// `smtp_fallback_relay`): a decision to hold mail that arrived at least `after`
/// ago becomes a transfer to `relay` instead of waiting until expiry — unless the
/// relay already failed this attempt (`skip`). Other decisions stand.
pub fn fallback(
    route: Route,
    age: Duration,
    relay: Option<&str>,
    after: Duration,
    skip: &[String],
) -> Route {
    let Some(relay) = relay else {
        return route;
    };
    if route.decision != Decision::Hold || age < after || skip.iter().any(|k| k == relay) {
        return route;
    }
    Route {
        decision: Decision::NextHop(relay.to_string()),
        reason: format!(
            "fallback relay {relay}: held for {} (over routing.fallback_after {}); {}",
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            humantime::format_duration(after),
            route.reason
        ),
        ..route
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
            copy: ReplicaState::InService,
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
mod tests;
