//! Unit tests of the spool (a temporary store).

use super::*;

fn envelope(n: usize) -> Envelope {
    Envelope {
        id: QueueId::new(),
        sender: Some(format!("s{n}@x.test")),
        recipients: vec![Recipient::new("r@y.test".into(), "r@y.test".into())],
        client_ip: "127.0.0.1".parse().unwrap(),
        helo: "client".into(),
        received_at: 0,
        size: 5,
        smtputf8: false,
        eight_bit: false,
    }
}

#[tokio::test]
async fn concurrent_enqueues_are_all_stored_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let spool = Spool::open(&db, dir.path()).unwrap();
    let mut tasks = Vec::new();
    for n in 0..50 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let env = envelope(n);
            spool
                .enqueue(&env, format!("body {n}").as_bytes())
                .await
                .unwrap();
            env
        }));
    }
    let mut envs = Vec::new();
    for t in tasks {
        envs.push(t.await.unwrap());
    }
    assert_eq!(spool.len(), 50);
    for env in &envs {
        assert_eq!(spool.envelope(env.id).unwrap().as_ref(), Some(env));
        let n = env
            .sender
            .as_ref()
            .unwrap()
            .trim_start_matches('s')
            .trim_end_matches("@x.test");
        assert_eq!(
            spool.message(env.id).unwrap().unwrap(),
            format!("body {n}").as_bytes()
        );
    }
    let listed = spool.envelopes().unwrap();
    assert!(listed.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
}

#[test]
fn the_tail_round_trips_and_a_record_without_it_reads_as_before() {
    let mut env = envelope(1);
    env.recipients
        .push(Recipient::new("s@y.test".into(), String::new()));
    env.recipients[1].delay_reported = true;
    assert_eq!(decode(&encode(&env).unwrap()).unwrap(), env);
    assert!(decode(&encode(&env).unwrap()).unwrap().recipients[1].delay_reported);
    // As written before the tail existed.
    let mut old = vec![FORMAT];
    old.extend(bincode::serde::encode_to_vec(&env, bincode::config::standard()).unwrap());
    let read = decode(&old).unwrap();
    assert!(read.recipients.iter().all(|r| !r.delay_reported));
    assert_eq!(read.recipients[0], env.recipients[0]);
}

#[tokio::test]
async fn an_update_never_recreates_a_removed_message() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let spool = Spool::open(&db, dir.path()).unwrap();
    let mut env = envelope(1);
    spool.enqueue(&env, b"body").await.unwrap();
    env.recipients[0].attempts = 1;
    spool.update(&env).await.unwrap();
    spool.remove(env.id).await.unwrap();
    // A stale writer (a delivery or a command that read it before the removal).
    let e = spool.update(&env).await.unwrap_err();
    assert!(e.is::<Removed>(), "{e}");
    assert_eq!(spool.envelope(env.id).unwrap(), None);
    assert!(spool.envelopes().unwrap().is_empty());
    assert_eq!(spool.len(), 0);
}

#[tokio::test]
async fn a_body_without_its_envelope_is_removed_at_open_with_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let (kept, half) = (envelope(1), envelope(2));
    {
        let spool = Spool::open(&db, dir.path()).unwrap();
        spool.enqueue(&half, b"half").await.unwrap();
        // As a crash between the body key and the envelope leaves it.
        spool.tree.remove(key(b'e', half.id)).unwrap();
        spool.durable().await.unwrap();
    }
    let segments = || {
        std::fs::read_dir(dir.path().join("segments"))
            .unwrap()
            .count()
    };
    assert_eq!(segments(), 1);
    let spool = Spool::open(&db, dir.path()).unwrap();
    assert!(!spool.tree.contains_key(key(b's', half.id)).unwrap());
    assert_eq!(segments(), 0, "the segment only the half message was in");
    spool.enqueue(&kept, b"kept").await.unwrap();
    assert_eq!(
        spool.deliverable(kept.id).await.unwrap(),
        Some((kept.clone(), b"kept".to_vec()))
    );
    assert_eq!(spool.message(kept.id).unwrap().unwrap(), b"kept");
    spool.remove(kept.id).await.unwrap();
    assert_eq!(spool.tree.len(), 0, "every key of a removed message goes");
}

#[tokio::test]
async fn an_envelope_without_octets_is_not_deliverable_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let spool = Spool::open(&db, dir.path()).unwrap();
    let (whole, zombie) = (envelope(1), envelope(2));
    spool.enqueue(&whole, b"body").await.unwrap();
    spool.enqueue(&zombie, b"body").await.unwrap();
    spool.tree.remove(key(b's', zombie.id)).unwrap();
    assert_eq!(
        spool.deliverable(whole.id).await.unwrap(),
        Some((whole, b"body".to_vec()))
    );
    assert_eq!(spool.deliverable(zombie.id).await.unwrap(), None);
    assert_eq!(spool.envelope(zombie.id).unwrap(), None);
    assert_eq!(spool.len(), 1);
}
