//! The `provision` example as an operator runs it, with the real `qemu-img`: its output
//! piped into a reader that goes away (`provision | head`), and a run killed with
//! SIGKILL half-way and then run again on the same `--out`.
//!
//! The example's code is compiled into this test. Each run is a child process (this
//! test binary again, told by an environment variable to run the example's `cli`), so
//! that a broken pipe and SIGKILL hit a real process.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../examples/provision.rs"]
mod provision;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use unacloud::cloud::hypervisor::Hypervisor;
use unacloud::cloud::qemu::QemuHypervisor;

const ARGS: &str = "PROVISION_CHILD_ARGS";
const BROKEN_STDOUT: &str = "PROVISION_CHILD_BROKEN_STDOUT";

/// In a child: runs `provision` with the JSON array of arguments in `ARGS` and exits
/// with its code. With `BROKEN_STDOUT` set, standard output is first replaced by a
/// pipe whose reading end is already closed, as after `| head` has exited.
fn child_main() -> ! {
    let args: Vec<String> = serde_json::from_str(&std::env::var(ARGS).unwrap()).unwrap();
    if std::env::var_os(BROKEN_STDOUT).is_some() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        nix::unistd::dup2_stdout(writer).unwrap();
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let code = runtime.block_on(provision::cli(args));
    std::process::exit(code)
}

fn spawn(test: &str, args: &[&str], broken_stdout: bool) -> Child {
    let mut argv = vec!["provision"];
    argv.extend_from_slice(args);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ARGS, serde_json::to_string(&argv).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if broken_stdout {
        cmd.env(BROKEN_STDOUT, "1");
    }
    cmd.spawn().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The VM settings files `registry.json` of a host root lists, read as plain JSON
/// (opening the backend would settle a running provision's operations).
fn registered(root: &Path) -> usize {
    std::fs::read(root.join("registry.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["vms"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn a_closed_pipe_ends_the_report_quietly() {
    if std::env::var_os(ARGS).is_some() {
        child_main();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let test = "a_closed_pipe_ends_the_report_quietly";
    let args = [
        "--template-size",
        "2MiB",
        "--vms",
        "2",
        "--hosts",
        "1",
        "--out",
        s(&out),
    ];
    let run = spawn(test, &args, true).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The work itself was done: the pipe only cut the report short.
    let root = out.join("hosts/host-0");
    assert_eq!(registered(&root), 2);

    // Control: the same command with a working stdout prints the report.
    let out2 = dir.path().join("out2");
    let mut args2 = args;
    args2[7] = s(&out2);
    let run = spawn(test, &args2, false).wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(0));
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(report.contains("created         2 of 2"), "{report}");
}

#[test]
fn a_run_killed_half_way_is_finished_by_the_next_run_on_the_same_out() {
    if std::env::var_os(ARGS).is_some() {
        child_main();
    }
    const VMS: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let test = "a_run_killed_half_way_is_finished_by_the_next_run_on_the_same_out";
    let vms = VMS.to_string();
    let args = [
        "--template-size",
        "2MiB",
        "--vms",
        &vms,
        "--hosts",
        "2",
        "--parallel-hosts",
        "1",
        "--out",
        s(&out),
        "--json",
    ];
    let roots: Vec<PathBuf> = (0..2)
        .map(|i| out.join(format!("hosts/host-{i}")))
        .collect();
    let count = || roots.iter().map(|r| registered(r)).sum::<usize>();

    // SIGKILL as soon as the first VMs are registered (bounded wait: 60 s).
    let mut child = spawn(test, &args, false);
    let mut waited = 0;
    while count() < 2 && waited < 6000 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "provision ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let at_kill = count();
    assert!(
        (2..VMS).contains(&at_kill),
        "the kill must land half-way: {at_kill} of {VMS} VMs registered"
    );

    // The same command again finishes the job.
    let run = spawn(test, &args, false).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "stderr: {stderr}");
    // The test harness of the child prints its own lines first; the report is the JSON.
    let stdout = String::from_utf8_lossy(&run.stdout);
    let json = stdout[stdout.find('{').unwrap_or(0)..]
        .lines()
        .next()
        .unwrap_or_default();
    let report: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report["vms_created"], VMS, "{report}");
    assert_eq!(report["vms_failed"], 0, "{report}");

    // Every VM of the plan exists exactly once, complete: one disk of its own on the
    // template, every file of it there, and no file under a host root that belongs to
    // no VM (apart from the registry, its lock and the shared template's entry).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut names = BTreeSet::new();
    for root in &roots {
        runtime.block_on(async {
            let hv = QemuHypervisor::open(root).await.unwrap();
            let mut owned = BTreeSet::new();
            for vm in hv.list_vms().await.unwrap() {
                assert!(names.insert(vm.name.clone()), "{} twice", vm.name);
                assert_eq!(vm.disks.len(), 1, "{}", vm.name);
                let files = hv.vm_files(&vm.name.as_str().into()).await.unwrap();
                assert!(
                    files.warnings.is_empty(),
                    "{}: {:?}",
                    vm.name,
                    files.warnings
                );
                for f in &files.files {
                    owned.insert(std::fs::canonicalize(&f.path).unwrap());
                }
            }
            for entry in walk(&root.join("vms")) {
                let entry = std::fs::canonicalize(entry).unwrap();
                assert!(owned.contains(&entry), "orphan file {}", entry.display());
            }
        });
    }
    let expected: BTreeSet<String> = (0..VMS).map(|i| format!("vm-{i:05}")).collect();
    assert_eq!(names, expected);
}

/// Every regular file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}
