//! HA hooks: `ha.on_change` runs on every effective-mode change with the new
//! mode, the old mode and the epoch (as arguments and `CLUSTERMAIL_HA_*`
//! variables), bounded by `ha.on_change_timeout`, its exit status logged.

mod common;
mod ha_common;
use common::{Router, Scratch};
use ha_common::*;
use std::os::unix::fs::PermissionsExt;

/// A primary whose peer never answers (it becomes MASTER alone), with a hook.
fn unit_with_hook(hook: &str, timeout: &str) -> Router {
    let p = ports();
    let s = Scratch::new();
    let script = s.write("hook.sh", hook);
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = format!(
        "{}on_change = {:?}\non_change_timeout = \"{timeout}\"\n",
        config(&p, 0, "slave", "pair-secret"),
        script.display().to_string()
    );
    Router::start_config(s, &config, p.smtp[0])
}

#[test]
fn on_change_runs_with_the_new_mode_the_old_mode_and_the_epoch() {
    let hook = "#!/bin/sh\n\
        echo \"$1 $2 $3 env=$CLUSTERMAIL_HA_MODE/$CLUSTERMAIL_HA_OLD_MODE/$CLUSTERMAIL_HA_EPOCH\" >> \"$(dirname \"$0\")/changes\"\n\
        [ \"$1\" = SLAVE ] && exit 3\nexit 0\n";
    let r = unit_with_hook(hook, "10s");
    wait_mode(&r, "MASTER", 20);
    let changes = r.scratch.path().join("changes");
    let read = || std::fs::read_to_string(&changes).unwrap_or_default();
    wait_until(20, "hook ran for MASTER", || {
        read().contains("MASTER STARTING")
    });
    let first = read();
    let line = first
        .lines()
        .find(|l| l.starts_with("MASTER STARTING"))
        .unwrap_or("");
    let epoch = line.split_whitespace().nth(2).unwrap_or("");
    assert!(epoch.parse::<u64>().is_ok(), "{first}");
    assert!(
        line.ends_with(&format!("env=MASTER/STARTING/{epoch}")),
        "{first}"
    );
    r.wait_log("HA on_change hook finished");
    // A change by hand runs it too; its exit status is logged.
    r.scratch.ok(&["ha", "set-mode", "slave"]);
    wait_until(20, "hook ran for SLAVE", || read().contains("SLAVE MASTER"));
    r.wait_log("status=3");
}

#[test]
fn a_hook_that_hangs_is_killed_after_its_timeout() {
    let r = unit_with_hook("#!/bin/sh\nexec sleep 60\n", "500ms");
    wait_mode(&r, "MASTER", 20);
    r.wait_log("HA on_change hook timed out");
    // The unit goes on serving meanwhile.
    assert_eq!(greeting(r.port), 220);
}
