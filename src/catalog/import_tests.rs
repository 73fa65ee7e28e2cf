//! Tests of the catalog's imports: interrupted imports, stale formats, big merges.

use super::*;
use crate::catalog::files::{Origin, Place, Row};
use crate::catalog::model::{AdminState, Mailbox, Server};
use crate::catalog::store::{CURRENT, FORMAT, FORMAT_KEY};
use crate::catalog::validate::resolve;

fn input(servers: &[(&str, &str)], mailboxes: &[(&str, &str, &[&str], &[&str])]) -> Input {
    let origin = Origin {
        file: 0,
        place: Place::File,
    };
    Input {
        files: vec!["test".into()],
        servers: servers
            .iter()
            .enumerate()
            .map(|(i, (name, cluster))| Row {
                item: Server {
                    name: name.to_string(),
                    cluster: cluster.to_string(),
                    address: format!("127.0.0.1:{}", 2000 + i),
                    state: AdminState::InService,
                    availability_threshold: None,
                    tls: Default::default(),
                    tls_name: None,
                },
                origin,
            })
            .collect(),
        mailboxes: mailboxes
            .iter()
            .map(|(a, h, r, al)| Row {
                item: Mailbox {
                    address: a.to_string(),
                    home: h.to_string(),
                    replicas: r.iter().map(|s| s.to_string()).collect(),
                    aliases: al.iter().map(|s| s.to_string()).collect(),
                    failover: None,
                    home_state: Default::default(),
                    replica_states: vec![],
                },
                origin,
            })
            .collect(),
        problems: vec![],
        clusters: vec![],
    }
}

#[test]
fn an_interrupted_import_leaves_the_old_catalog_and_its_tree_is_dropped() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    let hidden = indicatif::ProgressBar::hidden();
    let one = input(
        &[("a", "c"), ("b", "c")],
        &[("x@d.test", "a", &["b"], &["y@d.test"])],
    );
    cat.import(one, Mode::Replace, false, &hidden).unwrap();
    // What a replace killed before its switch leaves: a filled tree nobody points at.
    let orphan = db.open_tree("catalog-99").unwrap();
    orphan
        .insert(b"m\0ghost@d.test", b"junk".as_slice())
        .unwrap();
    drop(cat);
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"catalog-99"));
    let l = cat.lookup("Y@D.test").unwrap().expect("alias found");
    assert_eq!(l.mailbox.address, "x@d.test");
    assert_eq!(l.replicas[0].name, "b");
    assert!(cat.lookup("ghost@d.test").unwrap().is_none());
}

#[test]
fn a_catalog_of_an_older_record_format_is_refused_with_what_to_do() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    let one = input(&[("a", "c")], &[("x@d.test", "a", &[], &[])]);
    let hidden = indicatif::ProgressBar::hidden();
    cat.import(one, Mode::Replace, false, &hidden).unwrap();
    let current = cat.meta.get(CURRENT).unwrap().unwrap();
    drop(cat);
    let tree = db.open_tree(current).unwrap();
    assert_eq!(tree.get(FORMAT_KEY).unwrap().as_deref(), Some(FORMAT));
    tree.remove(FORMAT_KEY).unwrap();
    let e = Catalog::open(&db, LocalPartMatch::CaseInsensitive)
        .err()
        .expect("refused");
    let e = format!("{e:#}");
    assert!(
        e.contains("record format 1") && e.contains("import --replace"),
        "{e}"
    );
    // `import --replace` builds a new catalog; a failed one changes nothing.
    let cat = Catalog::open_for_replace(&db, LocalPartMatch::CaseInsensitive).unwrap();
    let bad = input(&[("a", "c")], &[("x@d.test", "nosuch", &[], &[])]);
    assert!(cat.import(bad, Mode::Replace, false, &hidden).is_err());
    drop(cat);
    assert!(
        Catalog::open(&db, LocalPartMatch::CaseInsensitive).is_err(),
        "still stale"
    );
    let cat = Catalog::open_for_replace(&db, LocalPartMatch::CaseInsensitive).unwrap();
    let two = input(&[("a", "c")], &[("y@d.test", "a", &[], &[])]);
    let report = cat.import(two, Mode::Replace, false, &hidden).unwrap();
    assert_eq!(report.mailboxes.added, 1, "{report:?}");
    drop(cat);
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    assert!(cat.lookup("y@d.test").unwrap().is_some());
    assert!(cat.lookup("x@d.test").unwrap().is_none());
}

#[test]
fn small_merge_and_large_merge_give_the_same_catalog() {
    let servers = [("a", "c"), ("b", "c"), ("z", "other")];
    let base: Vec<(String, String)> = (0..300)
        .map(|i| (format!("u{i}@d.test"), format!("al{i}@d.test")))
        .collect();
    let rows: Vec<(&str, &str, &[&str], &[&str])> = Vec::new();
    let mut results = Vec::new();
    for limit_forced in [false, true] {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
        let hidden = indicatif::ProgressBar::hidden();
        let mut inp = input(&servers, &rows);
        for (a, al) in &base {
            inp.mailboxes.push(Row {
                item: Mailbox {
                    address: a.clone(),
                    home: "a".into(),
                    replicas: vec!["b".into()],
                    aliases: vec![al.clone()],
                    failover: None,
                    home_state: Default::default(),
                    replica_states: vec![],
                },
                origin: inp.servers[0].origin,
            });
        }
        cat.import(inp, Mode::Replace, false, &hidden).unwrap();
        // Move half the mailboxes home to b, drop their aliases.
        let mut change = input(&[], &rows);
        for (a, _) in base.iter().step_by(2) {
            change.mailboxes.push(Row {
                item: Mailbox {
                    address: a.clone(),
                    home: "b".into(),
                    replicas: vec!["a".into()],
                    aliases: vec![],
                    failover: None,
                    home_state: Default::default(),
                    replica_states: vec![],
                },
                origin: Origin {
                    file: 0,
                    place: Place::File,
                },
            });
        }
        let (tree, servers) = cat.live_tree();
        let view = TreeView {
            tree: &tree,
            servers: &servers,
            rule: cat.rule,
        };
        let resolved = resolve(change, Some(&view), cat.rule).unwrap();
        let plan = plan(&view, &resolved, Mode::Merge).unwrap();
        assert_eq!(plan.report.mailboxes.updated, 150);
        if limit_forced {
            cat.apply_shadow(&tree, &resolved, &plan, Mode::Merge, &hidden)
                .unwrap();
        } else {
            let mut batch = sled::Batch::default();
            plan.write(&tree, &mut batch, cat.rule).unwrap();
            tree.apply_batch(batch).unwrap();
        }
        let on_a: Vec<String> = cat
            .mailboxes(None, Some("a"))
            .unwrap()
            .into_iter()
            .map(|m| m.address)
            .collect();
        let on_b = cat.mailboxes(None, Some("b")).unwrap().len();
        assert_eq!(on_a.len(), 300);
        assert_eq!(on_b, 300);
        assert!(cat.lookup("al0@d.test").unwrap().is_none(), "dropped alias");
        assert_eq!(cat.lookup("al1@d.test").unwrap().unwrap().home.name, "a");
        assert_eq!(cat.lookup("u0@d.test").unwrap().unwrap().home.name, "b");
        assert!(cat.serves_domain("D.TEST").unwrap());
        assert!(!cat.serves_domain("e.test").unwrap());
        results.push(cat.mailboxes(None, None).unwrap());
    }
    assert_eq!(results[0], results[1]);
}

#[test]
fn a_compaction_folds_the_delta_into_a_new_index_and_keeps_everything() {
    use crate::catalog::change::Change;
    let db = sled::Config::new().temporary(true).open().unwrap();
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    let hidden = indicatif::ProgressBar::hidden();
    let one = input(
        &[("a", "c"), ("b", "c")],
        &[
            ("x@d.test", "a", &["b"], &["y@d.test"]),
            ("z@d.test", "a", &[], &[]),
        ],
    );
    cat.import(one, Mode::Replace, false, &hidden).unwrap();
    let w = Mailbox {
        address: "w@d.test".into(),
        home: "b".into(),
        replicas: vec![],
        aliases: vec!["v@e.test".into()],
        failover: None,
        home_state: Default::default(),
        replica_states: vec![],
    };
    let changes = vec![
        Change::PutMailbox(w),
        Change::RemoveMailbox("z@d.test".into()),
    ];
    let report = cat.apply(changes, &[("cookie", b"1")]).unwrap();
    assert_eq!(report.applied, 2, "{report:?}");
    let (gen, _) = cat.live_tree();
    assert_eq!(
        gen.index_sizes(),
        (3, 3),
        "w, v and z's tombstone in the delta"
    );
    // What the commit does once the delta passes its threshold.
    cat.apply_shadow(
        &gen,
        &Resolved::default(),
        &Plan::default(),
        Mode::Merge,
        &hidden,
    )
    .unwrap();
    let (gen, _) = cat.live_tree();
    assert_eq!(gen.index_sizes(), (0, 4), "x, y, w, v in the new fst");
    assert_eq!(
        cat.lookup("Y@d.test").unwrap().unwrap().mailbox.address,
        "x@d.test"
    );
    assert_eq!(cat.lookup("v@E.test").unwrap().unwrap().home.name, "b");
    assert!(cat.lookup("z@d.test").unwrap().is_none());
    assert_eq!(
        cat.sync_meta("cookie").unwrap().as_deref(),
        Some(b"1".as_slice())
    );
    assert_eq!(cat.mailboxes(None, Some("b")).unwrap().len(), 2);
    assert_eq!(cat.mailboxes(None, None).unwrap().len(), 2);
    assert!(cat.serves_domain("e.test").unwrap());
    drop(cat);
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
    assert_eq!(cat.lookup("w@d.test").unwrap().unwrap().home.name, "b");
}
