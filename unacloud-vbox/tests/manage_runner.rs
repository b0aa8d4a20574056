//! The real runner over `tokio::process`, exercised with `/bin/sh` standing in for
//! VBoxManage (VirtualBox itself cannot run on the build machines).
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

use std::time::Duration;

use unacloud_vbox::manage::command::TimeClass;
use unacloud_vbox::manage::{locate_vboxmanage, CommandRunner, Secret, TokioRunner, VBoxCommand};
use unacloud_vbox::Error;

fn sh(script: &str) -> VBoxCommand {
    VBoxCommand::new("test", None, TimeClass::Query, ["-c", script])
}

#[tokio::test]
async fn captures_stdout_stderr_and_exit_code() {
    let r = TokioRunner::new("/bin/sh");
    let out = r
        .run(
            &sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(out.exit_code, Some(3));
}

#[tokio::test]
async fn runs_with_c_locale() {
    let r = TokioRunner::new("/bin/sh");
    let out = r
        .run(&sh("echo $LC_ALL"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(out.stdout, "C\n");
}

#[tokio::test]
async fn secret_goes_to_stdin_and_stdin_is_closed_otherwise() {
    let r = TokioRunner::new("/bin/sh");
    let cmd = sh("read p; echo \"got:$p\"").with_stdin(Secret::new("pa ss"));
    let out = r.run(&cmd, Duration::from_secs(30)).await.unwrap();
    assert_eq!(out.stdout, "got:pa ss\n");
    // Without a secret, reading stdin sees end of file at once.
    let out = r
        .run(
            &sh("if read p; then echo data; else echo eof; fi"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, "eof\n");
}

#[tokio::test]
async fn timeout_kills_the_child_and_is_typed() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("finished");
    let r = TokioRunner::new("/bin/sh");
    let script = format!("sleep 3; touch '{}'", marker.display());
    let e = r
        .run(&sh(&script), Duration::from_millis(200))
        .await
        .unwrap_err();
    match e {
        Error::VBoxManageTimeout {
            operation, after, ..
        } => {
            assert_eq!(operation, "test");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("{other:?}"),
    }
    // The child was killed, so it never gets to create the marker.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!marker.exists());
}

#[tokio::test]
async fn missing_program_is_tool_missing() {
    let r = TokioRunner::new("/nonexistent/VBoxManage");
    let e = r
        .run(&sh("true"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ToolMissing { .. }), "{e:?}");
    let core: unacloud_core::Error = e.into();
    assert!(core.to_string().contains("VBoxManage"), "{core}");
}

#[test]
fn locate_finds_vboxmanage_on_a_path_list() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        locate_vboxmanage(Some(dir.path().as_os_str().to_owned())),
        None
    );
    let exe = dir.path().join("VBoxManage");
    std::fs::write(&exe, "#!/bin/sh\n").unwrap();
    let path = std::env::join_paths(["/nonexistent-dir", dir.path().to_str().unwrap()]).unwrap();
    assert_eq!(locate_vboxmanage(Some(path)), Some(exe));
    assert_eq!(locate_vboxmanage(None), None);
}
