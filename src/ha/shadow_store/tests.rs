use super::*;
use crate::queue::Recipient;

fn env(id: u64) -> Envelope {
    Envelope {
        id: QueueId(id << 20),
        sender: Some("s@x.test".into()),
        recipients: vec![Recipient::new("u@c.test".into(), "u@c.test".into())],
        client_ip: "127.0.0.1".parse().unwrap(),
        helo: "h".into(),
        received_at: 0,
        size: 5,
        smtputf8: false,
        eight_bit: false,
    }
}

fn put(n: u64) -> Op {
    Op::Put {
        envelope: env(n),
        message: Arc::new(format!("m{n}").into_bytes()),
    }
}

fn read(s: &Store, n: u64) -> Option<(Envelope, Vec<u8>)> {
    let rec = s.tree.get(env(n).id.to_bytes()).unwrap()?;
    let (e, body) = decode(&rec).unwrap();
    Some((e, s.octets(body).unwrap()?))
}

#[test]
fn shadows_are_kept_dropped_and_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let s = Store::open(&db, dir.path()).unwrap();
    let released = s
        .apply(&[put(1), put(2), put(3), Op::Drop(env(2).id)])
        .unwrap();
    assert_eq!(released.len(), 1, "2's body: {released:?}");
    s.release(released);
    assert_eq!(s.stats(), (2, Some(1)));
    assert_eq!(read(&s, 3), Some((env(3), b"m3".to_vec())));
    // The MASTER holds 3 and 4: 1 was released while the link was down.
    let (missing, released) = s.sync(&[env(3).id, env(4).id]).unwrap();
    assert_eq!(missing, [env(4).id]);
    assert_eq!(released.len(), 1);
    s.release(released);
    assert_eq!(s.stats(), (1, Some(3)));
}

#[test]
fn an_update_replaces_the_envelope_and_keeps_the_octets() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let s = Store::open(&db, dir.path()).unwrap();
    let mut done = env(1);
    done.recipients[0].state = crate::queue::RecipientState::Delivered {
        server: "m1".into(),
        reply: "250".into(),
        at: 1,
    };
    let mut held = env(2);
    held.recipients[0].state = crate::queue::RecipientState::OnHold;
    // 1 stored before; 2 put and updated in one batch; 3 has no shadow.
    s.release(s.apply(&[put(1)]).unwrap());
    let released = s
        .apply(&[
            Op::Update(done.clone()),
            put(2),
            Op::Update(held.clone()),
            Op::Update(env(3)),
        ])
        .unwrap();
    assert!(released.is_empty(), "{released:?}");
    assert_eq!(s.stats().0, 2);
    assert_eq!(read(&s, 1), Some((done, b"m1".to_vec())));
    assert_eq!(read(&s, 2), Some((held, b"m2".to_vec())));
    assert_eq!(read(&s, 3), None);
}

#[test]
fn shadows_survive_a_restart_and_a_segment_goes_with_its_last_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let big = |n: u64| Op::Put {
        envelope: env(n),
        message: Arc::new(vec![
            n as u8;
            (crate::queue::segments::SEGMENT_MAX / 2) as usize
        ]),
    };
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        let s = Store::open(&db, dir.path()).unwrap();
        // 1 and 2 fill a segment, 3 starts the next; 1 is put again.
        s.apply(&[big(1), big(2), big(3)]).unwrap();
        s.release(s.apply(&[put(1)]).unwrap());
        s.segments.sync().unwrap();
        assert_eq!(s.segments.files(), 2);
        // The first segment goes with 2, its last shadow.
        s.release(s.apply(&[Op::Drop(env(2).id)]).unwrap());
        assert_eq!(s.segments.files(), 1);
        db.flush().unwrap();
    }
    // A record of the first format (octets inline) is still read.
    let db = sled::open(dir.path().join("db")).unwrap();
    let tree = db.open_tree("ha.shadow").unwrap();
    let mut v = vec![INLINE];
    v.extend(
        bincode::serde::encode_to_vec((env(4), b"m4".as_slice()), bincode::config::standard())
            .unwrap(),
    );
    tree.insert(env(4).id.to_bytes(), v).unwrap();
    let s = Store::open(&db, dir.path()).unwrap();
    assert_eq!(s.stats(), (3, Some(1)));
    assert_eq!(read(&s, 1), Some((env(1), b"m1".to_vec())));
    assert_eq!(
        read(&s, 3).map(|(_, m)| m.len()),
        Some((crate::queue::segments::SEGMENT_MAX / 2) as usize)
    );
    assert_eq!(read(&s, 4), Some((env(4), b"m4".to_vec())));
    s.release(s.clear().unwrap());
    assert_eq!((s.stats(), s.segments.files()), ((0, None), 0));
}
