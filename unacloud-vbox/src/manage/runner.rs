//! Running `VBoxManage`: the [`CommandRunner`] trait, the real runner over
//! `tokio::process`, and a [`ReplayRunner`] that answers with canned outputs and records
//! every command line (for tests, and for users without VirtualBox).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::manage::command::VBoxCommand;

/// What a finished command printed and returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandOutput {
    /// The exit code; `None` when the process was killed by a signal.
    pub exit_code: Option<i32>,
    /// Standard output (decoded as UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CommandOutput {
    /// A successful run that printed `stdout`.
    pub fn ok(stdout: impl Into<String>) -> Self {
        CommandOutput {
            exit_code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A run that exited with `code` and printed `stderr`.
    pub fn failed(code: i32, stderr: impl Into<String>) -> Self {
        CommandOutput {
            exit_code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    /// Whether the exit code is 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Runs one `VBoxManage` command with a time limit.
///
/// Implementations return `Ok` for every command that ran to completion, whatever its
/// exit code; [`Error::ToolMissing`] when the program cannot be started, and
/// [`Error::VBoxManageTimeout`] when the limit passed (the child is killed).
#[async_trait]
pub trait CommandRunner: Send + Sync + fmt::Debug {
    /// Runs `command`, bounded by `timeout`.
    async fn run(&self, command: &VBoxCommand, timeout: Duration) -> Result<CommandOutput>;
}

#[async_trait]
impl<R: CommandRunner + ?Sized> CommandRunner for std::sync::Arc<R> {
    async fn run(&self, command: &VBoxCommand, timeout: Duration) -> Result<CommandOutput> {
        (**self).run(command, timeout).await
    }
}

/// Runs the real `VBoxManage` through `tokio::process`.
///
/// The child gets `LC_ALL=C` (VirtualBox 7 translates human-readable output, which the
/// `list hdds` parser reads), its standard input is closed unless the command carries a
/// secret, and it is killed if the time limit passes or the future is dropped.
#[derive(Debug, Clone)]
pub struct TokioRunner {
    program: PathBuf,
}

impl TokioRunner {
    /// A runner for the program at `program` (a full path, or a name looked up on
    /// `PATH` by the operating system).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        TokioRunner {
            program: program.into(),
        }
    }

    /// A runner for the first `VBoxManage` found on `PATH` (see [`locate_vboxmanage`]).
    pub fn from_path() -> Result<Self> {
        locate_vboxmanage(std::env::var_os("PATH"))
            .map(TokioRunner::new)
            .ok_or_else(|| Error::ToolMissing {
                program: PathBuf::from("VBoxManage"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found on PATH"),
            })
    }

    /// The program this runner starts.
    pub fn program(&self) -> &Path {
        &self.program
    }
}

#[async_trait]
impl CommandRunner for TokioRunner {
    async fn run(&self, command: &VBoxCommand, timeout: Duration) -> Result<CommandOutput> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(command.args())
            .env("LC_ALL", "C")
            .stdin(if command.stdin().is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        tracing::debug!(command = %command.shell_line(), "running VBoxManage");
        let mut child = cmd.spawn().map_err(|source| Error::ToolMissing {
            program: self.program.clone(),
            source,
        })?;
        if let (Some(secret), Some(mut stdin)) = (command.stdin(), child.stdin.take()) {
            let mut bytes = secret.expose().as_bytes().to_vec();
            bytes.push(b'\n');
            // A child that exits without reading its input is not an error here; its exit
            // status tells what happened.
            let _ = stdin.write_all(&bytes).await;
            bytes.iter_mut().for_each(|b| *b = 0);
            drop(stdin);
        }
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => Ok(CommandOutput {
                exit_code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
            Ok(Err(e)) => Err(Error::io(&self.program, e)),
            Err(_) => Err(Error::VBoxManageTimeout {
                command: command.shell_line(),
                operation: command.operation(),
                after: timeout,
            }),
        }
    }
}

/// Finds `VBoxManage` in the directories of a `PATH`-style list: the first existing file
/// named `VBoxManage`, `vboxmanage` or (on Windows) `VBoxManage.exe`.
///
/// ```
/// use unacloud_vbox::manage::locate_vboxmanage;
/// assert_eq!(locate_vboxmanage(Some("".into())), None);
/// ```
pub fn locate_vboxmanage(path_var: Option<OsString>) -> Option<PathBuf> {
    let path_var = path_var?;
    let names: &[&str] = if cfg!(windows) {
        &["VBoxManage.exe"]
    } else {
        &["VBoxManage", "vboxmanage"]
    };
    std::env::split_paths(&path_var)
        .filter(|d| !d.as_os_str().is_empty())
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

/// One command a [`ReplayRunner`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCall {
    /// The arguments after the program name.
    pub args: Vec<String>,
    /// Length of the secret written to standard input, if any (never the secret).
    pub stdin_len: Option<usize>,
    /// The time limit the caller gave.
    pub timeout: Duration,
}

impl RecordedCall {
    /// The call as a pasteable shell line (`VBoxManage …`).
    pub fn shell_line(&self) -> String {
        let mut line = String::from("VBoxManage");
        for a in &self.args {
            line.push(' ');
            line.push_str(&crate::manage::command::shell_quote(a));
        }
        line
    }
}

/// A runner that answers each command with the next canned [`CommandOutput`] and
/// records the command lines, so tests can assert the exact sequence an operation runs.
///
/// When the script is exhausted every further command fails with
/// [`Error::UnexpectedOutput`] naming it.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use unacloud_vbox::manage::{command, CommandOutput, CommandRunner, ReplayRunner};
///
/// let runner = ReplayRunner::new().then(CommandOutput::ok(""));
/// runner.run(&command::start_vm("TM", Default::default()), Duration::from_secs(1)).await.unwrap();
/// assert_eq!(runner.lines(), vec!["VBoxManage startvm TM --type headless"]);
/// # });
/// ```
#[derive(Debug, Default)]
pub struct ReplayRunner {
    script: Mutex<VecDeque<CommandOutput>>,
    calls: Mutex<Vec<RecordedCall>>,
}

impl ReplayRunner {
    /// An empty script.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a canned output.
    pub fn then(self, output: CommandOutput) -> Self {
        self.push(output);
        self
    }

    /// Appends a successful output with `stdout`.
    pub fn then_ok(self, stdout: impl Into<String>) -> Self {
        self.then(CommandOutput::ok(stdout))
    }

    /// Appends a failed output (exit code 1) with `stderr`.
    pub fn then_err(self, stderr: impl Into<String>) -> Self {
        self.then(CommandOutput::failed(1, stderr))
    }

    /// Appends a canned output (by reference, for shared runners).
    pub fn push(&self, output: CommandOutput) {
        lock(&self.script).push_back(output);
    }

    /// Every command seen so far.
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.calls).clone()
    }

    /// Every command seen so far, as shell lines.
    pub fn lines(&self) -> Vec<String> {
        self.calls().iter().map(RecordedCall::shell_line).collect()
    }

    /// Canned outputs not yet used.
    pub fn remaining(&self) -> usize {
        lock(&self.script).len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in another test thread must not hide this runner's record.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl CommandRunner for ReplayRunner {
    async fn run(&self, command: &VBoxCommand, timeout: Duration) -> Result<CommandOutput> {
        lock(&self.calls).push(RecordedCall {
            args: command.args().to_vec(),
            stdin_len: command.stdin().map(|s| s.expose().len()),
            timeout,
        });
        lock(&self.script)
            .pop_front()
            .ok_or_else(|| Error::UnexpectedOutput {
                command: command.shell_line(),
                message: "the replay script has no output left for this command".to_owned(),
            })
    }
}
