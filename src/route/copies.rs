//! Per-mailbox copy states in the routing decision: a mailbox's copy that is not
//! in service (`out-of-service`, or a replica `pending-delete`) takes none of its
//! mail, whatever its server's admin state — only this mailbox fails over. The
//! decision sees such a copy as a server out of service ([`effective`]); the
//! explanation then names the copy, not the server ([`explain`]).

use super::{Considered, Route};
use crate::catalog::{AdminState, Lookup, ReplicaState, Server};
use std::sync::Arc;

/// `entry` with every server whose copy is not in service marked out of service.
pub fn effective(entry: &Lookup) -> Lookup {
    let mark = |s: &Arc<Server>| {
        if entry.mailbox.state_on(&s.name).is_in_service() {
            s.clone()
        } else {
            Arc::new(Server {
                state: AdminState::OutOfService,
                ..(**s).clone()
            })
        }
    };
    Lookup {
        mailbox: entry.mailbox.clone(),
        home: mark(&entry.home),
        replicas: entry.replicas.iter().map(mark).collect(),
    }
}

/// Puts the servers' own admin states back into `route` (decided on
/// [`effective`]) and says which copies were passed over for their state.
pub fn explain(route: &mut Route, entry: &Lookup) {
    let servers = std::iter::once(&entry.home).chain(entry.replicas.iter());
    let considered = std::iter::once(&mut route.home).chain(route.replicas.iter_mut());
    for c in considered {
        let Some(s) = servers.clone().find(|s| s.name == c.server) else {
            continue;
        };
        annotate(c, s, entry.mailbox.state_on(&s.name));
    }
    if !entry.mailbox.home_state.is_in_service() {
        let name = &entry.home.name;
        route.reason = route
            .reason
            .replace(
                &format!("home {name} is out of service"),
                &format!("the home copy on {name} is out of service"),
            )
            .replace("home is out of service", "the home copy is out of service");
    }
}

fn annotate(c: &mut Considered, server: &Server, copy: ReplicaState) {
    c.admin = server.state;
    c.copy = copy;
    if copy.is_in_service() || server.state == AdminState::OutOfService {
        return;
    }
    if c.verdict == "passed over: out of service" {
        c.verdict = match copy {
            ReplicaState::PendingDelete => "passed over: this mailbox's copy is pending delete",
            _ => "passed over: this mailbox's copy is out of service",
        };
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decide, Attempt, Availability, Decision, Policy};
    use super::*;
    use crate::catalog::Mailbox;

    fn server(name: &str) -> Arc<Server> {
        Arc::new(Server {
            name: name.into(),
            cluster: "c".into(),
            address: "127.0.0.1:25".into(),
            state: AdminState::InService,
            availability_threshold: None,
            tls: Default::default(),
            tls_name: None,
        })
    }

    fn entry(home_state: ReplicaState, states: &[(&str, ReplicaState)]) -> Lookup {
        Lookup {
            mailbox: Mailbox {
                address: "u@d.test".into(),
                home: "h".into(),
                replicas: vec!["r1".into(), "r2".into()],
                aliases: vec![],
                failover: None,
                home_state,
                replica_states: states.iter().map(|(s, st)| (s.to_string(), *st)).collect(),
            },
            home: server("h"),
            replicas: vec![server("r1"), server("r2")],
        }
    }

    #[test]
    fn a_copy_not_in_service_takes_none_of_its_mailbox_mail() {
        use ReplicaState::{InService, OutOfService, PendingDelete};
        let up = |_: &Server| Availability::Up;
        let p = Policy::default();
        let d = |e: &Lookup, a| decide(e, &up, &p, a, &[], &[]);
        // The home copy out of service: new mail fails over, held mail waits.
        let e = entry(OutOfService, &[]);
        let first = d(&e, Attempt::First);
        assert_eq!(first.decision, Decision::Replica("r1".into()));
        assert!(
            first
                .reason
                .contains("the home copy on h is out of service"),
            "{}",
            first.reason
        );
        assert_eq!(
            first.home.admin,
            AdminState::InService,
            "the server's own state"
        );
        assert_eq!(first.home.copy, OutOfService);
        assert!(first
            .why()
            .contains("this mailbox's copy is out of service"));
        assert_eq!(d(&e, Attempt::Retry).decision, Decision::Hold);
        // A replica pending delete is never a failover target.
        let e = entry(OutOfService, &[("R1", PendingDelete)]);
        let route = d(&e, Attempt::First);
        assert_eq!(route.decision, Decision::Replica("r2".into()));
        assert!(
            route
                .why()
                .contains("this mailbox's copy is pending delete"),
            "{}",
            route.why()
        );
        // Both replicas out: hold.
        let e = entry(OutOfService, &[("r1", PendingDelete), ("r2", OutOfService)]);
        assert_eq!(d(&e, Attempt::First).decision, Decision::Hold);
        // In service everywhere: home.
        let e = entry(InService, &[("r1", InService)]);
        assert_eq!(d(&e, Attempt::First).decision, Decision::Home("h".into()));
    }
}
