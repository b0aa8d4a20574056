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

#[path = "hv/qemu.rs"]
mod qemu;
#[path = "hv/show.rs"]
mod show;
#[path = "hv/vbox.rs"]
mod vbox;

use qemu::*;
use show::*;
use vbox::*;

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
