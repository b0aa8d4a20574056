//! Where packet-colouring commands run: the local host or a network namespace.
//!
//! Colouring happens at the host that runs the VMs (on each VM's tap, see
//! [`super::Scope::Interface`]), never inside a guest, so no executor reaches into one.
//!
//! An executor turns a program and its arguments into the full argv that runs it at the
//! right place ([`CommandExecutor::argv`], pure and tested to the exact argument) and runs
//! it with a bounded wait ([`CommandExecutor::run`]).

use std::fmt;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::{Error, Result};

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
