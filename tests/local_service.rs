//! Local service monitoring: too little free space on the data disk. (The
//! threshold is set above any disk's free space instead of filling a disk.)
//! A unit alone answers new mail with 452 4.3.1; a unit of a pair that cannot
//! serve does not stay or become MASTER, the peer takes over, and `ha status`
//! says why.

mod common;
mod ha_common;
use common::{expect, Client, Router, Scratch};
use ha_common::*;

#[test]
fn a_unit_alone_answers_452_to_new_mail_below_min_free_disk() {
    let r = Router::start("min_free_disk = \"1000000GiB\"");
    r.wait_log("disk nearly full");
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<s@outside.test>"), 452, "4.3.1");
    // The session goes on (a later MAIL may be taken once space is back).
    expect(&c.cmd("NOOP"), 250, "2.0.0");
    c.cmd("QUIT");

    let fine = Router::start("min_free_disk = \"1KiB\"");
    let mut c = Client::hello(fine.port);
    expect(&c.cmd("MAIL FROM:<s@outside.test>"), 250, "2.1.0");
}

#[test]
fn a_unit_without_free_disk_leaves_master_to_its_peer_and_says_why() {
    let p = ports();
    let home = common::RecordingSink::start("m1");
    let a = Scratch::new();
    catalog(&a, home.port);
    let ca = format!(
        "{}min_free_disk = \"1000000GiB\"\n",
        config(&p, 0, "slave", "pair-secret")
    );
    let cb = config(&p, 1, "slave", "pair-secret");
    let a = Router::start_config(a, &ca, p.smtp[0]);
    let b = Router::start_config(Scratch::new(), &cb, p.smtp[1]);
    // The primary cannot serve: the secondary takes MASTER.
    wait_mode(&b, "MASTER", 30);
    assert_ne!(mode(&a), "MASTER");
    let st = status(&a);
    assert!(
        st.contains("local checks:  FAILING") && st.contains("below ha.min_free_disk"),
        "{st}"
    );
    assert!(status(&b).contains("local checks:  ok"), "{}", status(&b));
    assert_eq!(greeting(p.smtp[1]), 220);
}
