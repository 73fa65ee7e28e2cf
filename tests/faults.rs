//! Faults under load (issue 7), CI-sized; `bench/faults.sh` runs them bigger with
//! `CLUSTERMAIL_SCALE`: the home server stops and comes back while mail streams in
//! (nothing lost, duplicates counted), and idle and slowloris clients do not keep
//! a normal client from service.

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn router(s: Scratch, extra_smtp: &str) -> Router {
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{extra_smtp}\n[routing]\n\
         probe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nrise = 1\nretry_initial = \"300ms\"\n\
         retry_max = \"600ms\"\ndelivery_timeout = \"2s\"\n"
    );
    Router::start_config(s, &config, port)
}

/// Message numbers found in what a sink received, with their counts.
fn numbers(sinks: &[&RecordingSink]) -> HashMap<usize, usize> {
    let mut counts = HashMap::new();
    for s in sinks {
        for m in s.messages() {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            if let Some(n) = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: n"))
                .and_then(|n| n.trim().parse::<usize>().ok())
            {
                *counts.entry(n).or_insert(0) += 1;
            }
        }
    }
    counts
}

#[test]
fn the_home_stopping_and_returning_under_load_loses_nothing() {
    let scale = common::scale();
    let total = 300 * scale;
    let mut home = RecordingSink::start("m1");
    let replica = RecordingSink::start("m2");
    let s = Scratch::new();
    let f = s.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\nreplicas = [\"m2\"]\n",
            home.port, replica.port
        ),
    );
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let r = router(s, "");
    // Four senders share the numbers; each message that gets a 250 is recorded.
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (next, acked, port) = (next.clone(), acked.clone(), r.port);
            std::thread::spawn(move || {
                let mut c = Client::hello(port);
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= total {
                        return;
                    }
                    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
                    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
                    c.cmd("DATA");
                    c.send_raw(format!("Subject: n{n}\r\n\r\nbody {n}\r\n.\r\n").as_bytes());
                    if c.reply().code == 250 {
                        acked.lock().unwrap().push(n);
                    }
                }
            })
        })
        .collect();
    // The home goes away a third of the way in and comes back at two thirds.
    let wait_acked = |k: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < k {
            assert!(Instant::now() < deadline, "senders stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_acked(total / 3);
    home.down();
    wait_acked(2 * total / 3);
    home.up();
    for t in senders {
        t.join().expect("sender");
    }
    let acked = acked.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let counts = numbers(&[&home, &replica]);
        if acked.iter().all(|n| counts.contains_key(n)) || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let missing: Vec<_> = acked.iter().filter(|n| !counts.contains_key(n)).collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let at_home = numbers(&[&home]).len();
    let at_replica = numbers(&[&replica]).len();
    eprintln!(
        "failover under load: {} acknowledged, {at_home} at home, {at_replica} at the replica, \
         {duplicates} duplicate deliveries, {} missing",
        acked.len(),
        missing.len()
    );
    assert_eq!(acked.len(), total, "every message was accepted");
    assert!(missing.is_empty(), "lost: {missing:?}\n{}", r.log());
    assert!(
        at_replica > 0,
        "the replica took mail while the home was away"
    );
    assert!(at_home > 0);
}

#[test]
fn idle_and_slowloris_clients_do_not_keep_a_normal_client_from_service() {
    let scale = common::scale();
    let (idle, slow) = (100 * scale, 5 * scale);
    let home = RecordingSink::start("m1");
    let s = Scratch::new();
    let f = s.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n",
            home.port
        ),
    );
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    // Room for them all: the limits are not what is tested here.
    let r = router(s, "max_connections = 5000\nmax_connections_per_ip = 5000");
    let mut held = Vec::new();
    for _ in 0..idle {
        let mut c = TcpStream::connect(("127.0.0.1", r.port)).expect("idle connect");
        let mut greeting = [0u8; 3];
        c.read_exact(&mut greeting).expect("greeted");
        assert_eq!(&greeting, b"220");
        held.push(c); // says nothing more
    }
    // Slowloris: a transaction whose data trickles in a byte at a time.
    let mut loris = Vec::new();
    for i in 0..slow {
        let mut c = Client::hello(r.port);
        c.cmd("MAIL FROM:<slow@x.test>");
        c.cmd("RCPT TO:<u@c.test>");
        assert_eq!(c.cmd("DATA").code, 354);
        c.send_raw(format!("Subject: slow {i}\r\n").as_bytes());
        loris.push(c);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        let mut socks: Vec<TcpStream> = loris
            .iter()
            .map(|c| c.stream.try_clone().expect("clone"))
            .collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for s in &mut socks {
                    let _ = s.write_all(b"x");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // A normal client, meanwhile, gets its mail accepted and delivered.
    let started = Instant::now();
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<normal@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(b"Subject: n0\r\n\r\nnormal\r\n.\r\n");
    expect(&c.reply(), 250, "2.0.0");
    let accepted = started.elapsed();
    let delivered = home.wait_for(1, 10);
    eprintln!(
        "{idle} idle and {slow} slowloris connections: a normal transaction took {} ms, \
         delivered after {} ms",
        accepted.as_millis(),
        started.elapsed().as_millis()
    );
    assert_eq!(delivered.len(), 1);
    stop.store(true, Ordering::SeqCst);
    trickle.join().expect("trickle");
    drop(held);
}
