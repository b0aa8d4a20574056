//! Where packet-colouring commands run: the local host, a network namespace, or a
//! VirtualBox guest.
//!
//! An executor turns a program and its arguments into the full argv that runs it at the
//! right place ([`CommandExecutor::argv`], pure and tested to the exact argument) and runs
//! it with a bounded wait ([`CommandExecutor::run`]).

use std::fmt;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Default bound on one command's run time.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What a finished command printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CommandOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs commands at one place (host, namespace, guest).
///
/// Object safe, `Send + Sync`: backends hold an `Arc<dyn CommandExecutor>` or a concrete
/// executor.
pub trait CommandExecutor: Send + Sync + fmt::Debug {
    /// The full argv (program first) that runs `program args…` at this executor's place.
    fn argv(&self, program: &str, args: &[String]) -> Vec<String>;

    /// A short human description of the place (`host`, `netns ring-3`, `VM web-1`).
    fn place(&self) -> String;

    /// Runs `program args…` and waits at most `timeout`. A non-zero exit is not an error
    /// here (callers decide, some commands probe); failing to start or timing out is.
    fn run(&self, program: &str, args: &[String], timeout: Duration) -> Result<CommandOutput> {
        run_argv(&self.argv(program, args), timeout)
    }
}

/// Runs an argv with a bounded wait; the child is killed when the bound passes.
pub fn run_argv(argv: &[String], timeout: Duration) -> Result<CommandOutput> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Error::InvalidConfig {
            reason: "empty command line".to_string(),
        });
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::CommandSpawn {
            program: program.clone(),
            source,
        })?;
    // Read both pipes on helper threads so a chatty command cannot block on a full pipe.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut s);
        }
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let mut sleep = Duration::from_micros(200);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::CommandTimeout {
                    command: argv.join(" "),
                    timeout,
                });
            }
            Ok(None) => {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::CommandSpawn {
                    program: program.clone(),
                    source,
                })
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out_thread.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_thread.join().unwrap_or_default()).into_owned();
    Ok(CommandOutput {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Turns a finished command into an error unless it succeeded.
pub(crate) fn check(argv: &[String], out: CommandOutput) -> Result<CommandOutput> {
    if out.success() {
        Ok(out)
    } else {
        Err(Error::CommandFailed {
            command: argv.join(" "),
            code: out.code,
            stderr: out.stderr.trim().to_string(),
        })
    }
}

/// Runs commands directly on this host.
#[derive(Debug, Clone, Default)]
pub struct LocalHost;

impl CommandExecutor for LocalHost {
    fn argv(&self, program: &str, args: &[String]) -> Vec<String> {
        std::iter::once(program.to_string())
            .chain(args.iter().cloned())
            .collect()
    }

    fn place(&self) -> String {
        "host".to_string()
    }
}

/// Runs commands inside a named network namespace with `ip netns exec <name> …`.
#[derive(Debug, Clone)]
pub struct NetnsExec {
    name: String,
}

impl NetnsExec {
    /// An executor for the namespace `name` (as listed by `ip netns list`).
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl CommandExecutor for NetnsExec {
    fn argv(&self, program: &str, args: &[String]) -> Vec<String> {
        ["ip", "netns", "exec", self.name.as_str(), program]
            .into_iter()
            .map(str::to_string)
            .chain(args.iter().cloned())
            .collect()
    }

    fn place(&self) -> String {
        format!("netns {}", self.name)
    }
}

/// Runs commands inside a VirtualBox guest through the guest additions:
/// `VBoxManage guestcontrol <vm> run --username <u> [--passwordfile <f>] --exe <path>
/// --timeout <ms> --wait-stdout --wait-stderr -- <arg0> <args…>`.
///
/// Programs are given by name (`iptables`) and resolved to an absolute guest path with
/// [`VBoxGuestExec::guest_bin_dir`] (default `/usr/sbin`), because `--exe` needs one.
/// This machine cannot run VirtualBox; the argv is covered by exact tests.
#[derive(Debug, Clone)]
pub struct VBoxGuestExec {
    vboxmanage: String,
    vm: String,
    username: String,
    password_file: Option<String>,
    guest_bin_dir: String,
    timeout_ms: u64,
}

impl VBoxGuestExec {
    /// An executor for the VM `vm` (name or UUID) logging in as `username`.
    pub fn new(vm: impl Into<String>, username: impl Into<String>) -> Self {
        Self {
            vboxmanage: "VBoxManage".to_string(),
            vm: vm.into(),
            username: username.into(),
            password_file: None,
            guest_bin_dir: "/usr/sbin".to_string(),
            timeout_ms: 10_000,
        }
    }

    /// Reads the guest user's password from this host file (`--passwordfile`).
    pub fn password_file(mut self, path: impl Into<String>) -> Self {
        self.password_file = Some(path.into());
        self
    }

    /// The guest directory holding `iptables`/`nft` (default `/usr/sbin`).
    pub fn guest_bin_dir(mut self, dir: impl Into<String>) -> Self {
        self.guest_bin_dir = dir.into();
        self
    }

    /// The `VBoxManage` program to call (default `VBoxManage` from `PATH`).
    pub fn vboxmanage(mut self, program: impl Into<String>) -> Self {
        self.vboxmanage = program.into();
        self
    }

    /// The guest-side time limit passed as `--timeout` (milliseconds, default 10 000).
    pub fn guest_timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = ms;
        self
    }
}

impl CommandExecutor for VBoxGuestExec {
    fn argv(&self, program: &str, args: &[String]) -> Vec<String> {
        let exe = if program.starts_with('/') {
            program.to_string()
        } else {
            format!("{}/{}", self.guest_bin_dir.trim_end_matches('/'), program)
        };
        let mut v = vec![
            self.vboxmanage.clone(),
            "guestcontrol".to_string(),
            self.vm.clone(),
            "run".to_string(),
            "--username".to_string(),
            self.username.clone(),
        ];
        if let Some(f) = &self.password_file {
            v.push("--passwordfile".to_string());
            v.push(f.clone());
        }
        v.extend([
            "--exe".to_string(),
            exe.clone(),
            "--timeout".to_string(),
            self.timeout_ms.to_string(),
            "--wait-stdout".to_string(),
            "--wait-stderr".to_string(),
            "--".to_string(),
            exe,
        ]);
        v.extend(args.iter().cloned());
        v
    }

    fn place(&self) -> String {
        format!("VM {}", self.vm)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn local_argv_is_the_command() {
        assert_eq!(
            LocalHost.argv("iptables", &s(&["-t", "mangle", "-S"])),
            s(&["iptables", "-t", "mangle", "-S"])
        );
    }

    #[test]
    fn netns_argv_prefixes_ip_netns_exec() {
        assert_eq!(
            NetnsExec::new("uc-1-p0").argv("nft", &s(&["list", "ruleset"])),
            s(&["ip", "netns", "exec", "uc-1-p0", "nft", "list", "ruleset"])
        );
    }

    #[test]
    fn vbox_guest_argv_is_exact() {
        let e = VBoxGuestExec::new("web-1", "unacloud").password_file("/etc/unacloud/guest.pw");
        assert_eq!(
            e.argv(
                "iptables",
                &s(&[
                    "-t",
                    "mangle",
                    "-A",
                    "UNACLOUD-OUT",
                    "-j",
                    "DSCP",
                    "--set-dscp",
                    "0x10"
                ])
            ),
            s(&[
                "VBoxManage",
                "guestcontrol",
                "web-1",
                "run",
                "--username",
                "unacloud",
                "--passwordfile",
                "/etc/unacloud/guest.pw",
                "--exe",
                "/usr/sbin/iptables",
                "--timeout",
                "10000",
                "--wait-stdout",
                "--wait-stderr",
                "--",
                "/usr/sbin/iptables",
                "-t",
                "mangle",
                "-A",
                "UNACLOUD-OUT",
                "-j",
                "DSCP",
                "--set-dscp",
                "0x10",
            ])
        );
    }

    #[test]
    fn vbox_guest_keeps_absolute_programs_and_omits_missing_password() {
        let e = VBoxGuestExec::new("{1b2c}", "root")
            .vboxmanage("/opt/vbox/VBoxManage")
            .guest_timeout_ms(500);
        assert_eq!(
            e.argv("/sbin/nft", &s(&["list", "ruleset"])),
            s(&[
                "/opt/vbox/VBoxManage",
                "guestcontrol",
                "{1b2c}",
                "run",
                "--username",
                "root",
                "--exe",
                "/sbin/nft",
                "--timeout",
                "500",
                "--wait-stdout",
                "--wait-stderr",
                "--",
                "/sbin/nft",
                "list",
                "ruleset",
            ])
        );
    }

    #[test]
    fn run_reports_exit_code_and_output() {
        let out = run_argv(
            &s(&["sh", "-c", "echo hi; echo err >&2; exit 3"]),
            DEFAULT_COMMAND_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.stderr, "err\n");
        assert!(check(&s(&["x"]), out).is_err());
    }

    #[test]
    fn run_times_out_and_kills() {
        let err = run_argv(&s(&["sleep", "5"]), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, Error::CommandTimeout { .. }), "{err}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run_argv(&s(&["unacloud-no-such-program"]), DEFAULT_COMMAND_TIMEOUT).unwrap_err();
        assert!(matches!(err, Error::CommandSpawn { .. }), "{err}");
    }
}
