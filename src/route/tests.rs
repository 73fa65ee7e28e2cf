//! The routing decision's table of cases and its explanations.
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
            home_state: Default::default(),
            replica_states: vec![],
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
            home_state: Default::default(),
            replica_states: vec![],
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
            home_state: Default::default(),
            replica_states: vec![],
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

#[test]
fn held_mail_older_than_fallback_after_goes_to_the_fallback_relay() {
    let e = entry(In, &[("r1", In)]);
    let down = |_: &Server| Down;
    let held = decide(&e, &down, &Policy::default(), Attempt::First, &[], &[]);
    assert_eq!(held.decision, Decision::Hold);
    let day = Duration::from_secs(86_400);
    let relay = Some("fb.test:25");
    let f = |age, relay, skip: &[String]| fallback(held.clone(), age, relay, day, skip).decision;
    assert_eq!(f(day, relay, &[]), Decision::NextHop("fb.test:25".into()));
    assert_eq!(f(day / 2, relay, &[]), Decision::Hold, "too young");
    assert_eq!(f(day, None, &[]), Decision::Hold, "no fallback relay");
    assert_eq!(
        f(day, relay, &["fb.test:25".to_string()]),
        Decision::Hold,
        "the relay failed this attempt"
    );
    let r = fallback(held.clone(), day, relay, day, &[]);
    assert!(
        r.reason.starts_with("fallback relay fb.test:25: held for 1day (over routing.fallback_after 1day); hold and retry home h"),
        "{}",
        r.reason
    );
    let up = |_: &Server| Up;
    let home = decide(&e, &up, &Policy::default(), Attempt::First, &[], &[]);
    assert_eq!(
        fallback(home, day, relay, day, &[]).decision,
        Decision::Home("h".into())
    );
}
