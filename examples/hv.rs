//! `hv`: the thesis's "Hypervisor Remote Control" for both backends — VMs on multiattach
//! templates driven with the real QEMU (`qemu-system-x86_64` over QMP, `qemu-img`), or the
//! same verbs as `VBoxManage` commands.
//!
//! ```text
//! cargo run --release --example hv -- [--backend qemu|vbox] [--root <host dir>] [--json]
//!     [--accel auto|kvm|tcg] [--dry-run] <command>
//!
//!   template add <image> [--multiattach] [--kernel <path>] [--initrd <path>] [--cmdline <words>]
//!   vm create <name> --template <uuid|path> [--memory-mb <n>] [--cpus <n>] [--profile <p>]
//!             [--net none|user|tap:<netns>:<ifname>:<ip/prefix>]
//!   vm start <name> [--wait-guest] [--wait-secs <n>]      (default 120 s)
//!   vm poweroff|pause|resume|save-state <name>
//!   vm info <name>
//!   vm list
//!   vm register <settings file>
//!   vm files <name> [--snapshot <id|name>]
//!   snapshot take <vm> <name> [--live] [--description <text>]
//!   snapshot restore <vm> <id|name>
//!   snapshot delete <vm> <id|name>
//!   snapshot tree <vm> [--dot]
//! ```
//!
//! **`--backend qemu`** (the default) needs `--root`, the host folder that holds the
//! backend's registry and its VMs (`<root>/vms/<name>/`). Every invocation is its own
//! process: VMs run as daemonized QEMU processes and a later invocation finds them again
//! from the root. Only one invocation may use a root at a time.
//!
//! * `template add` registers the image and, with `--multiattach`, makes it a read-only
//!   multiattach template (the file's mode becomes `a-w`: add a copy if the original must
//!   stay writable). Its boot files are `--kernel`/`--initrd`, else `vmlinuz` and
//!   `initrd.img` beside the image when both exist (the layout `scripts/guest-image`
//!   writes), else none (the disk must then boot by itself).
//! * `vm create` creates the VM, gives it its own qcow2 overlay of the template and
//!   connects its network (`none` by default; a tap gets the MAC `52:54:00:…` derived
//!   from the VM's uuid). A failure part-way removes the VM again.
//! * `vm start --wait-guest` waits for the guest's first `heartbeat <n>` console line.
//! * `snapshot take --live` keeps the guest running while its memory is written.
//! * `snapshot restore` and `snapshot delete` need a VM that is not running.
//! * `vm files` lists the files to copy to resume the VM's current state (or
//!   `--snapshot`) on another host; the template is "expected at destination".
//!
//! With `--json` each command prints one JSON value: `template add`
//! `{"uuid","path","format","disk_type","kernel","initrd","cmdline"}`; `vm create`,
//! `vm info` and `vm register` the VM (`name`, `uuid`, `state`, `pid`, `memory_mb`,
//! `cores`, `disks`, `current_snapshot`, `settings_file`, `console_log`,
//! `last_heartbeat`, …); `vm start` `{"vm","pid","console_log","console_offset","accel",
//! "resumed_state","running_ms","boot_ms","first_heartbeat"}` (`boot_ms` and
//! `first_heartbeat` are null unless `--wait-guest`); `vm poweroff|pause|resume|save-state`
//! `{"vm","state"}`; `vm list` an array of `{"name","uuid","state","pid"}`; `vm files` the
//! shape of `file_tracker --json` (`machine`, `snapshot`, `files[{path,role,uuid,bytes}]`,
//! `total_bytes`, `expected_at_destination[{uuid,path}]`, `external`, `warnings`);
//! `snapshot take` `{"vm","id","name","with_memory","background","downtime_ms",
//! "total_ms","state_bytes"}`; `snapshot restore|delete` `{"vm","snapshot","state",
//! "current_snapshot"}`; `snapshot tree` `{"current","snapshots":[…]}`. States are
//! `powered-off`, `saved`, `aborted`, `running`, `paused`, ….
//!
//! **`--backend vbox`** maps the verbs VirtualBox has to `VBoxManage` commands:
//! `vm start` (`startvm <vm> --type headless`), `vm poweroff|pause|resume|save-state`
//! (`controlvm <vm> poweroff|pause|resume|savestate`), `vm info`
//! (`showvminfo <vm> --machinereadable`), `vm list` (`list vms`), `vm register`
//! (`registervm <file>`), `snapshot take|restore|delete`
//! (`snapshot <vm> take <name> [--live]`, …). With `--dry-run` it prints each command as
//! one line quoted for a POSIX shell, and nothing else, e.g.
//! `hv --backend vbox --dry-run snapshot take TM "Snapshot 1" --live` prints
//! `VBoxManage snapshot TM take 'Snapshot 1' --live`. Without `--dry-run` the same
//! commands run through the installed `VBoxManage`. The other verbs have no VBoxManage
//! equivalent here and are refused.
//!
//! Exit code 0 on success. Any error — bad arguments, a failed operation, VBoxManage
//! missing — is one line on standard error, `hv: <error>: <its causes>`, and exit code 2.
//! `RUST_LOG=info` (or `debug`) adds the library's log on standard error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use unacloud::cloud::files::MigrationSet;
use unacloud::cloud::hypervisor::{AttachSpec, DiskRef, Hypervisor, StartMode};
use unacloud::cloud::model::{DiskType, HardwareProfile, Uuid, VmId, VmInfo, VmSpec};
use unacloud::cloud::qemu::{
    last_heartbeat, mac_for, Accel, BootFiles, NetConfig, QemuHypervisor, QemuImg, QemuSystem,
    StartOptions,
};
use unacloud::vbox::manage::cli::one_line;
use unacloud::vbox::manage::command::{self as vbox_cmd, ControlAction};
use unacloud::vbox::manage::{
    locate_vboxmanage, parse, CommandRunner, TokioRunner, VBoxCommand, VBoxManageHypervisor,
};

/// Exit code of every failure.
pub const EXIT_FAILURE: i32 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "hv",
    about = "Hypervisor remote control: VMs on multiattach templates with QEMU, or VBoxManage commands",
    version
)]
struct Cli {
    /// The hypervisor: qemu (runs here) or vbox (VBoxManage).
    #[arg(long, value_enum, default_value_t = Backend::Qemu, global = true)]
    backend: Backend,
    /// The host folder of the QEMU backend (registry, VMs); required with --backend qemu.
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Print one JSON value instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// The QEMU accelerator: auto (KVM where a probe boot works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse_accel, global = true)]
    accel: Accel,
    /// With --backend vbox: print the VBoxManage commands instead of running them.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// QEMU: qemu-system-x86_64 and qemu-img.
    Qemu,
    /// VirtualBox: VBoxManage.
    Vbox,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register template images.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Create, run and inspect VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Take, restore, delete and draw snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Register a base image (qcow2 or raw), optionally as a multiattach template.
    Add {
        /// The image file.
        image: PathBuf,
        /// Make it a read-only multiattach template: each VM gets its own overlay.
        #[arg(long)]
        multiattach: bool,
        /// The kernel VMs on this template boot (default: `vmlinuz` beside the image).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Their initial RAM disk (default: `initrd.img` beside the image).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Extra kernel command-line words, as one argument.
        #[arg(long, allow_hyphen_values = true)]
        cmdline: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Create a VM with its own overlay of a template.
    Create {
        /// The new VM's name.
        name: String,
        /// The template: its uuid (from `template add`) or its path.
        #[arg(long)]
        template: String,
        /// Memory in MiB (default: the profile's).
        #[arg(long)]
        memory_mb: Option<u64>,
        /// Virtual CPUs (default: the profile's).
        #[arg(long)]
        cpus: Option<u32>,
        /// Hardware profile: small, medium, large or extra-large.
        #[arg(long, default_value = "small", value_parser = parse_profile)]
        profile: HardwareProfile,
        /// Network: none, user, or tap:<netns>:<ifname>:<ip/prefix>.
        #[arg(long, default_value = "none")]
        net: String,
    },
    /// Start a VM (from its saved state, if it has one).
    Start {
        /// VM name or uuid.
        name: String,
        /// Wait for the guest's first heartbeat on its console.
        #[arg(long)]
        wait_guest: bool,
        /// How long --wait-guest waits, in seconds.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Pull the plug.
    Poweroff {
        /// VM name or uuid.
        name: String,
    },
    /// Pause a running VM.
    Pause {
        /// VM name or uuid.
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM name or uuid.
        name: String,
    },
    /// Save a running VM's memory and stop it; the next start resumes it.
    SaveState {
        /// VM name or uuid.
        name: String,
    },
    /// A VM's state, process, hardware, disks and snapshots.
    Info {
        /// VM name or uuid.
        name: String,
    },
    /// Every VM with its state.
    List,
    /// Register a VM from its settings file (e.g. copied from another host).
    Register {
        /// The VM's settings file.
        settings: PathBuf,
    },
    /// The files to copy to resume the VM (or one snapshot) on another host.
    Files {
        /// VM name or uuid.
        name: String,
        /// A snapshot id or unique name (default: the current state).
        #[arg(long)]
        snapshot: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot (with the memory of a running VM).
    Take {
        /// VM name or uuid.
        vm: String,
        /// Snapshot name.
        name: String,
        /// Keep the guest running while its memory is written.
        #[arg(long)]
        live: bool,
        /// A description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Restore a snapshot (the VM must not be running).
    Restore {
        /// VM name or uuid.
        vm: String,
        /// Snapshot id or unique name.
        snapshot: String,
    },
    /// Delete a snapshot (the VM must not be running).
    Delete {
        /// VM name or uuid.
        vm: String,
        /// Snapshot id or unique name.
        snapshot: String,
    },
    /// Draw a VM's snapshot tree (text, or DOT with --dot, or JSON with --json).
    Tree {
        /// VM name or uuid.
        vm: String,
        /// Graphviz DOT instead of text.
        #[arg(long)]
        dot: bool,
    },
}

fn parse_profile(s: &str) -> Result<HardwareProfile, String> {
    s.parse::<HardwareProfile>().map_err(|e| e.to_string())
}

fn parse_accel(s: &str) -> Result<Accel, String> {
    s.parse::<Accel>().map_err(|e| e.to_string())
}

/// An error as one line: the message and its causes.
type Fallible<T> = Result<T, String>;

fn msg(e: impl std::error::Error) -> String {
    one_line(&e)
}

/// Parses `args` (program name first) and runs the command, writing results to `out` and
/// a one-line error to `err`; returns the exit code. `locate` finds VBoxManage and is
/// called only when VBoxManage commands must really run.
pub async fn run<F>(args: &[String], locate: F, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    F: FnOnce() -> Option<Arc<dyn CommandRunner>>,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = write!(out, "{e}");
                return 0;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = writeln!(err, "hv: a sub-command is missing (see --help)");
                return EXIT_FAILURE;
            }
            // One line: clap's first line, without the usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let _ = writeln!(err, "hv: {first} (see --help)");
            return EXIT_FAILURE;
        }
    };
    let result = match cli.backend {
        Backend::Qemu => run_qemu(&cli, out).await,
        Backend::Vbox => run_vbox(&cli, locate, out).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "hv: {}", e.replace('\n', " "));
            EXIT_FAILURE
        }
    }
}

fn emit_json(out: &mut dyn Write, v: &Value) -> Fallible<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(msg)?;
    text.push('\n');
    emit(out, &text)
}

/// Writes to `out`; a closed pipe (`| head`) is not an error.
fn emit(out: &mut dyn Write, text: &str) -> Fallible<()> {
    match out.write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(msg(e)),
        _ => Ok(()),
    }
}

// ---- QEMU ------------------------------------------------------------------------------

async fn run_qemu(cli: &Cli, out: &mut dyn Write) -> Fallible<()> {
    if cli.dry_run {
        return Err("--dry-run prints VBoxManage commands; it needs --backend vbox".to_owned());
    }
    let Some(root) = &cli.root else {
        return Err("--root <host dir> is required with --backend qemu".to_owned());
    };
    let hv = QemuHypervisor::open_configured(
        root,
        QemuImg::new(),
        QemuSystem::new().with_accel(cli.accel),
    )
    .await
    .map_err(|e| {
        format!(
            "cannot open the QEMU backend at {}: {}",
            root.display(),
            msg(e)
        )
    })?;
    let json = cli.json;
    match &cli.command {
        Command::Template(TemplateCommand::Add {
            image,
            multiattach,
            kernel,
            initrd,
            cmdline,
        }) => {
            template_add(
                &hv,
                image,
                *multiattach,
                kernel.as_deref(),
                initrd.as_deref(),
                cmdline.as_deref(),
                json,
                out,
            )
            .await
        }
        Command::Vm(VmCommand::Create {
            name,
            template,
            memory_mb,
            cpus,
            profile,
            net,
        }) => {
            let mut spec = VmSpec::new(name.clone(), *profile);
            spec.memory_mb = *memory_mb;
            spec.cores = *cpus;
            vm_create(&hv, &spec, template, net, json, out).await
        }
        Command::Vm(VmCommand::Start {
            name,
            wait_guest,
            wait_secs,
        }) => {
            let wait = wait_guest.then(|| Duration::from_secs(*wait_secs));
            vm_start(&hv, name, wait, json, out).await
        }
        Command::Vm(VmCommand::Poweroff { name }) => {
            let vm = VmId::from(name.as_str());
            hv.power_off(&vm).await.map_err(msg)?;
            print_state(&hv, &vm, json, out).await
        }
        Command::Vm(VmCommand::Pause { name }) => {
            let vm = VmId::from(name.as_str());
            hv.pause(&vm).await.map_err(msg)?;
            print_state(&hv, &vm, json, out).await
        }
        Command::Vm(VmCommand::Resume { name }) => {
            let vm = VmId::from(name.as_str());
            hv.resume(&vm).await.map_err(msg)?;
            print_state(&hv, &vm, json, out).await
        }
        Command::Vm(VmCommand::SaveState { name }) => {
            let vm = VmId::from(name.as_str());
            hv.save_state(&vm).await.map_err(msg)?;
            print_state(&hv, &vm, json, out).await
        }
        Command::Vm(VmCommand::Info { name }) => {
            let vm = VmId::from(name.as_str());
            let info = hv.vm_info(&vm).await.map_err(msg)?;
            print_vm(&hv, &info, json, out).await
        }
        Command::Vm(VmCommand::List) => vm_list(&hv, json, out).await,
        Command::Vm(VmCommand::Register { settings }) => {
            let info = hv.register_vm(settings).await.map_err(msg)?;
            print_vm(&hv, &info, json, out).await
        }
        Command::Vm(VmCommand::Files { name, snapshot }) => {
            vm_files(&hv, name, snapshot.as_deref(), json, out).await
        }
        Command::Snapshot(SnapshotCommand::Take {
            vm,
            name,
            live,
            description,
        }) => snapshot_take(&hv, vm, name, description.as_deref(), *live, json, out).await,
        Command::Snapshot(SnapshotCommand::Restore { vm, snapshot }) => {
            let id = VmId::from(vm.as_str());
            let (sid, sname) = resolve_snapshot(&hv, &id, snapshot).await?;
            hv.restore_snapshot(&id, &sid).await.map_err(msg)?;
            print_snapshot_done(&hv, &id, &sid, &sname, "restored", json, out).await
        }
        Command::Snapshot(SnapshotCommand::Delete { vm, snapshot }) => {
            let id = VmId::from(vm.as_str());
            let (sid, sname) = resolve_snapshot(&hv, &id, snapshot).await?;
            hv.delete_snapshot(&id, &sid).await.map_err(msg)?;
            print_snapshot_done(&hv, &id, &sid, &sname, "deleted", json, out).await
        }
        Command::Snapshot(SnapshotCommand::Tree { vm, dot }) => {
            let id = VmId::from(vm.as_str());
            let tree = hv.snapshot_tree(&id).await.map_err(msg)?;
            if json {
                emit_json(out, &serde_json::to_value(tree.to_json()).map_err(msg)?)
            } else if *dot {
                emit(out, &tree.render_dot())
            } else if tree.is_empty() {
                emit(out, &format!("{vm} has no snapshots\n"))
            } else {
                emit(out, &tree.render_text())
            }
        }
    }
}

/// The kernel and initrd a template boots with: the given ones, else `vmlinuz` and
/// `initrd.img` beside the image when both exist.
fn boot_files_for(
    image: &Path,
    kernel: Option<&Path>,
    initrd: Option<&Path>,
    cmdline: Option<&str>,
) -> Fallible<Option<BootFiles>> {
    let boot = match (kernel, initrd) {
        (Some(k), i) => Some(BootFiles {
            kernel: k.to_path_buf(),
            initrd: i.map(Path::to_path_buf),
            cmdline: cmdline.map(str::to_owned),
        }),
        (None, Some(_)) => return Err("--initrd needs --kernel".to_owned()),
        (None, None) => {
            let dir = image.parent().unwrap_or(Path::new("."));
            let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.img"));
            if k.is_file() && i.is_file() {
                Some(BootFiles {
                    kernel: k,
                    initrd: Some(i),
                    cmdline: cmdline.map(str::to_owned),
                })
            } else {
                None
            }
        }
    };
    if boot.is_none() && cmdline.is_some() {
        return Err(format!(
            "--cmdline needs a kernel: give --kernel, or put vmlinuz and initrd.img beside {}",
            image.display()
        ));
    }
    if let Some(b) = &boot {
        for f in std::iter::once(&b.kernel).chain(b.initrd.iter()) {
            if !f.is_file() {
                return Err(format!("boot file not found: {}", f.display()));
            }
        }
    }
    Ok(boot)
}

#[allow(clippy::too_many_arguments)]
async fn template_add(
    hv: &QemuHypervisor,
    image: &Path,
    multiattach: bool,
    kernel: Option<&Path>,
    initrd: Option<&Path>,
    cmdline: Option<&str>,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    let boot = boot_files_for(image, kernel, initrd, cmdline)?;
    let disk = hv.register_disk(image).await.map_err(msg)?;
    let dref = DiskRef::Uuid(disk.uuid);
    let configured = async {
        if multiattach {
            hv.set_disk_type(&dref, DiskType::MultiAttach).await?;
        }
        if let Some(b) = boot.clone() {
            hv.set_boot_files(&dref, b).await?;
        }
        Ok::<_, unacloud::cloud::Error>(())
    }
    .await;
    if let Err(e) = configured {
        // Leave nothing half-registered (and the file writable, as it was).
        let _ = hv.set_disk_type(&dref, DiskType::Normal).await;
        let _ = hv.unregister_disk(&dref, false).await;
        return Err(msg(e));
    }
    let disk_type = if multiattach {
        DiskType::MultiAttach
    } else {
        DiskType::Normal
    };
    let (k, i, c) = match &boot {
        Some(b) => (
            Some(canonical(&b.kernel)),
            b.initrd.as_deref().map(canonical),
            b.cmdline.clone(),
        ),
        None => (None, None, None),
    };
    if json {
        return emit_json(
            out,
            &json!({
                "uuid": disk.uuid.to_string(),
                "path": disk.location,
                "format": disk.format.to_string().to_ascii_lowercase(),
                "disk_type": disk_type.as_cli(),
                "virtual_size": disk.logical_size,
                "kernel": k,
                "initrd": i,
                "cmdline": c,
            }),
        );
    }
    let mut text = format!(
        "template {} {} ({})\n",
        disk.uuid,
        disk.location.display(),
        disk_type.as_cli()
    );
    if let Some(k) = &k {
        text.push_str(&format!("  kernel {}\n", k.display()));
    }
    if let Some(i) = &i {
        text.push_str(&format!("  initrd {}\n", i.display()));
    }
    emit(out, &text)
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn template_ref(text: &str) -> DiskRef {
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    match Uuid::try_parse(inner) {
        Ok(u) => DiskRef::Uuid(u),
        Err(_) => DiskRef::Path(PathBuf::from(text)),
    }
}

async fn vm_create(
    hv: &QemuHypervisor,
    spec: &VmSpec,
    template: &str,
    net: &str,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    // Check the network form before anything is created.
    NetConfig::parse(net, "52:54:00:00:00:00").map_err(|e| format!("--net: {}", msg(e)))?;
    let template = template_ref(template);
    let created = hv.create_vm(spec).await.map_err(msg)?;
    let vm = VmId::from(created.name.as_str());
    let configured = async {
        hv.attach_disk(&vm, &AttachSpec::sata(template)).await?;
        if let Some(uuid) = created.uuid {
            hv.set_vm_network(&vm, NetConfig::parse(net, &mac_for(&uuid))?)
                .await?;
        }
        Ok::<_, unacloud::cloud::Error>(())
    }
    .await;
    if let Err(e) = configured {
        let _ = hv.unregister_vm(&vm, true).await;
        return Err(msg(e));
    }
    let info = hv.vm_info(&vm).await.map_err(msg)?;
    print_vm(hv, &info, json, out).await
}

async fn vm_start(
    hv: &QemuHypervisor,
    name: &str,
    wait: Option<Duration>,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    let vm = VmId::from(name);
    let report = match hv
        .start_vm_with(&vm, StartOptions { wait_guest: wait })
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let mut text = msg(e);
            if let Ok(Some(pid)) = hv.vm_pid(&vm).await {
                text.push_str(&format!(
                    "; the VM is still running (pid {pid}): `hv vm poweroff {name}` stops it"
                ));
            }
            return Err(text);
        }
    };
    if json {
        let mut v = serde_json::to_value(&report).map_err(msg)?;
        if let Value::Object(m) = &mut v {
            m.insert("vm".to_owned(), json!(name));
        }
        return emit_json(out, &v);
    }
    let mut text = format!(
        "{name} running after {} ms ({}): pid {}, accel {}",
        report.running_ms,
        if report.resumed_state {
            "resumed its saved state"
        } else {
            "fresh boot"
        },
        report.pid,
        report.accel,
    );
    if let (Some(ms), Some(h)) = (report.boot_ms, report.first_heartbeat) {
        text.push_str(&format!("; first heartbeat ({h}) after {ms} ms"));
    }
    text.push_str(&format!("\n  console {}\n", report.console_log.display()));
    emit(out, &text)
}

async fn print_state(
    hv: &QemuHypervisor,
    vm: &VmId,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    let info = hv.vm_info(vm).await.map_err(msg)?;
    if json {
        emit_json(out, &json!({"vm": info.name, "state": info.state}))
    } else {
        emit(out, &format!("{}: {}\n", info.name, info.state))
    }
}

/// A VM's info with what the QEMU backend knows beyond it: its process, console,
/// disks' files, network and current snapshot's name.
async fn vm_json(hv: &QemuHypervisor, info: &VmInfo) -> Fallible<Value> {
    let vm = VmId::from(info.name.as_str());
    let settings = hv.vm_settings(&vm).await.map_err(msg)?;
    let pid = hv.vm_pid(&vm).await.map_err(msg)?;
    let (console_log, offset) = hv.console(&vm).await.map_err(msg)?;
    let heartbeat = last_heartbeat(&console_log, offset);
    let folder = info
        .settings_file
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let disks: Vec<Value> = settings
        .disks
        .iter()
        .map(|d| {
            let file = if d.file.is_absolute() {
                d.file.clone()
            } else {
                folder.join(&d.file)
            };
            json!({
                "controller": d.controller,
                "port": d.port,
                "device": d.device,
                "disk": d.uuid.to_string(),
                "file": file,
                "base": d.base.as_ref().map(|b| json!({"uuid": b.uuid.to_string(), "path": b.path})),
            })
        })
        .collect();
    let current_name = settings.current_snapshot.as_deref().and_then(|tag| {
        settings
            .snapshots
            .iter()
            .find(|s| s.tag == tag)
            .map(|s| s.name.clone())
    });
    Ok(json!({
        "name": info.name,
        "uuid": info.uuid.map(|u| u.to_string()),
        "state": info.state,
        "pid": pid,
        "memory_mb": info.memory_mb,
        "cores": info.cores,
        "disks": disks,
        "current_snapshot": info.current_snapshot,
        "current_snapshot_name": current_name,
        "snapshots": settings.snapshots.len(),
        "settings_file": info.settings_file,
        "template": info.template,
        "net": settings.net,
        "console_log": console_log,
        "console_offset": offset,
        "last_heartbeat": heartbeat,
    }))
}

async fn print_vm(
    hv: &QemuHypervisor,
    info: &VmInfo,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    let v = vm_json(hv, info).await?;
    if json {
        return emit_json(out, &v);
    }
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut text = String::new();
    text.push_str(&format!("name:       {}\n", info.name));
    text.push_str(&format!("uuid:       {}\n", s("uuid")));
    text.push_str(&format!("state:      {}\n", info.state));
    text.push_str(&format!("pid:        {}\n", s("pid")));
    text.push_str(&format!("cpus:       {}\n", info.cores));
    text.push_str(&format!("memory:     {} MB\n", info.memory_mb));
    if let Value::Array(disks) = &v["disks"] {
        for d in disks {
            let f = |k: &str| match &d[k] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.push_str(&format!(
                "disk:       {} {}:{} {} {}\n",
                f("controller"),
                f("port"),
                f("device"),
                f("disk"),
                f("file")
            ));
        }
    }
    text.push_str(&format!("snapshots:  {}\n", s("snapshots")));
    if info.current_snapshot.is_some() {
        text.push_str(&format!(
            "current:    {} [{}]\n",
            s("current_snapshot_name"),
            s("current_snapshot")
        ));
    }
    text.push_str(&format!("settings:   {}\n", s("settings_file")));
    text.push_str(&format!("console:    {}\n", s("console_log")));
    text.push_str(&format!("heartbeat:  {}\n", s("last_heartbeat")));
    emit(out, &text)
}

async fn vm_list(hv: &QemuHypervisor, json: bool, out: &mut dyn Write) -> Fallible<()> {
    let vms = hv.list_vms().await.map_err(msg)?;
    let mut rows = Vec::with_capacity(vms.len());
    for info in &vms {
        let pid = hv
            .vm_pid(&VmId::from(info.name.as_str()))
            .await
            .map_err(msg)?;
        rows.push((info, pid));
    }
    if json {
        let arr: Vec<Value> = rows
            .iter()
            .map(|(i, pid)| {
                json!({
                    "name": i.name,
                    "uuid": i.uuid.map(|u| u.to_string()),
                    "state": i.state,
                    "pid": pid,
                })
            })
            .collect();
        return emit_json(out, &Value::Array(arr));
    }
    let mut text = format!("{:<20} {:<12} {:>8}  UUID\n", "NAME", "STATE", "PID");
    for (i, pid) in &rows {
        text.push_str(&format!(
            "{:<20} {:<12} {:>8}  {}\n",
            i.name,
            i.state.to_string(),
            pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            i.uuid.map(|u| u.to_string()).unwrap_or_default()
        ));
    }
    emit(out, &text)
}

/// A snapshot's id and name from an id or a unique name.
async fn resolve_snapshot(
    hv: &QemuHypervisor,
    vm: &VmId,
    selector: &str,
) -> Fallible<(String, String)> {
    let tree = hv.snapshot_tree(vm).await.map_err(msg)?;
    let node = tree.resolve(selector).map_err(msg)?;
    let s = tree
        .get(node)
        .ok_or_else(|| format!("snapshot not found: {selector}"))?;
    Ok((s.id.clone(), s.name.clone()))
}

async fn vm_files(
    hv: &QemuHypervisor,
    name: &str,
    snapshot: Option<&str>,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    let vm = VmId::from(name);
    let info = hv.vm_info(&vm).await.map_err(msg)?;
    let (set, snap): (MigrationSet, Option<(String, String)>) = match snapshot {
        Some(sel) => {
            let (id, sname) = resolve_snapshot(hv, &vm, sel).await?;
            let set = hv.snapshot_files(&vm, &id).await.map_err(msg)?;
            (set, Some((id, sname)))
        }
        None => (hv.vm_files(&vm).await.map_err(msg)?, None),
    };
    let uuid = info.uuid.map(|u| u.to_string());
    if json {
        return emit_json(
            out,
            &json!({
                "machine": {"uuid": uuid, "name": info.name},
                "snapshot": match &snap {
                    Some((id, n)) => json!({"uuid": id, "name": n}),
                    None => json!({"uuid": null, "name": "current"}),
                },
                "files": set.files,
                "total_bytes": set.total_bytes(),
                "expected_at_destination": set.expected_at_destination,
                "external": set.external,
                "warnings": set.warnings,
            }),
        );
    }
    let mut text = String::new();
    text.push_str(&format!(
        "Machine:  {} {{{}}}\n",
        info.name,
        uuid.as_deref().unwrap_or("-")
    ));
    match &snap {
        Some((id, n)) => text.push_str(&format!("Snapshot: {n:?} [{id}]\n")),
        None => text.push_str("Snapshot: current state\n"),
    }
    text.push('\n');
    text.push_str(&format!(
        "{:<12} {:>12}  {:<36}  PATH\n",
        "ROLE", "SIZE", "UUID"
    ));
    for f in &set.files {
        text.push_str(&format!(
            "{:<12} {:>12}  {:<36}  {}\n",
            f.role.as_str(),
            f.bytes.map_or_else(|| "missing".to_owned(), human),
            f.uuid.as_deref().unwrap_or("-"),
            f.path.display()
        ));
    }
    text.push_str(&format!(
        "\nTotal: {} files, {:.2} GB ({} bytes)\n",
        set.files.len(),
        set.total_bytes() as f64 / 1e9,
        set.total_bytes()
    ));
    if !set.expected_at_destination.is_empty() {
        text.push_str("\nExpected at destination (not copied):\n");
        for e in &set.expected_at_destination {
            let path = e
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            text.push_str(&format!("  {}  {path}\n", e.uuid));
        }
    }
    if !set.external.is_empty() {
        text.push_str("\nExternal dependencies (not copied):\n");
        for e in &set.external {
            text.push_str(&format!("  {e}\n"));
        }
    }
    if !set.warnings.is_empty() {
        text.push_str("\nWarnings:\n");
        for w in &set.warnings {
            text.push_str(&format!("  {w}\n"));
        }
    }
    emit(out, &text)
}

/// Decimal units, as the thesis's tables use (1 GB = 10⁹ bytes).
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

async fn snapshot_take(
    hv: &QemuHypervisor,
    vm: &str,
    name: &str,
    description: Option<&str>,
    live: bool,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    let id = VmId::from(vm);
    let r = hv
        .take_snapshot_with(&id, name, description, live)
        .await
        .map_err(msg)?;
    if json {
        return emit_json(
            out,
            &json!({
                "vm": vm,
                "id": r.snapshot.id,
                "name": r.snapshot.name,
                "with_memory": r.with_memory,
                "background": r.background,
                "downtime_ms": r.downtime_ms,
                "total_ms": r.total_ms,
                "state_bytes": r.state_bytes,
            }),
        );
    }
    let memory = if r.with_memory {
        format!(
            "memory {} ({})",
            human(r.state_bytes),
            if r.background {
                "written while the guest ran"
            } else {
                "written while the guest was paused"
            }
        )
    } else {
        "disks only".to_owned()
    };
    emit(
        out,
        &format!(
            "snapshot {:?} [{}] of {vm}: guest paused {:.1} ms, total {:.1} ms, {memory}\n",
            r.snapshot.name, r.snapshot.id, r.downtime_ms, r.total_ms
        ),
    )
}

async fn print_snapshot_done(
    hv: &QemuHypervisor,
    vm: &VmId,
    id: &str,
    name: &str,
    what: &str,
    json: bool,
    out: &mut dyn Write,
) -> Fallible<()> {
    let info = hv.vm_info(vm).await.map_err(msg)?;
    if json {
        return emit_json(
            out,
            &json!({
                "vm": info.name,
                "snapshot": {"id": id, "name": name},
                "state": info.state,
                "current_snapshot": info.current_snapshot,
            }),
        );
    }
    emit(
        out,
        &format!(
            "snapshot {name:?} [{id}] of {} {what}; the VM is {}\n",
            info.name, info.state
        ),
    )
}

// ---- VirtualBox ------------------------------------------------------------------------

/// The name of a verb as typed.
fn verb(cmd: &Command) -> &'static str {
    match cmd {
        Command::Template(TemplateCommand::Add { .. }) => "template add",
        Command::Vm(v) => match v {
            VmCommand::Create { .. } => "vm create",
            VmCommand::Start { .. } => "vm start",
            VmCommand::Poweroff { .. } => "vm poweroff",
            VmCommand::Pause { .. } => "vm pause",
            VmCommand::Resume { .. } => "vm resume",
            VmCommand::SaveState { .. } => "vm save-state",
            VmCommand::Info { .. } => "vm info",
            VmCommand::List => "vm list",
            VmCommand::Register { .. } => "vm register",
            VmCommand::Files { .. } => "vm files",
        },
        Command::Snapshot(s) => match s {
            SnapshotCommand::Take { .. } => "snapshot take",
            SnapshotCommand::Restore { .. } => "snapshot restore",
            SnapshotCommand::Delete { .. } => "snapshot delete",
            SnapshotCommand::Tree { .. } => "snapshot tree",
        },
    }
}

/// The VBoxManage commands a verb runs, built with the library's command builders.
fn vbox_plan(cmd: &Command) -> Fallible<Vec<VBoxCommand>> {
    let control = |vm: &str, a| vec![vbox_cmd::control_vm(vm, a)];
    Ok(match cmd {
        Command::Vm(VmCommand::Start {
            name, wait_guest, ..
        }) => {
            if *wait_guest {
                return Err(
                    "--wait-guest watches the QEMU guest's console; it has no VBoxManage equivalent"
                        .to_owned(),
                );
            }
            vec![vbox_cmd::start_vm(name, StartMode::Headless)]
        }
        Command::Vm(VmCommand::Poweroff { name }) => control(name, ControlAction::PowerOff),
        Command::Vm(VmCommand::Pause { name }) => control(name, ControlAction::Pause),
        Command::Vm(VmCommand::Resume { name }) => control(name, ControlAction::Resume),
        Command::Vm(VmCommand::SaveState { name }) => control(name, ControlAction::SaveState),
        Command::Vm(VmCommand::Info { name }) => vec![vbox_cmd::show_vm_info(name)],
        Command::Vm(VmCommand::List) => vec![vbox_cmd::list_vms()],
        Command::Vm(VmCommand::Register { settings }) => {
            // VirtualBox wants an absolute path.
            let abs = std::path::absolute(settings).map_err(msg)?;
            vec![vbox_cmd::register_vm(&abs).map_err(msg)?]
        }
        Command::Snapshot(SnapshotCommand::Take {
            vm,
            name,
            live,
            description,
        }) => vec![vbox_cmd::snapshot_take(
            vm,
            name,
            description.as_deref(),
            *live,
        )],
        Command::Snapshot(SnapshotCommand::Restore { vm, snapshot }) => {
            vec![vbox_cmd::snapshot_restore(vm, snapshot)]
        }
        Command::Snapshot(SnapshotCommand::Delete { vm, snapshot }) => {
            vec![vbox_cmd::snapshot_delete(vm, snapshot)]
        }
        other => {
            return Err(format!(
                "{} has no VBoxManage equivalent here; --backend vbox supports vm start, \
                 poweroff, pause, resume, save-state, info, list, register and snapshot take, \
                 restore, delete (use --backend qemu for the rest)",
                verb(other)
            ))
        }
    })
}

async fn run_vbox<F>(cli: &Cli, locate: F, out: &mut dyn Write) -> Fallible<()>
where
    F: FnOnce() -> Option<Arc<dyn CommandRunner>>,
{
    let cmds = vbox_plan(&cli.command)?;
    if cli.dry_run {
        let mut text = String::new();
        for c in &cmds {
            text.push_str(&c.shell_line());
            text.push('\n');
        }
        return emit(out, &text);
    }
    let Some(runner) = locate() else {
        return Err(
            "VBoxManage was not found on PATH; install VirtualBox, or add --dry-run to print \
             the VBoxManage commands instead"
                .to_owned(),
        );
    };
    let hv = VBoxManageHypervisor::new(runner);
    let json = cli.json;
    match &cli.command {
        Command::Vm(VmCommand::Info { name }) => {
            let d = hv.details(name).await.map_err(msg)?;
            let disks: Vec<Value> = d
                .disk_attachments()
                .iter()
                .map(|a| {
                    json!({"controller": a.controller, "port": a.port, "device": a.device,
                           "disk": a.disk.to_string()})
                })
                .collect();
            let v = json!({
                "name": d.name,
                "uuid": d.uuid.map(|u| u.to_string()),
                "state": d.state,
                "memory_mb": d.memory_mb,
                "cores": d.cpus,
                "disks": disks,
                "current_snapshot": d.current_snapshot,
                "snapshots": d.snapshots.len(),
                "settings_file": d.settings_file,
            });
            if json {
                return emit_json(out, &v);
            }
            let mut text = format!("name:       {}\n", d.name);
            if let Some(u) = d.uuid {
                text.push_str(&format!("uuid:       {u}\n"));
            }
            text.push_str(&format!("state:      {}\n", d.state));
            if let Some(c) = d.cpus {
                text.push_str(&format!("cpus:       {c}\n"));
            }
            if let Some(m) = d.memory_mb {
                text.push_str(&format!("memory:     {m} MB\n"));
            }
            for a in d.disk_attachments() {
                text.push_str(&format!(
                    "disk:       {} {}:{} {}\n",
                    a.controller, a.port, a.device, a.disk
                ));
            }
            text.push_str(&format!("snapshots:  {}\n", d.snapshots.len()));
            if let Some(c) = &d.current_snapshot {
                text.push_str(&format!("current:    {c}\n"));
            }
            if let Some(f) = &d.settings_file {
                text.push_str(&format!("settings:   {}\n", f.display()));
            }
            emit(out, &text)
        }
        Command::Vm(VmCommand::List) => {
            let o = hv.exec(&cmds[0]).await.map_err(msg)?;
            let vms = parse::parse_vm_list(&o.stdout);
            if json {
                let arr: Vec<Value> = vms
                    .iter()
                    .map(|v| json!({"name": v.name, "uuid": v.uuid.to_string()}))
                    .collect();
                return emit_json(out, &Value::Array(arr));
            }
            let mut text = String::new();
            for v in &vms {
                text.push_str(&format!("{}  {}\n", v.uuid, v.name));
            }
            emit(out, &text)
        }
        Command::Snapshot(SnapshotCommand::Take { vm, name, .. }) => {
            let o = hv.exec(&cmds[0]).await.map_err(msg)?;
            let id = parse::parse_snapshot_taken(&o.stdout).map(|u| u.to_string());
            if json {
                return emit_json(out, &json!({"vm": vm, "id": id, "name": name}));
            }
            match id {
                Some(u) => emit(out, &format!("snapshot taken: {u}\n")),
                None => emit(out, &o.stdout),
            }
        }
        _ => {
            let mut outputs = Vec::new();
            for c in &cmds {
                outputs.push(hv.exec(c).await.map_err(msg)?);
            }
            if json {
                let target = cmds.first().and_then(|c| c.target()).unwrap_or_default();
                let done: Vec<&str> = cmds.iter().map(VBoxCommand::operation).collect();
                return emit_json(out, &json!({"vm": target, "done": done}));
            }
            for o in &outputs {
                emit(out, &o.stdout)?;
            }
            Ok(())
        }
    }
}

fn real_runner() -> Option<Arc<dyn CommandRunner>> {
    locate_vboxmanage(std::env::var_os("PATH"))
        .map(|p| Arc::new(TokioRunner::new(p)) as Arc<dyn CommandRunner>)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let args: Vec<String> = std::env::args().collect();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let code = run(&args, real_runner, &mut out, &mut err).await;
    let _ = out.flush();
    std::process::exit(code);
}
