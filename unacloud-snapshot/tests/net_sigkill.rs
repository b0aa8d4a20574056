//! A lab SIGKILLed in the middle of a run (root, namespaces of its own): the programs it
//! started die with it, its run directory and key were private, and the next run's
//! clean-up removes every namespace and file it left.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use unacloud_snapshot::netns::{self, DIE_WITH_PARENT_ENV};

fn privileged() -> bool {
    match netns::probe() {
        Ok(()) => true,
        Err(e) => {
            skip::skipped(e);
            false
        }
    }
}

/// Processes started by `parent` through a lab (they carry its pid in their environment).
fn children_of_lab(parent: u32) -> Vec<u32> {
    let needle = format!("{DIE_WITH_PARENT_ENV}={parent}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

fn namespaces_of(pid: u32) -> Vec<String> {
    netns::namespaces_of(pid).unwrap()
}

fn run_dirs_of(pid: u32) -> Vec<PathBuf> {
    netns::run_dirs_of(pid)
}

/// Whatever happens, nothing of the lab survives the test.
struct Cleanup(u32);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in std::iter::once(self.0).chain(children_of_lab(self.0)) {
            sigkill(p);
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = netns::cleanup_stale();
        netns::remove_stale_run_dirs();
    }
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Starts `unacloud-gs ring-netns` with `peers` peers (a run far longer than the test)
/// and waits (bounded) until it has started `programs` programs.
fn start_lab(peers: &str, programs: usize) -> (std::process::Child, Cleanup) {
    let lab = std::process::Command::new(env!("CARGO_BIN_EXE_unacloud-gs"))
        .args(["ring-netns", "--peers", peers, "--tokens", "100000000"])
        .args(["--snapshots", "1000", "--snapshot-delay-ms", "20"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let cleanup = Cleanup(lab.id());
    let started = Instant::now();
    while children_of_lab(lab.id()).len() < programs {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the lab did not start its programs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (lab, cleanup)
}

#[test]
fn a_sigkilled_lab_leaves_nothing_that_the_next_run_does_not_remove() {
    if !privileged() {
        return;
    }
    // Wait until its launchers run.
    let (mut lab, _cleanup) = start_lab("3", 6);
    let pid = lab.id();
    let dirs = run_dirs_of(pid);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dirs[0]), 0o700, "run directory");
    assert_eq!(mode(&dirs[0].join("cluster.key")), 0o600, "cluster key");
    assert!(namespaces_of(pid).len() >= 4);

    sigkill(pid);
    lab.wait().unwrap();
    // Everything it started dies with it.
    let killed = Instant::now();
    let mut left = children_of_lab(pid);
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
        left = children_of_lab(pid);
    }
    assert!(
        left.is_empty(),
        "processes outlived the killed lab: {left:?}"
    );
    // Its reaper removed its namespaces (with their rules) and its run directory.
    while (!namespaces_of(pid).is_empty() || !run_dirs_of(pid).is_empty())
        && killed.elapsed() < Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
    assert!(run_dirs_of(pid).is_empty(), "{:?}", run_dirs_of(pid));
}

/// Without its reaper (killed too, as by a SIGKILL of the whole process group), a lab's
/// leftovers are removed by the next run's clean-up.
#[test]
fn the_next_run_removes_what_a_lab_killed_with_its_reaper_left() {
    if !privileged() {
        return;
    }
    let (mut lab, _cleanup) = start_lab("2", 4);
    let pid = lab.id();
    // SIGKILL everything it started, its reaper first, then the lab itself.
    for p in children_of_lab(pid).into_iter().chain(std::iter::once(pid)) {
        sigkill(p);
    }
    lab.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !namespaces_of(pid).is_empty(),
        "nothing left: the test would prove nothing"
    );
    netns::cleanup_stale().unwrap();
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
    netns::remove_stale_run_dirs();
    assert!(run_dirs_of(pid).is_empty());
}
