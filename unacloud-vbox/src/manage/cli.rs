//! The logic of the `vbox` remote-control command line (the thesis's "Hypervisor
//! Remote Control"), kept here so that it is tested like the rest of the library; the
//! example only parses arguments.
//!
//! Unstable (feature `__cli`): the example's logic, not public API; it may change or go
//! in any release.
//!
//! With `dry_run` every sub-command prints the exact `VBoxManage` command lines it would
//! run, one per line, quoted for a POSIX shell, and nothing else on standard output —
//! the mode for users without VirtualBox. Without `dry_run` the commands run through a
//! [`CommandRunner`]; if VBoxManage is not installed the command prints one line on
//! standard error and exits with code 2. Any error is one line on standard error and
//! exit code 2.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use unacloud_vbox::manage::cli::{execute, CliCommand};
//!
//! let mut out = Vec::new();
//! let mut err = Vec::new();
//! let cmd = CliCommand::Start { vm: "TM".into(), gui: false };
//! let code = execute(&cmd, true, || None, &mut out, &mut err).await;
//! assert_eq!(code, 0);
//! assert_eq!(String::from_utf8(out).unwrap(), "VBoxManage startvm TM --type headless\n");
//! # });
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use unacloud_core::hypervisor::StartMode;
use unacloud_core::model::{HardwareProfile, Uuid};

use crate::error::{Error, Result};
use crate::manage::backend::{create_vm_commands, VBoxManageHypervisor};
use crate::manage::command::{self, VBoxCommand};
use crate::manage::parse;
use crate::manage::runner::CommandRunner;

/// Exit code of every failure.
pub const EXIT_FAILURE: i32 = 2;

/// One sub-command of the `vbox` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliCommand {
    /// `list`: every registered VM, and which are running.
    List,
    /// `info <vm>`: state, hardware, disks and snapshots of one VM.
    Info {
        /// VM name or uuid.
        vm: String,
    },
    /// `start <vm> [--gui]`.
    Start {
        /// VM name or uuid.
        vm: String,
        /// Open a window instead of running headless.
        gui: bool,
    },
    /// `snapshot take <vm> <name> [--description <text>] [--live]`.
    SnapshotTake {
        /// VM name or uuid.
        vm: String,
        /// Snapshot name.
        name: String,
        /// Optional description.
        description: Option<String>,
        /// Keep the VM running while the snapshot is taken.
        live: bool,
    },
    /// `snapshot restore <vm> <snapshot>`.
    SnapshotRestore {
        /// VM name or uuid.
        vm: String,
        /// Snapshot name or uuid.
        snapshot: String,
    },
    /// `snapshot list <vm> [--tree]`.
    SnapshotList {
        /// VM name or uuid.
        vm: String,
        /// Draw the tree instead of a flat list.
        tree: bool,
    },
    /// `provision --template <image> --vm <name> --profile <p> [--bridge <if>]`: create a
    /// VM with the profile's CPUs and memory and attach the template as a multiattach
    /// disk (VirtualBox gives the VM its own differencing child).
    Provision {
        /// The template disk image.
        template: PathBuf,
        /// The new VM's name.
        vm: String,
        /// Hardware profile.
        profile: HardwareProfile,
        /// Host interface for a bridged first adapter.
        bridge: Option<String>,
        /// Guest OS type (`--ostype`).
        os_type: Option<String>,
        /// Folder for the VM (`--basefolder`).
        base_folder: Option<PathBuf>,
    },
    /// `migrate-set <machine.vbox> --snapshot <uuid|name>`: the files to copy to resume
    /// that snapshot on another host, one per line.
    MigrateSet {
        /// The machine's settings file.
        settings: PathBuf,
        /// `current`, a snapshot uuid or a unique snapshot name.
        snapshot: String,
        /// The global `VirtualBox.xml`, for templates registered there.
        global_registry: Option<PathBuf>,
        /// Images already at the destination (preloaded templates), by uuid.
        preloaded: Vec<Uuid>,
    },
}

/// Name of the storage controller `provision` creates.
pub const PROVISION_CONTROLLER: &str = "SATA";

/// The `VBoxManage` commands a sub-command runs, in order (empty for `migrate-set`,
/// which only reads files).
pub fn plan(cmd: &CliCommand) -> Result<Vec<VBoxCommand>> {
    Ok(match cmd {
        CliCommand::List => vec![command::list_vms(), command::list_running_vms()],
        CliCommand::Info { vm } => vec![command::show_vm_info(vm)],
        CliCommand::Start { vm, gui } => vec![command::start_vm(
            vm,
            if *gui {
                StartMode::Gui
            } else {
                StartMode::Headless
            },
        )],
        CliCommand::SnapshotTake {
            vm,
            name,
            description,
            live,
        } => vec![command::snapshot_take(
            vm,
            name,
            description.as_deref(),
            *live,
        )],
        CliCommand::SnapshotRestore { vm, snapshot } => {
            vec![command::snapshot_restore(vm, snapshot)]
        }
        CliCommand::SnapshotList { vm, .. } => vec![command::snapshot_list(vm)],
        CliCommand::Provision {
            template,
            vm,
            profile,
            bridge,
            os_type,
            base_folder,
        } => {
            let mut spec = unacloud_core::model::VmSpec::new(vm.clone(), *profile);
            spec.bridge_adapter = bridge.clone();
            spec.os_type = os_type.clone();
            spec.base_folder = base_folder.clone();
            let mut cmds = create_vm_commands(&spec)?;
            cmds.push(command::storage_ctl_add(
                vm,
                PROVISION_CONTROLLER,
                command::Bus::Sata,
            ));
            cmds.push(command::storage_attach(
                vm,
                PROVISION_CONTROLLER,
                0,
                0,
                &command::path_arg(template)?,
                Some(unacloud_core::model::DiskType::MultiAttach),
            ));
            cmds
        }
        CliCommand::MigrateSet { .. } => Vec::new(),
    })
}

/// Runs a sub-command, writing results to `out` and one-line errors to `err`; returns
/// the process exit code (0, or [`EXIT_FAILURE`]).
///
/// `runner` is asked for a runner only when commands must really run; `None` means
/// VBoxManage was not found.
pub async fn execute<F>(
    cmd: &CliCommand,
    dry_run: bool,
    runner: F,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32
where
    F: FnOnce() -> Option<Arc<dyn CommandRunner>>,
{
    match run(cmd, dry_run, runner, out, err).await {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "error: {}", one_line(&e));
            EXIT_FAILURE
        }
    }
}

/// An error and its causes on one line (`outer: cause: root cause`), control
/// characters escaped: [`crate::display::error_chain`].
pub fn one_line(e: &dyn std::error::Error) -> String {
    crate::display::error_chain(e)
}

fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    crate::display::escape_control(s)
}

/// Output passed through from `VBoxManage`, each line escaped (line breaks kept).
fn esc_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b.strip_suffix('\r').unwrap_or(b), "\n"),
            None => (line, ""),
        };
        out.push_str(&esc(body));
        out.push_str(nl);
    }
    out
}

fn io_err(e: std::io::Error) -> Error {
    Error::io("<stdout>", e)
}

async fn run<F>(
    cmd: &CliCommand,
    dry_run: bool,
    runner: F,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32>
where
    F: FnOnce() -> Option<Arc<dyn CommandRunner>>,
{
    if let CliCommand::MigrateSet {
        settings,
        snapshot,
        global_registry,
        preloaded,
    } = cmd
    {
        migrate_set(
            settings,
            snapshot,
            global_registry.as_deref(),
            preloaded,
            out,
            err,
        )?;
        return Ok(0);
    }
    let cmds = plan(cmd)?;
    if dry_run {
        for c in &cmds {
            writeln!(out, "{}", c.shell_line()).map_err(io_err)?;
        }
        return Ok(0);
    }
    let Some(runner) = runner() else {
        writeln!(
            err,
            "error: VBoxManage was not found on PATH; install VirtualBox, or add --dry-run before the sub-command to print the VBoxManage commands instead"
        )
        .map_err(io_err)?;
        return Ok(EXIT_FAILURE);
    };
    let hv = VBoxManageHypervisor::new(runner);
    match cmd {
        CliCommand::List => {
            let all = hv.exec(&cmds[0]).await?;
            let running = hv.exec(&cmds[1]).await?;
            let running = parse::parse_vm_list(&running.stdout);
            for vm in parse::parse_vm_list(&all.stdout) {
                let state = if running.iter().any(|r| r.uuid == vm.uuid) {
                    "running"
                } else {
                    "-"
                };
                writeln!(out, "{}  {:<8} {}", vm.uuid, state, esc(&vm.name)).map_err(io_err)?;
            }
        }
        CliCommand::Info { vm } => {
            let d = hv.details(vm).await?;
            print_info(&d, out).map_err(io_err)?;
        }
        CliCommand::SnapshotList { vm, tree } => {
            let t = hv.snapshots(vm).await?;
            if *tree {
                write!(out, "{}", crate::display::render_tree_text(&t)?).map_err(io_err)?;
            } else {
                for (n, _) in t.iter() {
                    if let Some(s) = t.get(n) {
                        let mark = if t.current() == Some(n) { " *" } else { "" };
                        writeln!(out, "{}  {}{}", esc(&s.id), esc(&s.name), mark)
                            .map_err(io_err)?;
                    }
                }
            }
        }
        CliCommand::SnapshotTake { .. } => {
            let o = hv.exec(&cmds[0]).await?;
            match parse::parse_snapshot_taken(&o.stdout) {
                Some(u) => writeln!(out, "snapshot taken: {u}").map_err(io_err)?,
                None => write!(out, "{}", esc_lines(&o.stdout)).map_err(io_err)?,
            }
        }
        _ => {
            for c in &cmds {
                let o = hv.exec(c).await?;
                write!(out, "{}", esc_lines(&o.stdout)).map_err(io_err)?;
            }
        }
    }
    Ok(0)
}

fn print_info(d: &parse::VmDetails, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "name:       {}", esc(&d.name))?;
    if let Some(u) = d.uuid {
        writeln!(out, "uuid:       {u}")?;
    }
    writeln!(out, "state:      {}", esc(&d.state.to_string()))?;
    if let Some(c) = d.cpus {
        writeln!(out, "cpus:       {c}")?;
    }
    if let Some(m) = d.memory_mb {
        writeln!(out, "memory:     {m} MB")?;
    }
    if let Some(f) = &d.settings_file {
        writeln!(out, "settings:   {}", crate::display::escape_path(f))?;
    }
    for a in d.disk_attachments() {
        writeln!(
            out,
            "disk:       {} {}:{} {}",
            esc(&a.controller),
            a.port,
            a.device,
            esc(&a.disk.to_string())
        )?;
    }
    writeln!(out, "snapshots:  {}", d.snapshots.len())?;
    if let Some(c) = &d.current_snapshot {
        writeln!(out, "current:    {}", esc(&c.to_string()))?;
    }
    Ok(())
}

fn migrate_set(
    settings: &std::path::Path,
    snapshot: &str,
    global: Option<&std::path::Path>,
    preloaded: &[Uuid],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let machine = crate::tracker::Machine::load(settings, global)?;
    let options =
        crate::tracker::MigrationOptions::default().with_preloaded(preloaded.iter().copied());
    let set = machine.migration_set(snapshot, &options)?;
    for f in &set.files {
        writeln!(out, "{}", crate::display::escape_path(&f.path)).map_err(io_err)?;
    }
    for w in &set.warnings {
        writeln!(err, "warning: {}", esc(w)).map_err(io_err)?;
    }
    Ok(())
}
