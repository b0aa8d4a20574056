//! Running `qemu-system-x86_64`: the command line, the accelerator probe, launching a
//! daemonized VM process, and finding it again after the backend restarts.
//!
//! Each running VM is one headless QEMU process, daemonized (`-daemonize`) so that it
//! outlives the program that started it, as a VM outlives VirtualBox's front end. Its
//! QMP socket, pid file and console log live in the VM's folder; `run.json` there
//! records them, so a backend that opens the root again finds the VM, and a process that
//! is gone without being powered off is reported as `Aborted`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

use super::img::{output_within, Ran, BACKEND};
use super::settings::{NetConfig, VmSettings};

/// The Debian package that provides `qemu-system-x86_64`.
pub const SYSTEM_PACKAGE: &str = "qemu-system-x86";

/// Which accelerator runs the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe boot under KVM reaches the guest's first line within its
    /// deadline, else TCG. The probe runs once per backend root and is remembered in
    /// `accel.json`.
    #[default]
    Auto,
    /// Hardware virtualisation; fails where `/dev/kvm` is missing or unusable.
    Kvm,
    /// QEMU's software emulation (works everywhere, slower).
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Accel> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(Error::InvalidInput(format!(
                "accelerator {s:?}: expected auto, kvm or tcg"
            ))),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// How to run `qemu-system-x86_64`.
#[derive(Debug, Clone)]
pub struct QemuSystem {
    pub(crate) program: PathBuf,
    pub(crate) accel: Accel,
    pub(crate) launch_timeout: Duration,
    pub(crate) qmp_timeout: Duration,
    pub(crate) probe_deadline: Duration,
}

impl Default for QemuSystem {
    fn default() -> Self {
        QemuSystem::new()
    }
}

impl QemuSystem {
    /// `qemu-system-x86_64` from `PATH`, accelerator [`Accel::Auto`].
    pub fn new() -> Self {
        QemuSystem {
            program: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            launch_timeout: Duration::from_secs(30),
            qmp_timeout: Duration::from_secs(30),
            probe_deadline: Duration::from_secs(10),
        }
    }

    /// Uses another program (a full path or a wrapper).
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Chooses the accelerator.
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// How long a KVM probe boot may take to reach the guest before KVM is judged
    /// unusable (default 10 s).
    pub fn with_probe_deadline(mut self, deadline: Duration) -> Self {
        self.probe_deadline = deadline;
        self
    }

    /// The configured accelerator.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The program that is run.
    pub fn program(&self) -> &Path {
        &self.program
    }

    pub(crate) fn missing(&self, operation: &'static str) -> Error {
        Error::Unsupported {
            backend: BACKEND.to_owned(),
            operation,
            reason: format!(
                "{} was not found; install the Debian package {SYSTEM_PACKAGE} \
                 (apt-get install {SYSTEM_PACKAGE})",
                self.program.display()
            ),
        }
    }
}

/// What `run.json` in a VM's folder records about its running process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    pub pid: i32,
    pub qmp: PathBuf,
    pub console_log: PathBuf,
    /// Length of the console log when this process started: its own output follows.
    pub console_offset: u64,
    pub accel: String,
}

pub(crate) const RUN_FILE: &str = "run.json";

impl RunRecord {
    pub(crate) fn load(folder: &Path) -> Option<RunRecord> {
        let text = std::fs::read_to_string(folder.join(RUN_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub(crate) fn save(&self, folder: &Path) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::fsutil::write_atomic_with(&folder.join(RUN_FILE), &bytes, true)
    }

    pub(crate) fn remove(folder: &Path) {
        let _ = std::fs::remove_file(folder.join(RUN_FILE));
    }
}

/// Whether `pid` is a live QEMU process of the VM with `uuid` (its command line names
/// the uuid), so a reused pid is never mistaken for the VM.
pub(crate) fn is_vm_process(pid: i32, uuid: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has released its memory and files: it is gone.
    if is_zombie(pid) {
        return false;
    }
    cmdline.split(|&b| b == 0).any(|arg| arg == uuid.as_bytes())
}

/// Live processes whose program name ends with `program` (`qemu-img`,
/// `qemu-system-x86_64`) and one of whose arguments names a path under `folder` (QEMU
/// takes paths as `file=/…`, so an argument that merely contains the folder's path
/// counts). Zombies are not counted: they hold nothing any more.
pub(crate) fn processes_under(program: &[u8], folder: &Path) -> Vec<i32> {
    // `/srv/vms/` so that `/srv/vms2/…` does not count.
    let mut needle = folder.as_os_str().as_encoded_bytes().to_vec();
    while needle.last() == Some(&b'/') {
        needle.pop();
    }
    if needle.is_empty() {
        return Vec::new();
    }
    needle.push(b'/');
    let needle = needle.as_slice();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmd.split(|&b| b == 0);
            let named = args.next().is_some_and(|a| a.ends_with(program));
            named && args.any(|a| a.windows(needle.len()).any(|w| w == needle)) && !is_zombie(*pid)
        })
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// Waits (at most `within`) until no `qemu-img` process works on a file under
/// `folder`: one started by a caller that was killed may still be finishing, and
/// cleaning up under it would race with the file it is about to write.
pub(crate) async fn wait_for_qemu_img(folder: &Path, within: Duration) {
    let until = Instant::now() + within;
    while !processes_under(b"qemu-img", folder).is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends SIGKILL to `pid` and waits (bounded) until it is gone.
pub(crate) fn kill_and_wait(pid: i32, uuid: &str, within: Duration) -> bool {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let until = Instant::now() + within;
    while Instant::now() < until {
        if !is_vm_process(pid, uuid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    !is_vm_process(pid, uuid)
}

/// The live `qemu-system-x86_64` processes one of whose arguments names a path under
/// `root`: what still runs of the VMs of a backend rooted there (clean-up checks after
/// a lab or a test). Zombies are not counted.
pub fn vm_processes_under(root: &Path) -> Vec<i32> {
    processes_under(b"qemu-system-x86_64", root)
}

/// SIGKILLs every VM process under `root` — a pulled plug for every VM of a host.
/// Synchronous, for clean-up guards; returns how many processes were killed.
///
/// The VMs are found two ways: by their run records (`<root>/**/run.json`, up to
/// three levels of folders deep as the backend lays them out), and by their command
/// line, for a VM whose starter was killed after QEMU started and before it wrote the
/// record: every `qemu-system-*` process with an argument under `root` is killed, and
/// the scan is repeated until two in a row, 50 ms apart, find none (at most 40 scans),
/// so that a process forked during a scan is not missed.
pub fn kill_all_under(root: &Path) -> usize {
    let mut killed = 0;
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) && depth < 3 {
                stack.push((p, depth + 1));
            } else if p.file_name().is_some_and(|n| n == RUN_FILE) {
                let Some(rec) = RunRecord::load(&dir) else {
                    continue;
                };
                let uuid = uuid_of_folder(&dir).unwrap_or_default();
                if is_vm_process(rec.pid, &uuid)
                    && kill_and_wait(rec.pid, &uuid, Duration::from_secs(5))
                {
                    killed += 1;
                }
            }
        }
    }
    let mut forms = vec![root.to_path_buf()];
    if let Ok(canonical) = std::fs::canonicalize(root) {
        if canonical != root {
            forms.push(canonical);
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut quiet_scans = 0;
    for _ in 0..40 {
        let pids: Vec<i32> = forms
            .iter()
            .flat_map(|f| processes_under(b"", f))
            .filter(|pid| is_qemu_system(*pid))
            .collect();
        if pids.is_empty() {
            quiet_scans += 1;
            if quiet_scans == 2 {
                break;
            }
        } else {
            quiet_scans = 0;
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                if seen.insert(pid) {
                    killed += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    killed
}

/// Whether `pid` runs a `qemu-system-*` program.
fn is_qemu_system(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        let argv0 = cmd.split(|&b| b == 0).next().unwrap_or_default();
        let name = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
        name.starts_with(b"qemu-system")
    })
}

/// The uuid of the VM whose settings are in `folder` (for guards that have no backend).
fn uuid_of_folder(folder: &Path) -> Option<String> {
    for e in std::fs::read_dir(folder).ok()?.flatten() {
        let p = e.path();
        if p.to_string_lossy().ends_with(".vm.json") {
            let s = VmSettings::load(&p).ok()?;
            return Some(s.uuid.to_string());
        }
    }
    None
}

/// A MAC address for a VM, stable across restarts and hosts: QEMU's locally administered
/// prefix 52:54:00 followed by three bytes of the VM's uuid.
pub fn mac_for(uuid: &crate::model::Uuid) -> String {
    let b = uuid.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[13], b[14], b[15])
}

/// Where a running VM's files go.
#[derive(Debug, Clone)]
pub(crate) struct RunPaths {
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
    pub console_log: PathBuf,
}

impl RunPaths {
    pub(crate) fn for_vm(folder: &Path, uuid: &str) -> RunPaths {
        // A Unix socket path has at most 107 bytes; deep folders use the temp dir.
        let mut qmp = folder.join("qmp.sock");
        if qmp.as_os_str().len() > 100 {
            qmp = std::env::temp_dir().join(format!("unacloud-qmp-{uuid}.sock"));
        }
        RunPaths {
            qmp,
            pidfile: folder.join("qemu.pid"),
            console_log: folder.join("console.log"),
        }
    }
}

/// The full `qemu-system-x86_64` argument list for `settings`, with every disk slot
/// attached at the image given in `disks` (absolute paths, slot order).
pub(crate) fn build_args(
    settings: &VmSettings,
    disks: &[PathBuf],
    paths: &RunPaths,
    accel: Accel,
    incoming: Option<&Path>,
) -> Result<Vec<OsString>> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(OsString::from(s));
    push("-name");
    push(&format!(
        "guest={},debug-threads=on",
        settings.name.replace(',', ",,")
    ));
    push("-uuid");
    push(&settings.uuid.to_string());
    push("-machine");
    push("pc");
    push("-accel");
    push(match accel {
        Accel::Kvm => "kvm",
        _ => "tcg",
    });
    push("-cpu");
    push(if accel == Accel::Kvm { "host" } else { "max" });
    push("-m");
    push(&settings.memory_mb.to_string());
    push("-smp");
    push(&settings.cores.max(1).to_string());
    push("-nodefaults");
    push("-no-user-config");
    push("-display");
    push("none");
    // The guest's own power-off leaves the process up with status "shutdown", so it is
    // told apart from a killed process.
    push("-no-shutdown");
    push("-daemonize");
    a.push("-pidfile".into());
    a.push(paths.pidfile.clone().into());
    a.push("-qmp".into());
    a.push(OsString::from(format!(
        "unix:{},server=on,wait=off",
        escape_opt(&paths.qmp)?
    )));
    a.push("-chardev".into());
    a.push(OsString::from(format!(
        "file,id=console0,path={},append=on",
        escape_opt(&paths.console_log)?
    )));
    a.push("-serial".into());
    a.push("chardev:console0".into());
    for (i, p) in disks.iter().enumerate() {
        a.push("-drive".into());
        a.push(OsString::from(format!(
            "file={},format=qcow2,if=none,id=disk{i},cache=writeback,discard=unmap",
            escape_opt(p)?
        )));
        a.push("-device".into());
        a.push(format!("virtio-blk-pci,drive=disk{i}").into());
    }
    let mut cmdline = vec!["console=ttyS0".to_owned()];
    match &settings.net {
        NetConfig::None => {}
        NetConfig::User => {
            a.push("-netdev".into());
            a.push("user,id=net0".into());
            a.push("-device".into());
            a.push(
                format!(
                    "virtio-net-pci,netdev=net0,mac={},romfile=",
                    super::run::mac_for(&settings.uuid)
                )
                .into(),
            );
        }
        NetConfig::Tap {
            ifname,
            ip,
            gateway,
            mac,
            ..
        } => {
            a.push("-netdev".into());
            a.push(format!("tap,id=net0,ifname={ifname},script=no,downscript=no").into());
            a.push("-device".into());
            a.push(format!("virtio-net-pci,netdev=net0,mac={mac},romfile=").into());
            if let Some(ip) = ip {
                cmdline.push(format!("unacloud.ip={ip}"));
            }
            if let Some(gw) = gateway {
                cmdline.push(format!("unacloud.gw={gw}"));
            }
        }
    }
    if let Some(boot) = &settings.boot {
        if let Some(extra) = &boot.cmdline {
            cmdline.push(extra.clone());
        }
        a.push("-kernel".into());
        a.push(boot.kernel.clone().into());
        if let Some(initrd) = &boot.initrd {
            a.push("-initrd".into());
            a.push(initrd.clone().into());
        }
        a.push("-append".into());
        a.push(cmdline.join(" ").into());
    }
    if let Some(state) = incoming {
        a.push("-incoming".into());
        a.push(OsString::from(format!("exec:cat {}", shell_quote(state)?)));
    }
    // Start paused: the backend continues the guest once the state is loaded.
    a.push("-S".into());
    Ok(a)
}

/// A path inside a QEMU `-opt,key=value` list: commas are doubled; a path QEMU cannot
/// take verbatim is refused.
fn escape_opt(p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| {
        Error::InvalidInput(format!(
            "{} is not valid UTF-8; QEMU cannot be given it",
            p.display()
        ))
    })?;
    if s.contains('\n') {
        return Err(Error::InvalidInput(format!(
            "path {s:?} contains a newline"
        )));
    }
    Ok(s.replace(',', ",,"))
}

/// Single-quotes a path for the `/bin/sh -c` that QEMU's `exec:` migration runs.
pub(crate) fn shell_quote(p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| {
        Error::InvalidInput(format!(
            "{} is not valid UTF-8; QEMU cannot be given it",
            p.display()
        ))
    })?;
    if s.contains('\n') || s.contains('\0') {
        return Err(Error::InvalidInput(format!(
            "path {s:?} contains a control character"
        )));
    }
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// Starts the daemonized QEMU process (inside `netns` when given) and returns its pid,
/// or `None` when the process ended as soon as it had started (it removes its pid file
/// when it exits, e.g. because the state it was given to load is unreadable).
pub(crate) async fn launch(
    sys: &QemuSystem,
    netns: Option<&str>,
    args: &[OsString],
    paths: &RunPaths,
) -> Result<Option<i32>> {
    let _ = std::fs::remove_file(&paths.pidfile);
    if paths.qmp.exists() {
        // A stale socket of a dead process never blocks a start.
        std::fs::remove_file(&paths.qmp).map_err(|e| Error::io(&paths.qmp, e))?;
    }
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&sys.program);
            c
        }
        None => tokio::process::Command::new(&sys.program),
    };
    cmd.args(args);
    if netns.is_some() && !program_exists(&sys.program) {
        return Err(sys.missing("start VM"));
    }
    let out = match output_within(cmd, sys.launch_timeout).await {
        Ok(out) => out,
        Err(Ran::Spawn(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if netns.is_some() {
                Error::Unsupported {
                    backend: BACKEND.to_owned(),
                    operation: "start VM",
                    reason: "`ip` was not found; install the Debian package iproute2".to_owned(),
                }
            } else {
                sys.missing("start VM")
            })
        }
        Err(Ran::Spawn(e) | Ran::Wait(e)) => return Err(Error::io(&sys.program, e)),
        Err(Ran::TimedOut) => {
            return Err(Error::Timeout {
                operation: "start VM",
                after: sys.launch_timeout,
            })
        }
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(classify_start_failure(&stderr, out.status));
    }
    let text = match std::fs::read_to_string(&paths.pidfile) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&paths.pidfile, e)),
    };
    text.trim()
        .parse::<i32>()
        .map(Some)
        .map_err(|_| Error::Backend {
            backend: BACKEND.to_owned(),
            message: format!("QEMU wrote a pid file that holds no pid: {text:?}"),
        })
}

fn program_exists(p: &Path) -> bool {
    if p.components().count() > 1 {
        return p.exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).exists()))
        .unwrap_or(false)
}

fn classify_start_failure(stderr: &str, status: std::process::ExitStatus) -> Error {
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("could not access kvm") || lower.contains("/dev/kvm") {
        return Error::Unsupported {
            backend: BACKEND.to_owned(),
            operation: "start VM",
            reason: format!("KVM is not usable here ({stderr}); use the tcg accelerator"),
        };
    }
    if lower.contains("permission denied") || lower.contains("operation not permitted") {
        return Error::AccessDenied {
            message: format!("qemu-system-x86_64 could not start: {stderr}"),
        };
    }
    Error::Backend {
        backend: BACKEND.to_owned(),
        message: format!("qemu-system-x86_64 exited with {status}: {stderr}"),
    }
}

/// The length of a file, 0 when it does not exist.
pub(crate) fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Reads the console log from `offset` and returns the last `heartbeat <n>` value in it.
pub fn last_heartbeat(console_log: &Path, offset: u64) -> Option<u64> {
    let bytes = std::fs::read(console_log).ok()?;
    let from = usize::try_from(offset).ok()?.min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[from..]);
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("heartbeat ")?.trim().parse().ok())
}

/// The outcome of an accelerator probe, remembered in `accel.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProbeRecord {
    pub accel: Accel,
    pub qemu: String,
    pub kernel: PathBuf,
    pub detail: String,
}

/// Boots `kernel` (with `initrd`) under KVM with `unacloud.probe=1` and reports whether
/// the guest printed `unacloud-probe-ok` before the deadline. The guest image's
/// initramfs prints it and powers off; under a KVM that opens but cannot run guests
/// (nested virtualisation without support), the guest hangs and the probe fails.
pub(crate) async fn probe_kvm(
    sys: &QemuSystem,
    kernel: &Path,
    initrd: Option<&Path>,
    scratch: &Path,
) -> Result<(bool, String)> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok((false, "/dev/kvm cannot be opened".to_owned()));
    }
    let log = scratch.join("accel-probe.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = tokio::process::Command::new(&sys.program);
    cmd.args([
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .arg("-chardev")
    .arg(format!("file,id=c0,path={}", escape_opt(&log)?))
    .args(["-serial", "chardev:c0", "-kernel"])
    .arg(kernel)
    .args(["-append", "console=ttyS0 unacloud.probe=1"]);
    if let Some(i) = initrd {
        cmd.arg("-initrd").arg(i);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            sys.missing("probe the accelerator")
        } else {
            Error::io(&sys.program, e)
        }
    })?;
    let start = Instant::now();
    let ok = loop {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("unacloud-probe-ok")) {
            break true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break std::fs::read_to_string(&log).is_ok_and(|t| t.contains("unacloud-probe-ok"));
        }
        if start.elapsed() > sys.probe_deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&log);
    let detail = if ok {
        format!(
            "a KVM guest reached its init in {} ms",
            start.elapsed().as_millis()
        )
    } else {
        format!(
            "a KVM guest did not reach its init within {} s (KVM opens but cannot run guests here)",
            sys.probe_deadline.as_secs()
        )
    };
    Ok((ok, detail))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(
            shell_quote(Path::new("/a b/c'd")).unwrap(),
            r"'/a b/c'\''d'"
        );
        assert!(shell_quote(Path::new("/a\nb")).is_err());
    }

    #[test]
    fn heartbeat_is_read_after_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        std::fs::write(&log, "boot\nheartbeat 1\nheartbeat 2\n").unwrap();
        assert_eq!(last_heartbeat(&log, 0), Some(2));
        let off = file_len(&log);
        assert_eq!(last_heartbeat(&log, off), None);
        std::fs::write(&log, "boot\nheartbeat 1\nheartbeat 2\nheartbeat 7\n").unwrap();
        assert_eq!(last_heartbeat(&log, off), Some(7));
    }

    #[test]
    fn accel_names_round_trip() {
        for a in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>().unwrap(), a);
        }
        assert!("xen".parse::<Accel>().is_err());
    }
}
