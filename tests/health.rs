//! The availability probe against real servers on loopback: Postfix's smtp-sink,
//! a closed port, a server greeting 421, and one that never greets.

mod common;
use clustermail::health::probe::probe;
use clustermail::health::{Probe, Tracker};
use clustermail::route::Availability;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn probes_classify_real_servers() {
    let sink = common::SmtpSink::start();
    let timeout = Duration::from_millis(500);
    let up = probe(&format!("127.0.0.1:{}", sink.port), timeout).await;
    assert!(matches!(up, Probe::Banner { code: 220, .. }), "{up:?}");

    let closed = probe(&format!("127.0.0.1:{}", common::free_port()), timeout).await;
    assert!(
        matches!(&closed, Probe::Failed(why) if why.contains("connect")),
        "{closed:?}"
    );

    let busy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let busy_addr = busy.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = busy.accept().await {
            let _ = s
                .write_all(b"421-busy.test too busy\r\n421 try later\r\n")
                .await;
        }
    });
    let p = probe(&busy_addr.to_string(), timeout).await;
    assert!(matches!(p, Probe::Banner { code: 421, .. }), "{p:?}");

    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let p = probe(&silent_addr.to_string(), Duration::from_millis(300)).await;
    assert!(
        matches!(&p, Probe::Failed(why) if why.contains("no greeting within 300 ms")),
        "{p:?}"
    );

    // Fed to the tracker: the sink up, the others down or busy.
    let mut t = Tracker::new(2, Duration::from_millis(400));
    let now = SystemTime::now();
    t.probed("sink", up, now);
    t.probed("closed", closed, now);
    t.probed(
        "busy",
        Probe::Banner {
            code: 421,
            rtt: Duration::from_millis(1),
        },
        now,
    );
    assert_eq!(
        (
            t.availability("sink", None),
            t.availability("closed", None),
            t.availability("busy", None)
        ),
        (Availability::Up, Availability::Down, Availability::Busy)
    );
}
