//! Tests of `Catalog::apply` and `Catalog::replace_all`.

use super::*;
use crate::catalog::model::AdminState;

fn server(name: &str, cluster: &str) -> Server {
    Server {
        name: name.into(),
        cluster: cluster.into(),
        address: "127.0.0.1:2525".into(),
        state: AdminState::InService,
        availability_threshold: None,
        tls: Default::default(),
        tls_name: None,
    }
}

fn mailbox(address: &str, home: &str, replicas: &[&str], aliases: &[&str]) -> Mailbox {
    Mailbox {
        address: address.into(),
        home: home.into(),
        replicas: replicas.iter().map(|s| s.to_string()).collect(),
        aliases: aliases.iter().map(|s| s.to_string()).collect(),
        failover: None,
        home_state: Default::default(),
        replica_states: vec![],
    }
}

fn open() -> (sled::Db, Catalog) {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    (db, cat)
}

fn home_of(cat: &Catalog, addr: &str) -> Option<String> {
    cat.lookup(addr).unwrap().map(|l| l.home.name.clone())
}

/// Servers a and b in c1, z in c2; m1@d.test on a with alias al@d.test.
fn base(cat: &Catalog) {
    let r = cat
        .apply(
            vec![
                Change::PutServer(server("a", "c1")),
                Change::PutServer(server("b", "c1")),
                Change::PutServer(server("z", "c2")),
                Change::PutMailbox(mailbox("m1@d.test", "a", &[], &["al@d.test"])),
            ],
            &[],
        )
        .unwrap();
    assert!(r.rejected.is_empty(), "{r:?}");
}

#[test]
fn valid_changes_apply_and_lookups_see_them_with_the_meta() {
    let (_db, cat) = open();
    let serial = cat.serial();
    let mut c1 = Cluster {
        name: "c1".into(),
        routers: vec!["127.0.0.1:2600".into()],
    };
    let changes = vec![
        Change::PutCluster(c1.clone()),
        Change::PutServer(server("a", "c1")),
        Change::PutServer(server("b", "c1")),
        Change::PutMailbox(mailbox("x@d.test", "A", &["b"], &["Y@d.test"])),
    ];
    let r = cat.apply(changes, &[("cookie", b"one")]).unwrap();
    assert_eq!(r.applied, 4);
    assert!(r.rejected.is_empty(), "{r:?}");
    assert!(cat.serial() > serial);
    let l = cat.lookup("y@D.TEST").unwrap().expect("alias found");
    assert_eq!(l.mailbox.address, "x@d.test");
    assert_eq!(l.mailbox.home, "a", "canonical server spelling");
    assert_eq!(l.replicas[0].name, "b");
    assert_eq!(cat.mailboxes(None, Some("b")).unwrap().len(), 1);
    assert!(cat.serves_domain("d.test").unwrap());
    assert_eq!(cat.cluster("C1").unwrap(), Some(c1.clone()));
    assert_eq!(
        cat.sync_meta("cookie").unwrap().as_deref(),
        Some(&b"one"[..])
    );

    // Replace a record, then remove everything.
    c1.routers.push("127.0.0.1:2601".into());
    let r = cat
        .apply(vec![Change::PutCluster(c1.clone())], &[("cookie", b"two")])
        .unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(cat.cluster("c1").unwrap(), Some(c1));
    let r = cat
        .apply(
            vec![
                Change::RemoveMailbox("X@D.test".into()),
                Change::RemoveServer("B".into()),
                Change::RemoveCluster("c1".into()),
                Change::RemoveMailbox("never@d.test".into()),
            ],
            &[("cookie", b"three")],
        )
        .unwrap();
    assert_eq!(r.applied, 4, "{r:?}");
    assert!(cat.lookup("x@d.test").unwrap().is_none());
    assert!(cat.lookup("y@d.test").unwrap().is_none(), "alias gone too");
    assert!(cat.server("b").is_none());
    assert!(cat.server("a").is_some());
    assert!(cat.cluster("c1").unwrap().is_none());
    assert!(!cat.serves_domain("d.test").unwrap());
    assert!(cat.mailboxes(None, Some("a")).unwrap().is_empty());
    assert_eq!(
        cat.sync_meta("cookie").unwrap().as_deref(),
        Some(&b"three"[..])
    );

    // Nothing to do: no write, no new serial.
    let serial = cat.serial();
    let r = cat
        .apply(vec![Change::RemoveServer("b".into())], &[])
        .unwrap();
    assert_eq!((r.applied, r.rejected.len()), (1, 0));
    assert_eq!(cat.serial(), serial);
}

#[test]
fn each_broken_invariant_is_rejected_with_a_reason_and_the_rest_applies() {
    let (_db, cat) = open();
    base(&cat);
    let mut bad_address = server("q", "c1");
    bad_address.address = "nohost".into();
    let changes = vec![
        Change::PutMailbox(mailbox("u1@d.test", "nowhere", &[], &[])),
        Change::PutMailbox(mailbox("u2@d.test", "a", &["ghost"], &[])),
        Change::PutMailbox(mailbox("u3@d.test", "a", &["z"], &[])),
        Change::PutMailbox(mailbox("u4@d.test", "a", &[], &["AL@d.test"])),
        Change::RemoveServer("A".into()),
        Change::PutMailbox(mailbox("ok@d.test", "b", &["a"], &[])),
        Change::PutServer(bad_address),
        Change::RemoveMailbox("al@d.test".into()),
        Change::PutServer(server("b", "c2")),
        Change::PutMailbox(mailbox("no-at-sign", "a", &[], &[])),
    ];
    let r = cat.apply(changes, &[]).unwrap();
    assert_eq!(r.applied, 1, "{r:#?}");
    let reasons: Vec<(usize, &str)> = r
        .rejected
        .iter()
        .map(|x| (x.index, x.reason.as_str()))
        .collect();
    let want: &[(usize, &str)] = &[
        (0, "home server \"nowhere\" does not exist"),
        (1, "replica server \"ghost\" does not exist"),
        (
            2,
            "replica \"z\" is in cluster \"c2\", the home \"a\" is in cluster \"c1\"",
        ),
        (
            3,
            "address \"al@d.test\" already belongs to mailbox \"m1@d.test\"",
        ),
        (
            4,
            "server \"A\" is still the home or a replica of 1 mailbox(es)",
        ),
        (6, "nohost"),
        (7, "\"al@d.test\" is an alias of mailbox \"m1@d.test\""),
        (
            8,
            "moving server \"b\" to cluster \"c2\" breaks mailbox \"ok@d.test\"",
        ),
        (9, "no-at-sign"),
    ];
    assert_eq!(reasons.len(), want.len(), "{reasons:#?}");
    for ((i, reason), (wi, wreason)) in reasons.iter().zip(want) {
        assert_eq!(i, wi, "{reasons:#?}");
        assert!(
            reason.contains(wreason),
            "{i}: {reason:?} lacks {wreason:?}"
        );
        assert!(!reason.starts_with("change"), "{reason:?}");
    }
    assert!(matches!(&r.rejected[0].change, Change::PutMailbox(m) if m.address == "u1@d.test"));
    assert_eq!(home_of(&cat, "ok@d.test").as_deref(), Some("b"));
    for u in ["u1", "u2", "u3", "u4"] {
        assert!(cat.lookup(&format!("{u}@d.test")).unwrap().is_none());
    }
    assert_eq!(home_of(&cat, "AL@d.test").as_deref(), Some("a"));
    assert_eq!(cat.server("b").unwrap().cluster, "c1");
    assert!(cat.server("q").is_none());
}

#[test]
fn a_later_change_makes_an_earlier_rejected_one_valid() {
    let (_db, cat) = open();
    base(&cat);
    let changes = vec![
        Change::PutMailbox(mailbox("u@d.test", "new", &[], &[])),
        Change::PutServer(server("new", "c1")),
        Change::PutMailbox(mailbox("u@d.test", "new", &[], &[])),
        // A server in use, emptied by the changes after it.
        Change::RemoveServer("a".into()),
        Change::PutMailbox(mailbox("m1@d.test", "b", &[], &[])),
        Change::RemoveServer("a".into()),
        // m1's old alias, freed above, taken by another mailbox.
        Change::PutMailbox(mailbox("m2@d.test", "b", &[], &["al@d.test"])),
    ];
    let r = cat.apply(changes, &[]).unwrap();
    let rejected: Vec<usize> = r.rejected.iter().map(|x| x.index).collect();
    assert_eq!(rejected, [0, 3], "{r:#?}");
    assert_eq!(r.applied, 5);
    assert_eq!(home_of(&cat, "u@d.test").as_deref(), Some("new"));
    assert!(cat.server("a").is_none());
    assert_eq!(home_of(&cat, "m1@d.test").as_deref(), Some("b"));
    let al = cat.lookup("al@d.test").unwrap().expect("alias moved");
    assert_eq!(al.mailbox.address, "m2@d.test");
    assert_eq!(cat.mailboxes(None, Some("b")).unwrap().len(), 2);
    assert!(cat.mailboxes(None, Some("a")).unwrap().is_empty());
}

#[test]
fn apply_writes_its_changes_and_meta_together_in_small_and_large_batches() {
    let (db, cat) = open();
    base(&cat);
    // Every change rejected: the meta is still written, the serial stays.
    let serial = cat.serial();
    let r = cat
        .apply(
            vec![Change::PutMailbox(mailbox("x@d.test", "ghost", &[], &[]))],
            &[("cookie", b"c1")],
        )
        .unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(cat.serial(), serial);
    assert_eq!(
        cat.sync_meta("cookie").unwrap().as_deref(),
        Some(&b"c1"[..])
    );
    // 10,000 mailboxes (20,000 keys and some index chunks): still one batch.
    let batch: Vec<Change> = (0..10_000)
        .map(|i| {
            let alias = format!("b{i}@e.test");
            Change::PutMailbox(mailbox(&format!("m{i}@e.test"), "a", &["b"], &[&alias]))
        })
        .collect();
    let r = cat.apply(batch, &[("cookie", b"c2")]).unwrap();
    assert_eq!((r.applied, r.rejected.len()), (10_000, 0));
    let live = |db: &sled::Db| -> Vec<Vec<u8>> {
        let names = db.tree_names().into_iter().map(|n| n.to_vec());
        names.filter(|n| n.starts_with(b"catalog-")).collect()
    };
    assert_eq!(live(&db), [b"catalog-1".to_vec()], "no shadow tree");
    assert_eq!(home_of(&cat, "B9999@e.test").as_deref(), Some("a"));
    // Too many keys for one batch (13,000 x 4 names): through a shadow tree, meta included.
    let many: Vec<Change> = (0..13_000)
        .map(|i| {
            let aliases: Vec<String> = (1..4).map(|a| format!("n{i}.{a}@e.test")).collect();
            let aliases: Vec<&str> = aliases.iter().map(String::as_str).collect();
            Change::PutMailbox(mailbox(&format!("n{i}@e.test"), "a", &["b"], &aliases))
        })
        .collect();
    let r = cat.apply(many, &[("cookie", b"c3")]).unwrap();
    assert_eq!((r.applied, r.rejected.len()), (13_000, 0));
    drop(cat);
    assert_eq!(
        live(&db),
        [b"catalog-2".to_vec()],
        "the shadow tree replaced the old one"
    );
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    assert_eq!(
        cat.sync_meta("cookie").unwrap().as_deref(),
        Some(&b"c3"[..])
    );
    assert_eq!(home_of(&cat, "N12999.3@e.test").as_deref(), Some("a"));
    assert_eq!(home_of(&cat, "m9999@e.test").as_deref(), Some("a"));
    assert_eq!(home_of(&cat, "al@d.test").as_deref(), Some("a"));
    assert_eq!(cat.mailboxes(None, Some("b")).unwrap().len(), 23_000);
    assert!(cat.sync_meta("other").unwrap().is_none());
}

#[test]
fn replace_all_keeps_the_valid_subset_with_its_meta() {
    let (db, cat) = open();
    base(&cat);
    cat.apply(vec![], &[("cookie", b"old"), ("gone", b"x")])
        .unwrap();
    let changes = vec![
        Change::PutMailbox(mailbox("early@e.test", "s", &[], &[])),
        Change::PutServer(server("s", "c9")),
        Change::PutMailbox(mailbox("n@e.test", "S", &[], &["alias@e.test"])),
        Change::PutMailbox(mailbox("dup@e.test", "s", &[], &["ALIAS@e.test"])),
        Change::RemoveMailbox("n@e.test".into()),
        Change::PutMailbox(mailbox("n@e.test", "s", &[], &["alias@e.test"])),
    ];
    let r = cat.replace_all(changes, &[("cookie", b"full")]).unwrap();
    let rejected: Vec<usize> = r.rejected.iter().map(|x| x.index).collect();
    assert_eq!(rejected, [0, 3], "{r:#?}");
    assert_eq!(r.applied, 4);
    let check = |cat: &Catalog| {
        assert!(
            cat.lookup("m1@d.test").unwrap().is_none(),
            "old catalog gone"
        );
        assert!(cat.server("a").is_none());
        assert_eq!(cat.servers(None).len(), 1);
        assert_eq!(home_of(cat, "ALIAS@e.test").as_deref(), Some("s"));
        assert!(cat.lookup("early@e.test").unwrap().is_none());
        assert_eq!(cat.mailboxes(None, None).unwrap().len(), 1);
        assert_eq!(
            cat.sync_meta("cookie").unwrap().as_deref(),
            Some(&b"full"[..])
        );
        assert!(
            cat.sync_meta("gone").unwrap().is_none(),
            "only the new meta"
        );
    };
    check(&cat);
    drop(cat);
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    check(&cat);
}
