//! What a failed `VBoxManage` command printed, and what it means.
//!
//! VBoxManage reports errors on standard error as
//!
//! ```text
//! VBoxManage: error: Could not find a registered machine named 'windows7'
//! VBoxManage: error: Details: code VBOX_E_OBJECT_NOT_FOUND (0x80bb0001), component VirtualBoxWrap, interface IVirtualBox, callee nsISupports
//! VBoxManage: error: Context: "FindMachine(…)" at line 2719 of file VBoxManageInfo.cpp
//! ```
//!
//! (`VBoxManage.exe: error:` on Windows; VirtualBox 4.0/4.1 printed `Context:` without the
//! prefix; some errors are a single line). [`parse_error_output`] reads that, and
//! [`Failure::classify`] decides the kind from the *code name* and hex value, which are
//! stable across versions, and from the two wordings of "not found" and of
//! "not running (currently …)".

use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::manage::command::VBoxCommand;
use crate::manage::runner::CommandOutput;

/// The parts of VBoxManage's error report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorReport {
    /// The message lines (`VBoxManage: error: <message>`), prefix removed, in order.
    pub messages: Vec<String>,
    /// The COM status name, e.g. `VBOX_E_OBJECT_NOT_FOUND`.
    pub code: Option<String>,
    /// The COM status value, e.g. `0x80bb0001`.
    pub hresult: Option<u32>,
    /// The component that failed (`VirtualBoxWrap`, `MediumWrap`, …).
    pub component: Option<String>,
    /// The interface (`IVirtualBox`, `IMedium`, …).
    pub interface: Option<String>,
    /// The `Context:` text (the API call and source location).
    pub context: Option<String>,
}

impl ErrorReport {
    /// The message lines joined by a space.
    pub fn message(&self) -> String {
        self.messages.join(" ")
    }
}

/// Splits `<program>: error: <rest>` where `<program>` names VBoxManage.
fn strip_prefix(line: &str) -> Option<&str> {
    let idx = line.find(": error: ")?;
    let program = &line[..idx];
    if program.contains(' ') || !program.to_ascii_lowercase().contains("vboxmanage") {
        return None;
    }
    Some(&line[idx + ": error: ".len()..])
}

/// Reads VBoxManage's error lines from its standard error. Lines that are not error
/// lines (progress, usage text) are ignored; the result is empty when there are none.
pub fn parse_error_output(stderr: &str) -> ErrorReport {
    let mut r = ErrorReport::default();
    for raw in stderr.lines() {
        let line = raw.trim_end_matches('\r');
        let rest = match strip_prefix(line) {
            Some(rest) => rest,
            None if line.starts_with("Context: ") => line,
            None => continue,
        };
        if let Some(details) = rest.strip_prefix("Details: code ") {
            parse_details(details, &mut r);
        } else if let Some(ctx) = rest.strip_prefix("Context: ") {
            r.context = Some(ctx.to_owned());
        } else {
            r.messages.push(rest.to_owned());
        }
    }
    r
}

/// `NAME (0xHEX), component C, interface I, callee X`
fn parse_details(details: &str, r: &mut ErrorReport) {
    let mut parts = details.split(", ");
    if let Some(first) = parts.next() {
        let mut it = first.splitn(2, ' ');
        let name = it.next().unwrap_or("").trim();
        if !name.is_empty() {
            r.code = Some(name.to_owned());
        }
        if let Some(hex) = it.next() {
            let hex = hex.trim().trim_start_matches('(').trim_end_matches(')');
            let digits = hex.trim_start_matches("0x").trim_start_matches("0X");
            r.hresult = u32::from_str_radix(digits, 16).ok();
        }
    }
    for p in parts {
        if let Some(c) = p.strip_prefix("component ") {
            r.component = Some(c.to_owned());
        } else if let Some(i) = p.strip_prefix("interface ") {
            r.interface = Some(i.to_owned());
        }
    }
}

/// Whether `stderr` holds no VBoxManage error line at all.
pub fn is_silent(stderr: &str) -> bool {
    let r = parse_error_output(stderr);
    r.messages.is_empty() && r.code.is_none()
}

/// What kind of failure a report describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// A VM, snapshot or disk does not exist.
    NotFound {
        /// `vm`, `snapshot` or `disk`.
        kind: &'static str,
        /// The name or uuid VirtualBox could not find.
        id: String,
    },
    /// The object to create exists already (`Machine settings file '…' already exists`).
    AlreadyExists {
        /// `vm`, `snapshot` or `disk`.
        kind: &'static str,
    },
    /// The object is in a state that forbids the operation.
    InvalidState {
        /// The state, as VirtualBox words it (`powered off`, or the whole message).
        state: String,
    },
    /// The object is used by others (a medium attached to VMs, a locked session).
    InUse,
    /// Credentials were refused or access was denied.
    AccessDenied,
    /// VirtualBox itself reported a timeout.
    Timeout,
    /// Anything else.
    Other,
}

/// A failed `VBoxManage` command: what it printed and how it was classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Short name of the operation (`showvminfo`, `snapshot take`, …).
    pub operation: &'static str,
    /// The VM or disk the command acted on.
    pub target: Option<String>,
    /// The exit code (`None`: killed by a signal).
    pub exit_code: Option<i32>,
    /// The parsed error lines.
    pub report: ErrorReport,
    /// The classification.
    pub kind: FailureKind,
    /// Standard error, verbatim.
    pub stderr: String,
    /// Standard output, verbatim (some warnings go there).
    pub stdout: String,
    /// The time limit the command ran under.
    pub limit: Duration,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = self.report.message();
        if msg.is_empty() {
            let text = first_nonempty_line(&self.stderr)
                .or_else(|| first_nonempty_line(&self.stdout))
                .unwrap_or("no message");
            write!(f, "exit code {}: {text}", exit_text(self.exit_code))?;
        } else {
            f.write_str(&msg)?;
        }
        if let Some(code) = &self.report.code {
            write!(f, " ({code})")?;
        }
        Ok(())
    }
}

fn exit_text(code: Option<i32>) -> String {
    code.map_or_else(|| "none (killed by a signal)".to_owned(), |c| c.to_string())
}

fn first_nonempty_line(s: &str) -> Option<&str> {
    s.lines().map(|l| l.trim()).find(|l| !l.is_empty())
}

/// Text between the first `open` and the next `close` after it.
fn between<'a>(s: &'a str, open: &str, close: char) -> Option<&'a str> {
    let start = s.find(open)? + open.len();
    let end = s[start..].find(close)?;
    Some(&s[start..start + end])
}

impl Failure {
    /// Builds and classifies the failure of `command` from its output.
    pub fn from_output(command: &VBoxCommand, output: &CommandOutput, limit: Duration) -> Self {
        let report = parse_error_output(&output.stderr);
        let kind = Self::classify(
            command.operation(),
            command.target(),
            &report,
            &output.stderr,
        );
        Failure {
            operation: command.operation(),
            target: command.target().map(str::to_owned),
            exit_code: output.exit_code,
            report,
            kind,
            stderr: output.stderr.clone(),
            stdout: output.stdout.clone(),
            limit,
        }
    }

    /// Decides the kind of a report (see the module documentation).
    pub fn classify(
        operation: &str,
        target: Option<&str>,
        report: &ErrorReport,
        stderr: &str,
    ) -> FailureKind {
        let msg = report.message();
        let code = report.code.as_deref().unwrap_or("");
        let hr = report.hresult.unwrap_or(0);
        // Without a VBoxManage error line, look at the whole of standard error.
        let lower = if msg.is_empty() {
            stderr.to_ascii_lowercase()
        } else {
            msg.to_ascii_lowercase()
        };

        if code == "VBOX_E_OBJECT_NOT_FOUND" || hr == 0x80bb_0001 {
            return not_found(operation, target, &msg);
        }
        if code == "VBOX_E_OBJECT_IN_USE" || hr == 0x80bb_000c {
            return FailureKind::InUse;
        }
        if code == "VBOX_E_PASSWORD_INCORRECT"
            || code == "E_ACCESSDENIED"
            || hr == 0x8007_0005
            || lower.contains("not able to logon")
            || lower.contains("access denied")
            || lower.contains("verr_access_denied")
            || lower.contains("permission denied")
        {
            return FailureKind::AccessDenied;
        }
        if lower.contains("already exists") {
            let kind = if operation.starts_with("snapshot") {
                "snapshot"
            } else if matches!(operation, "createvm" | "clonevm" | "registervm") {
                "vm"
            } else {
                "disk"
            };
            return FailureKind::AlreadyExists { kind };
        }
        if code == "VBOX_E_TIMEOUT" {
            return FailureKind::Timeout;
        }
        if let Some(state) = between(&msg, "(currently ", ')') {
            return FailureKind::InvalidState {
                state: state.to_owned(),
            };
        }
        if matches!(
            code,
            "VBOX_E_INVALID_VM_STATE"
                | "VBOX_E_INVALID_OBJECT_STATE"
                | "VBOX_E_INVALID_SESSION_STATE"
        ) || matches!(hr, 0x80bb_0002 | 0x80bb_0007 | 0x80bb_000b)
        {
            return FailureKind::InvalidState {
                state: if msg.is_empty() { code.to_owned() } else { msg },
            };
        }
        FailureKind::Other
    }

    /// The failure as the core error a [`Hypervisor`](unacloud_core::hypervisor::Hypervisor)
    /// caller receives; `command` is the shell line. A failure of no known kind becomes
    /// [`unacloud_core::Error::Generic`] whose source is this crate's
    /// [`Error::VBoxManage`], with the verbatim output.
    pub fn to_core(&self, command: &str) -> unacloud_core::Error {
        self.clone().into_core(command.to_owned())
    }

    /// [`Failure::to_core`] without a copy: a failure of no known kind is moved whole
    /// into the core error's source.
    pub fn into_core(self, command: String) -> unacloud_core::Error {
        let id = self.target.clone().unwrap_or_default();
        match &self.kind {
            FailureKind::NotFound { kind, id } => unacloud_core::Error::NotFound {
                kind,
                id: id.clone(),
            },
            FailureKind::AlreadyExists { kind } => unacloud_core::Error::AlreadyExists { kind, id },
            FailureKind::InvalidState { state } => unacloud_core::Error::InvalidState {
                operation: self.operation,
                id,
                state: state.clone(),
            },
            FailureKind::InUse => unacloud_core::Error::InUse {
                id,
                users: vec![format!(
                    "other VirtualBox objects ({})",
                    self.report.message()
                )],
            },
            FailureKind::AccessDenied => unacloud_core::Error::AccessDenied {
                message: format!("{command}: {}", self.report.message()),
            },
            FailureKind::Timeout => unacloud_core::Error::Timeout {
                operation: self.operation,
                after: self.limit,
            },
            // Nothing the core can name: the whole failure (command line, exit code,
            // parsed report, verbatim output) stays reachable as the error's source.
            FailureKind::Other => unacloud_core::Error::Generic {
                backend: "virtualbox",
                source: Box::new(crate::Error::VBoxManage {
                    command,
                    failure: Box::new(self),
                }),
            },
        }
    }
}

fn not_found(operation: &str, target: Option<&str>, msg: &str) -> FailureKind {
    // "Could not find a registered machine named 'x'" / "... with UUID {u}"
    let lower = msg.to_ascii_lowercase();
    let kind: &'static str = if lower.contains("machine") {
        "vm"
    } else if lower.contains("snapshot") {
        "snapshot"
    } else if lower.contains("medium") || lower.contains("disk") || lower.contains("image") {
        "disk"
    } else if operation.starts_with("snapshot") {
        "snapshot"
    } else if matches!(operation, "showmediuminfo" | "modifymedium" | "closemedium") {
        "disk"
    } else {
        "vm"
    };
    let id = if let Some(named) = between(msg, " named '", '\'') {
        named.to_owned()
    } else if let Some(pos) = msg.find("with UUID ") {
        msg[pos + "with UUID ".len()..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches(|c| c == '{' || c == '}' || c == '\'' || c == '"')
            .to_owned()
    } else {
        target.unwrap_or(msg).to_owned()
    };
    FailureKind::NotFound { kind, id }
}

/// Checks a command's output: `Ok` for exit code 0, otherwise
/// [`Error::VBoxManage`] with the classified [`Failure`].
pub fn check(
    command: &VBoxCommand,
    output: CommandOutput,
    limit: Duration,
) -> crate::Result<CommandOutput> {
    if output.success() {
        return Ok(output);
    }
    Err(Error::VBoxManage {
        command: command.shell_line(),
        failure: Box::new(Failure::from_output(command, &output, limit)),
    })
}
