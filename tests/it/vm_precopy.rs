//! VMs moved with a pre-copy of their disks between two qemu providers on this host, with
//! the real binary: the disks (qcow2 at the source, raw at the target) are copied while the
//! guest runs and keeps writing; at cutover the guest powers down, only what it wrote since
//! the last pass is copied, and it boots at the target with every block it wrote.

use crate::common;
use crate::vm_live::{
    final_hash, final_lines, killed_and_taken_over, relocate_polled, sha256, text, Lab,
};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::guest;
use fluidcloud::conduit::journal::{Journal, StepRecord};
use fluidcloud::providers;

/// The steps of the last relocation the journal under `dir` holds.
fn last_steps(dir: &Path) -> Vec<StepRecord> {
    let journal = Journal::open(&dir.join("state/journal.sqlite")).unwrap();
    journal.list().unwrap().pop().expect("a relocation").steps
}

fn output<'a>(steps: &'a [StepRecord], name: &str) -> &'a serde_json::Value {
    &steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
        .output
}

/// The FINAL line a guest printed: its disk's hash and the blocks its writer wrote.
fn final_line(line: &str) -> (String, usize) {
    let mut words = line.split_whitespace();
    let hash = words.next().unwrap().to_string();
    let n = words
        .next()
        .and_then(|w| w.strip_prefix("written="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no written count in {line:?}"));
    (hash, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopied_vm_powers_down_only_for_what_it_wrote_last_and_loses_no_write() {
    let _one = guest::ONE_VM.lock().await;
    let lab = Arc::new(Lab::new());
    let config = lab.write_config_moving("precopy", &[]);
    let q1 = providers::open(&config.providers["q1"]).unwrap();
    let disk = lab.source_disk(q1.as_ref()).await;
    lab.start_source(&config, q1.as_ref()).await;
    let console = q1.vm_console("box", "guest").await.unwrap().unwrap();
    drop(q1);
    let boot = lab.boot_at("q1").expect("the guest serves");

    // The source's console goes with its VM at the decommission: it is read before.
    let seen_line = Arc::new(std::sync::Mutex::new(String::new()));
    let (out, _) = relocate_polled(&lab, {
        let seen_line = seen_line.clone();
        move |_| {
            // Watched until it shows, or for long enough: a relocation that failed says why
            // in its output, checked first.
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(120) {
                if let Some(line) = final_lines(&console).first() {
                    *seen_line.lock().unwrap() = line.clone();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .await;
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("completed"), "{said}");

    // The whole disk travelled while the guest ran; the cutover read only its last writes.
    let steps = last_steps(lab.path("").as_path());
    let pre = output(&steps, "precopy:vm:guest");
    let fin = output(&steps, "final-pass:vm:guest");
    eprintln!("pre-copy: {pre}\nfinal pass: {fin}");
    let data = (disk.len() / 2) as u64;
    assert!(
        pre["bytes_read"].as_u64().unwrap() >= data,
        "the pre-copy read less than the disk's data: {pre}"
    );
    assert!(pre["passes"].as_array().unwrap().len() >= 2, "{pre}");
    let last = fin["bytes_read"].as_u64().unwrap();
    assert!(
        last < data / 4,
        "the final pass read {last} bytes of {data}: {fin}"
    );
    assert_eq!(fin["halted"], "powered_down", "{fin}");
    assert!(!said.contains("moves cold"), "{said}");

    // The source powered down cleanly with every block its writer wrote...
    let (source_hash, n1) = final_line(&seen_line.lock().unwrap());
    let at_power_down = guest::after_writer(&disk, n1);
    assert_eq!(source_hash, sha256(&at_power_down));
    // ...and the VM booted at the target from that disk.
    let target_boot = lab.serving_at("q2");
    assert_ne!(target_boot, boot, "the guest boots again at the target");
    let (hash, n2) = final_hash(&config, "q2").await;
    assert_eq!(hash, sha256(&guest::after_writer(&at_power_down, n2)));

    // The halted source emulator ended after the commit, its disk after the grace period.
    let q1 = providers::open(&config.providers["q1"]).unwrap();
    assert!(q1.vm_status("box", "guest").await.unwrap().is_none());
    assert!(!lab.path("providers/q1/volumes/box/guest.qcow2").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_killed_during_a_precopy_move_leaves_one_guest_running_with_every_write() {
    let _one = guest::ONE_VM.lock().await;
    let mut outcomes = Vec::new();
    for (point, expected) in [
        ("precopy:vm:guest:running", "completed"),
        ("final-pass:vm:guest:running", "rolled_back"),
        ("final-pass:vm:guest:done", "rolled_back"),
    ] {
        let lab = Arc::new(Lab::new());
        let config = lab.write_config_moving("precopy", &[]);
        let q1 = providers::open(&config.providers["q1"]).unwrap();
        let disk = lab.source_disk(q1.as_ref()).await;
        lab.start_source(&config, q1.as_ref()).await;
        let console = q1.vm_console("box", "guest").await.unwrap().unwrap();
        drop(q1);
        let boot = lab.boot_at("q1").expect("the guest serves");
        // The source's console goes with its VM at the decommission: it is watched from
        // before the relocation on.
        let ended = Arc::new(AtomicBool::new(false));
        let watched = std::thread::spawn({
            let (console, ended) = (console.clone(), ended.clone());
            move || loop {
                let done = ended.load(Ordering::Relaxed);
                if let Some(l) = final_lines(&console).first() {
                    return Some(l.clone());
                }
                if done {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let here = killed_and_taken_over(&lab, &config, point, expected).await;
        ended.store(true, Ordering::Relaxed);
        lab.serving_at(here);
        // When the guest powered down at the source (cleanly, with every write) and booted
        // again, at the target or at the source after the rollback, the disk it hashes now
        // holds what it had then plus what its writer wrote since; when it never stopped,
        // what it had at first plus every write.
        let before = match watched.join().unwrap() {
            Some(line) => {
                let (h, n) = final_line(&line);
                let at = guest::after_writer(&disk, n);
                assert_eq!(h, sha256(&at), "{point}: the source's disk at power-down");
                at
            }
            None => {
                assert_eq!(lab.boot_at(here), Some(boot.clone()), "{point}");
                disk.clone()
            }
        };
        let (hash, written) = final_hash(&config, here).await;
        assert_eq!(
            hash,
            sha256(&guest::after_writer(&before, written)),
            "{point}"
        );
        outcomes.push(format!("{point} -> {expected} at {here}"));
    }
    eprintln!("{outcomes:#?}");
}

/// Regression: a halt for the last pass presses the guest's power button, and the guest
/// then shuts down whatever happens to the call that pressed it. When that call was cut
/// short (its daemon killed) while the guest was still shutting down, the rollback saw it
/// running and only let it go on: it finished powering down, and QEMU, told to keep the
/// emulator, paused it. The source stayed down with the relocation rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_after_a_halt_cut_short_boots_the_source_guest_again() {
    let _one = guest::ONE_VM.lock().await;
    let lab = Arc::new(Lab::new());
    let config = lab.write_config_moving("precopy", &[]);
    let q1 = providers::open(&config.providers["q1"]).unwrap();
    lab.source_disk(q1.as_ref()).await;
    lab.start_source(&config, q1.as_ref()).await;
    let boot = lab.boot_at("q1").expect("the guest serves");
    q1.track_vm_disks("box", "guest", fluidcloud::providers::DiskPassKind::Full)
        .await
        .unwrap();
    // The button is pressed at once; the guest takes more than a second to power down
    // under TCG, and the halt is dropped well before that.
    let halt = q1.halt_vm("box", "guest", Duration::from_secs(60));
    assert!(
        tokio::time::timeout(Duration::from_millis(400), halt)
            .await
            .is_err(),
        "the guest powered down within 400 ms: the halt was not cut short"
    );
    q1.resume_vm("box", "guest").await.unwrap();
    let again = lab.serving_at("q1");
    assert_ne!(again, boot, "the guest was not booted again");
    // It keeps serving: nothing is left to power it down later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lab.boot_at("q1"), Some(again));
    let status = q1.vm_status("box", "guest").await.unwrap().unwrap();
    assert_eq!(status.state, fluidcloud::providers::VmState::Running);
    let stop = fluidcloud::providers::StopOptions {
        timeout: Duration::from_secs(20),
        kill_after_timeout: true,
    };
    q1.stop_vm("box", "guest", stop).await.unwrap();
}
