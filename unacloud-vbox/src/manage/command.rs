//! `VBoxManage` command lines: one builder per operation, and POSIX shell quoting.
//!
//! Every builder returns a [`VBoxCommand`]: the argument vector after the program name,
//! the operation's short name (used in errors and to pick a time limit), and the object
//! it acts on. Builders never put a password on the command line: a guest password is
//! attached as a [`Secret`] that the runner writes to the child's standard input
//! (`--passwordfile stdin`), or the command names a password *file*.
//!
//! The flags follow the VBoxManage reference of the VirtualBox manual (5.x–7.x).
//!
//! ```
//! use unacloud_vbox::manage::command;
//!
//! let take = command::snapshot_take("TM", "Snapshot 1", None, true);
//! assert_eq!(take.shell_line(), "VBoxManage snapshot TM take 'Snapshot 1' --live");
//! ```

use std::fmt;
use std::path::Path;
use std::time::Duration;

use unacloud_core::hypervisor::{GuestCommand, StartMode, Timeouts};
use unacloud_core::model::{DiskType, HardwareProfile};

use crate::error::{Error, Result};
use crate::manage::secret::{PasswordSource, Secret};

/// Which of the [`Timeouts`] limits bounds a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeClass {
    /// Lists and queries.
    Query,
    /// Start, power off, pause, resume.
    Power,
    /// Snapshots and saving state.
    Snapshot,
    /// Creating, registering, cloning, attaching, deleting.
    Provision,
    /// Commands inside the guest.
    Guest,
}

impl TimeClass {
    /// The limit this class gets from `limits`.
    pub fn limit(self, limits: &Timeouts) -> Duration {
        match self {
            TimeClass::Query => limits.query,
            TimeClass::Power => limits.power,
            TimeClass::Snapshot => limits.snapshot,
            TimeClass::Provision => limits.provision,
            TimeClass::Guest => limits.guest,
        }
    }
}

/// One `VBoxManage` invocation.
#[derive(Clone, PartialEq, Eq)]
pub struct VBoxCommand {
    args: Vec<String>,
    operation: &'static str,
    target: Option<String>,
    class: TimeClass,
    stdin: Option<Secret>,
}

impl fmt::Debug for VBoxCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VBoxCommand")
            .field("args", &self.args)
            .field("operation", &self.operation)
            .field("target", &self.target)
            .field("class", &self.class)
            .field("stdin", &self.stdin.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Display for VBoxCommand {
    /// The shell line (see [`VBoxCommand::shell_line`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shell_line())
    }
}

impl VBoxCommand {
    /// A command from raw arguments (everything after the program name).
    ///
    /// `operation` names it in errors; `target` is the VM or disk it acts on.
    pub fn new(
        operation: &'static str,
        target: Option<&str>,
        class: TimeClass,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        VBoxCommand {
            args: args.into_iter().map(Into::into).collect(),
            operation,
            target: target.map(str::to_owned),
            class,
            stdin: None,
        }
    }

    /// The arguments after the program name.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Short name of the operation (`snapshot take`, `startvm`, …).
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// The VM or disk the command acts on, as given.
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// Which limit bounds the command.
    pub fn class(&self) -> TimeClass {
        self.class
    }

    /// The secret to write to the child's standard input, if any.
    pub fn stdin(&self) -> Option<&Secret> {
        self.stdin.as_ref()
    }

    /// Attaches a secret for standard input.
    pub fn with_stdin(mut self, secret: Secret) -> Self {
        self.stdin = Some(secret);
        self
    }

    /// `VBoxManage` followed by the arguments, each quoted for a POSIX shell only when
    /// needed, so the line can be pasted into a terminal. Never contains the stdin secret.
    pub fn shell_line(&self) -> String {
        let mut line = String::from("VBoxManage");
        for a in &self.args {
            line.push(' ');
            line.push_str(&shell_quote(a));
        }
        line
    }
}

/// Quotes `arg` for a POSIX shell: unchanged when it consists only of characters that
/// are never special (`A-Z a-z 0-9 _ @ % + = : , . / -`), otherwise wrapped in single
/// quotes with each `'` written as `'\''`. The empty string becomes `''`.
///
/// ```
/// use unacloud_vbox::manage::command::shell_quote;
/// assert_eq!(shell_quote("TM"), "TM");
/// assert_eq!(shell_quote("Snapshot 1"), "'Snapshot 1'");
/// assert_eq!(shell_quote("it's"), "'it'\\''s'");
/// assert_eq!(shell_quote(""), "''");
/// ```
pub fn shell_quote(arg: &str) -> String {
    let safe = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(c, '_' | '@' | '%' | '+' | '=' | ':' | ',' | '.' | '/' | '-')
    };
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_owned();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// A path as a command-line argument; paths that are not valid UTF-8 are refused.
pub fn path_arg(path: &Path) -> Result<String> {
    path.to_str().map(str::to_owned).ok_or_else(|| {
        Error::Core(unacloud_core::Error::InvalidInput(format!(
            "path {} is not valid UTF-8 and cannot be passed to VBoxManage",
            path.display()
        )))
    })
}

// ---- queries ---------------------------------------------------------------------------

/// `VBoxManage --version`.
pub fn version() -> VBoxCommand {
    VBoxCommand::new("--version", None, TimeClass::Query, ["--version"])
}

/// `VBoxManage list vms`.
pub fn list_vms() -> VBoxCommand {
    VBoxCommand::new("list vms", None, TimeClass::Query, ["list", "vms"])
}

/// `VBoxManage list runningvms`.
pub fn list_running_vms() -> VBoxCommand {
    VBoxCommand::new(
        "list runningvms",
        None,
        TimeClass::Query,
        ["list", "runningvms"],
    )
}

/// `VBoxManage list hdds`.
pub fn list_hdds() -> VBoxCommand {
    VBoxCommand::new("list hdds", None, TimeClass::Query, ["list", "hdds"])
}

/// `VBoxManage showvminfo <vm> --machinereadable`.
pub fn show_vm_info(vm: &str) -> VBoxCommand {
    VBoxCommand::new(
        "showvminfo",
        Some(vm),
        TimeClass::Query,
        ["showvminfo", vm, "--machinereadable"],
    )
}

/// `VBoxManage showmediuminfo disk <uuid|path>`: prints a disk's record and, for a path,
/// opens (registers) the image — since VirtualBox 4.0 there is no separate
/// "open medium" command.
pub fn show_medium_info(disk: &str) -> VBoxCommand {
    VBoxCommand::new(
        "showmediuminfo",
        Some(disk),
        TimeClass::Query,
        ["showmediuminfo", "disk", disk],
    )
}

/// `VBoxManage snapshot <vm> list --machinereadable`.
pub fn snapshot_list(vm: &str) -> VBoxCommand {
    VBoxCommand::new(
        "snapshot list",
        Some(vm),
        TimeClass::Query,
        ["snapshot", vm, "list", "--machinereadable"],
    )
}

// ---- VMs -------------------------------------------------------------------------------

/// `VBoxManage createvm --name <name> [--ostype <t>] [--basefolder <dir>] --register`.
pub fn create_vm(
    name: &str,
    os_type: Option<&str>,
    base_folder: Option<&Path>,
) -> Result<VBoxCommand> {
    let mut args = vec!["createvm".to_owned(), "--name".to_owned(), name.to_owned()];
    if let Some(t) = os_type {
        args.push("--ostype".to_owned());
        args.push(t.to_owned());
    }
    if let Some(b) = base_folder {
        args.push("--basefolder".to_owned());
        args.push(path_arg(b)?);
    }
    args.push("--register".to_owned());
    Ok(VBoxCommand::new(
        "createvm",
        Some(name),
        TimeClass::Provision,
        args,
    ))
}

/// What `modifyvm` should change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmChanges {
    /// `--cpus <n>`.
    pub cpus: Option<u32>,
    /// `--memory <MiB>`.
    pub memory_mb: Option<u64>,
    /// `--nic<n> bridged --bridgeadapter<n> <host interface>`: (adapter number 1–8,
    /// host interface).
    pub bridged: Option<(u8, String)>,
}

impl VmChanges {
    /// CPUs and memory of a hardware profile (thesis Table 2.3).
    pub fn profile(profile: HardwareProfile) -> Self {
        VmChanges {
            cpus: Some(profile.cores()),
            memory_mb: Some(profile.memory_mb()),
            bridged: None,
        }
    }

    /// Adds a bridged first adapter on `host_interface`.
    pub fn bridged_to(mut self, host_interface: &str) -> Self {
        self.bridged = Some((1, host_interface.to_owned()));
        self
    }
}

/// `VBoxManage modifyvm <vm> [--cpus n] [--memory MiB] [--nicN bridged --bridgeadapterN if]`.
pub fn modify_vm(vm: &str, changes: &VmChanges) -> Result<VBoxCommand> {
    let mut args = vec!["modifyvm".to_owned(), vm.to_owned()];
    if let Some(c) = changes.cpus {
        args.extend(["--cpus".to_owned(), c.to_string()]);
    }
    if let Some(m) = changes.memory_mb {
        args.extend(["--memory".to_owned(), m.to_string()]);
    }
    if let Some((n, ifname)) = &changes.bridged {
        if !(1..=8).contains(n) {
            return Err(Error::Core(unacloud_core::Error::InvalidInput(format!(
                "network adapter number {n} is out of range; VirtualBox has adapters 1 to 8"
            ))));
        }
        args.extend([
            format!("--nic{n}"),
            "bridged".to_owned(),
            format!("--bridgeadapter{n}"),
            ifname.clone(),
        ]);
    }
    if args.len() == 2 {
        return Err(Error::Core(unacloud_core::Error::InvalidInput(
            "modifyvm needs at least one change".to_owned(),
        )));
    }
    Ok(VBoxCommand::new(
        "modifyvm",
        Some(vm),
        TimeClass::Provision,
        args,
    ))
}

/// `VBoxManage registervm <settings file>` (the path must be absolute for VirtualBox).
pub fn register_vm(settings: &Path) -> Result<VBoxCommand> {
    let p = path_arg(settings)?;
    Ok(VBoxCommand::new(
        "registervm",
        Some(&p),
        TimeClass::Provision,
        ["registervm".to_owned(), p.clone()],
    ))
}

/// `VBoxManage unregistervm <vm> [--delete]`.
pub fn unregister_vm(vm: &str, delete: bool) -> VBoxCommand {
    let mut args = vec!["unregistervm", vm];
    if delete {
        args.push("--delete");
    }
    VBoxCommand::new("unregistervm", Some(vm), TimeClass::Provision, args)
}

/// `VBoxManage clonevm <source> --name <name> [--snapshot <s>] [--options link]
/// [--basefolder <dir>] --register`. A linked clone needs a snapshot.
pub fn clone_vm(
    source: &str,
    name: &str,
    snapshot: Option<&str>,
    linked: bool,
    base_folder: Option<&Path>,
) -> Result<VBoxCommand> {
    if linked && snapshot.is_none() {
        return Err(Error::Core(unacloud_core::Error::InvalidInput(format!(
            "a linked clone of {source:?} needs a snapshot to share its disks; name one"
        ))));
    }
    let mut args = vec![
        "clonevm".to_owned(),
        source.to_owned(),
        "--name".to_owned(),
        name.to_owned(),
    ];
    if let Some(s) = snapshot {
        args.extend(["--snapshot".to_owned(), s.to_owned()]);
    }
    if linked {
        args.extend(["--options".to_owned(), "link".to_owned()]);
    }
    if let Some(b) = base_folder {
        args.extend(["--basefolder".to_owned(), path_arg(b)?]);
    }
    args.push("--register".to_owned());
    Ok(VBoxCommand::new(
        "clonevm",
        Some(source),
        TimeClass::Provision,
        args,
    ))
}

// ---- storage ---------------------------------------------------------------------------

/// The bus of a storage controller (`storagectl --add`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// `--add sata --controller IntelAhci`.
    Sata,
    /// `--add ide --controller PIIX4`.
    Ide,
    /// `--add scsi --controller LSILogic`.
    Scsi,
    /// `--add pcie --controller NVMe`.
    Nvme,
}

impl Bus {
    /// The bus a controller name suggests (`IDE…` → IDE, `SCSI…` → SCSI, `NVMe…` → NVMe,
    /// anything else SATA).
    pub fn for_controller_name(name: &str) -> Bus {
        let n = name.to_ascii_lowercase();
        if n.starts_with("ide") {
            Bus::Ide
        } else if n.starts_with("scsi") {
            Bus::Scsi
        } else if n.starts_with("nvme") {
            Bus::Nvme
        } else {
            Bus::Sata
        }
    }

    fn args(self) -> [&'static str; 2] {
        match self {
            Bus::Sata => ["sata", "IntelAhci"],
            Bus::Ide => ["ide", "PIIX4"],
            Bus::Scsi => ["scsi", "LSILogic"],
            Bus::Nvme => ["pcie", "NVMe"],
        }
    }
}

/// `VBoxManage storagectl <vm> --name <name> --add <bus> --controller <chipset>`.
pub fn storage_ctl_add(vm: &str, name: &str, bus: Bus) -> VBoxCommand {
    let [add, ctl] = bus.args();
    VBoxCommand::new(
        "storagectl",
        Some(vm),
        TimeClass::Provision,
        [
            "storagectl",
            vm,
            "--name",
            name,
            "--add",
            add,
            "--controller",
            ctl,
        ],
    )
}

/// `VBoxManage storageattach <vm> --storagectl <ctl> --port p --device d --type hdd
/// --medium <disk> [--mtype <type>]`. With `--mtype multiattach` VirtualBox turns the
/// image into a multiattach template (if it is not one yet) and attaches a new
/// differencing child of it.
pub fn storage_attach(
    vm: &str,
    controller: &str,
    port: u32,
    device: u32,
    medium: &str,
    mtype: Option<DiskType>,
) -> VBoxCommand {
    let mut args = vec![
        "storageattach".to_owned(),
        vm.to_owned(),
        "--storagectl".to_owned(),
        controller.to_owned(),
        "--port".to_owned(),
        port.to_string(),
        "--device".to_owned(),
        device.to_string(),
        "--type".to_owned(),
        "hdd".to_owned(),
        "--medium".to_owned(),
        medium.to_owned(),
    ];
    if let Some(t) = mtype {
        args.extend(["--mtype".to_owned(), t.as_cli().to_owned()]);
    }
    VBoxCommand::new("storageattach", Some(vm), TimeClass::Provision, args)
}

/// `VBoxManage modifymedium disk <uuid|path> --type <type>`.
pub fn modify_medium_type(disk: &str, disk_type: DiskType) -> VBoxCommand {
    VBoxCommand::new(
        "modifymedium",
        Some(disk),
        TimeClass::Provision,
        ["modifymedium", "disk", disk, "--type", disk_type.as_cli()],
    )
}

/// `VBoxManage closemedium disk <uuid|path> [--delete]`.
pub fn close_medium(disk: &str, delete: bool) -> VBoxCommand {
    let mut args = vec!["closemedium", "disk", disk];
    if delete {
        args.push("--delete");
    }
    VBoxCommand::new("closemedium", Some(disk), TimeClass::Provision, args)
}

// ---- power -----------------------------------------------------------------------------

/// `VBoxManage startvm <vm> --type headless|gui`.
pub fn start_vm(vm: &str, mode: StartMode) -> VBoxCommand {
    let t = match mode {
        StartMode::Headless => "headless",
        StartMode::Gui => "gui",
    };
    VBoxCommand::new(
        "startvm",
        Some(vm),
        TimeClass::Power,
        ["startvm", vm, "--type", t],
    )
}

/// What `controlvm` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// `poweroff`: pull the virtual power cord.
    PowerOff,
    /// `savestate`: save memory to disk and stop.
    SaveState,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
}

impl ControlAction {
    /// The `controlvm` sub-command.
    pub fn as_arg(self) -> &'static str {
        match self {
            ControlAction::PowerOff => "poweroff",
            ControlAction::SaveState => "savestate",
            ControlAction::Pause => "pause",
            ControlAction::Resume => "resume",
        }
    }
}

/// `VBoxManage controlvm <vm> poweroff|savestate|pause|resume`.
pub fn control_vm(vm: &str, action: ControlAction) -> VBoxCommand {
    let (op, class) = match action {
        ControlAction::PowerOff => ("controlvm poweroff", TimeClass::Power),
        ControlAction::SaveState => ("controlvm savestate", TimeClass::Snapshot),
        ControlAction::Pause => ("controlvm pause", TimeClass::Power),
        ControlAction::Resume => ("controlvm resume", TimeClass::Power),
    };
    VBoxCommand::new(op, Some(vm), class, ["controlvm", vm, action.as_arg()])
}

// ---- snapshots -------------------------------------------------------------------------

/// `VBoxManage snapshot <vm> take <name> [--description=<text>] [--live]`.
pub fn snapshot_take(vm: &str, name: &str, description: Option<&str>, live: bool) -> VBoxCommand {
    let mut args = vec![
        "snapshot".to_owned(),
        vm.to_owned(),
        "take".to_owned(),
        name.to_owned(),
    ];
    if let Some(d) = description {
        args.push(format!("--description={d}"));
    }
    if live {
        args.push("--live".to_owned());
    }
    VBoxCommand::new("snapshot take", Some(vm), TimeClass::Snapshot, args)
}

/// `VBoxManage snapshot <vm> restore <uuid|name>`.
pub fn snapshot_restore(vm: &str, snapshot: &str) -> VBoxCommand {
    VBoxCommand::new(
        "snapshot restore",
        Some(vm),
        TimeClass::Snapshot,
        ["snapshot", vm, "restore", snapshot],
    )
}

/// `VBoxManage snapshot <vm> restorecurrent`.
pub fn snapshot_restore_current(vm: &str) -> VBoxCommand {
    VBoxCommand::new(
        "snapshot restorecurrent",
        Some(vm),
        TimeClass::Snapshot,
        ["snapshot", vm, "restorecurrent"],
    )
}

/// `VBoxManage snapshot <vm> delete <uuid|name>`.
pub fn snapshot_delete(vm: &str, snapshot: &str) -> VBoxCommand {
    VBoxCommand::new(
        "snapshot delete",
        Some(vm),
        TimeClass::Snapshot,
        ["snapshot", vm, "delete", snapshot],
    )
}

// ---- guest -----------------------------------------------------------------------------

/// `VBoxManage guestcontrol <vm> run --username <u> --passwordfile <file|stdin>
/// --exe <program> [--timeout <ms>] --wait-stdout --wait-stderr -- <program> <args…>`.
///
/// The password never appears on the command line: a [`PasswordSource::File`] is passed
/// as `--passwordfile <file>` (VBoxManage reads its first line on the host); any other
/// source is resolved here and written to VBoxManage's standard input with
/// `--passwordfile stdin`. `password` overrides `command.password`; with neither, no
/// password option is given (VirtualBox then assumes an empty password).
pub fn guest_run(
    vm: &str,
    command: &GuestCommand,
    password: Option<&PasswordSource>,
) -> Result<VBoxCommand> {
    let mut args = vec![
        "guestcontrol".to_owned(),
        vm.to_owned(),
        "run".to_owned(),
        "--username".to_owned(),
        command.username.clone(),
    ];
    let mut stdin = None;
    match password {
        Some(PasswordSource::File(p)) => {
            args.extend(["--passwordfile".to_owned(), path_arg(p)?]);
        }
        Some(other) => {
            stdin = Some(other.resolve()?);
            args.extend(["--passwordfile".to_owned(), "stdin".to_owned()]);
        }
        None => {
            if let Some(p) = &command.password {
                stdin = Some(Secret::new(p.clone()));
                args.extend(["--passwordfile".to_owned(), "stdin".to_owned()]);
            }
        }
    }
    args.extend(["--exe".to_owned(), command.program.clone()]);
    if let Some(t) = command.timeout {
        let ms = u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1);
        args.extend(["--timeout".to_owned(), ms.to_string()]);
    }
    args.extend([
        "--wait-stdout".to_owned(),
        "--wait-stderr".to_owned(),
        "--".to_owned(),
    ]);
    // argv[0] inside the guest, then the arguments.
    args.push(command.program.clone());
    args.extend(command.args.iter().cloned());
    let mut cmd = VBoxCommand::new("guestcontrol run", Some(vm), TimeClass::Guest, args);
    if let Some(s) = stdin {
        cmd = cmd.with_stdin(s);
    }
    Ok(cmd)
}
