//! `vbox`: remote control of VirtualBox VMs through `VBoxManage` (the thesis's
//! "Hypervisor Remote Control"), scriptable and with a dry-run mode.
//!
//! ```text
//! cargo run --release --example vbox -- [--dry-run] <sub-command>
//!
//!   list                                   registered VMs and which are running
//!   info <vm>                              state, hardware, disks, snapshots
//!   start <vm> [--gui]                     start headless (or with a window)
//!   snapshot take <vm> <name> [--live] [--description <text>]
//!   snapshot restore <vm> <snapshot>
//!   snapshot list <vm> [--tree]
//!   provision --template <image> --vm <name> --profile small|medium|large|extra-large
//!             [--bridge <host interface>] [--ostype <type>] [--basefolder <dir>]
//!   migrate-set <machine.vbox> --snapshot <uuid|name|current>
//!             [--global-registry <VirtualBox.xml>] [--preloaded <uuid>]...
//! ```
//!
//! `--dry-run` (before the sub-command) prints each VBoxManage command it would run as
//! one line quoted for a POSIX shell, and nothing else, e.g.
//! `vbox --dry-run snapshot take TM "Snapshot 1" --live` prints
//! `VBoxManage snapshot TM take 'Snapshot 1' --live`. `migrate-set` only reads the
//! settings file and prints the files to copy, one per line. Errors are one line on
//! standard error and exit code 2.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use unacloud::cloud::model::{HardwareProfile, Uuid};
use unacloud::vbox::manage::cli::{execute, CliCommand, EXIT_FAILURE};
use unacloud::vbox::manage::{locate_vboxmanage, CommandRunner, TokioRunner};

#[derive(Debug, Parser)]
#[command(
    name = "vbox",
    about = "Remote control of VirtualBox VMs through VBoxManage",
    version
)]
struct Cli {
    /// Print the VBoxManage commands instead of running them.
    #[arg(long)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List registered VMs and which are running.
    List,
    /// Show a VM's state, hardware, disks and snapshots.
    Info {
        /// VM name or uuid.
        vm: String,
    },
    /// Start a VM headless.
    Start {
        /// VM name or uuid.
        vm: String,
        /// Open a window instead.
        #[arg(long)]
        gui: bool,
    },
    /// Take, restore or list snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Create a VM on a multiattach template.
    Provision {
        /// The template disk image.
        #[arg(long)]
        template: PathBuf,
        /// The new VM's name.
        #[arg(long)]
        vm: String,
        /// Hardware profile: small, medium, large or extra-large.
        #[arg(long, value_parser = parse_profile)]
        profile: HardwareProfile,
        /// Bridge the first network adapter to this host interface.
        #[arg(long)]
        bridge: Option<String>,
        /// Guest OS type (VBoxManage --ostype).
        #[arg(long)]
        ostype: Option<String>,
        /// Folder for the VM (VBoxManage --basefolder).
        #[arg(long)]
        basefolder: Option<PathBuf>,
    },
    /// Print the files to copy to resume a snapshot on another host, one per line.
    MigrateSet {
        /// The machine's .vbox settings file.
        settings: PathBuf,
        /// Snapshot uuid or unique name, or `current`.
        #[arg(long)]
        snapshot: String,
        /// The global VirtualBox.xml registering templates the machine uses.
        #[arg(long)]
        global_registry: Option<PathBuf>,
        /// Images already present at the destination (repeatable).
        #[arg(long)]
        preloaded: Vec<Uuid>,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot.
    Take {
        /// VM name or uuid.
        vm: String,
        /// Snapshot name.
        name: String,
        /// Keep the VM running while the snapshot is taken.
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
        /// Snapshot name or uuid.
        snapshot: String,
    },
    /// List a VM's snapshots.
    List {
        /// VM name or uuid.
        vm: String,
        /// Draw the tree.
        #[arg(long)]
        tree: bool,
    },
}

fn parse_profile(s: &str) -> Result<HardwareProfile, String> {
    s.parse::<HardwareProfile>().map_err(|e| e.to_string())
}

impl From<Command> for CliCommand {
    fn from(c: Command) -> Self {
        match c {
            Command::List => CliCommand::List,
            Command::Info { vm } => CliCommand::Info { vm },
            Command::Start { vm, gui } => CliCommand::Start { vm, gui },
            Command::Snapshot(SnapshotCommand::Take {
                vm,
                name,
                live,
                description,
            }) => CliCommand::SnapshotTake {
                vm,
                name,
                description,
                live,
            },
            Command::Snapshot(SnapshotCommand::Restore { vm, snapshot }) => {
                CliCommand::SnapshotRestore { vm, snapshot }
            }
            Command::Snapshot(SnapshotCommand::List { vm, tree }) => {
                CliCommand::SnapshotList { vm, tree }
            }
            Command::Provision {
                template,
                vm,
                profile,
                bridge,
                ostype,
                basefolder,
            } => CliCommand::Provision {
                template,
                vm,
                profile,
                bridge,
                os_type: ostype,
                base_folder: basefolder,
            },
            Command::MigrateSet {
                settings,
                snapshot,
                global_registry,
                preloaded,
            } => CliCommand::MigrateSet {
                settings,
                snapshot,
                global_registry,
                preloaded,
            },
        }
    }
}

/// Parses `args` (program name first) and runs the command; returns the exit code.
async fn run<F>(args: &[String], locate: F, out: &mut dyn Write, err: &mut dyn Write) -> i32
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
                let _ = writeln!(err, "error: a sub-command is missing (see --help)");
                return EXIT_FAILURE;
            }
            // One line: clap's first line ("error: …"), without the usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            let _ = writeln!(err, "{first} (see --help)");
            return EXIT_FAILURE;
        }
    };
    let cmd = CliCommand::from(cli.command);
    execute(&cmd, cli.dry_run, locate, out, err).await
}

fn real_runner() -> Option<Arc<dyn CommandRunner>> {
    locate_vboxmanage(std::env::var_os("PATH"))
        .map(|p| Arc::new(TokioRunner::new(p)) as Arc<dyn CommandRunner>)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let code = run(&args, real_runner, &mut out, &mut err).await;
    let _ = out.flush();
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use unacloud::vbox::manage::ReplayRunner;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/")).join(rel)
    }

    async fn vbox(
        args: &[&str],
        locate: impl FnOnce() -> Option<Arc<dyn CommandRunner>>,
    ) -> (i32, String, String) {
        let mut argv = vec!["vbox".to_owned()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = run(&argv, locate, &mut out, &mut err).await;
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    async fn dry(args: &[&str]) -> String {
        let mut a = vec!["--dry-run"];
        a.extend_from_slice(args);
        let (code, out, err) = vbox(&a, || panic!("a dry run must not look for VBoxManage")).await;
        assert_eq!((code, err.as_str()), (0, ""), "{args:?}");
        out
    }

    #[tokio::test]
    async fn acceptance_forms() {
        assert_eq!(
            dry(&["snapshot", "take", "TM", "Snapshot 1", "--live"]).await,
            "VBoxManage snapshot TM take 'Snapshot 1' --live\n"
        );
        assert_eq!(
            dry(&["snapshot", "restore", "TM", "Snapshot 1"]).await,
            "VBoxManage snapshot TM restore 'Snapshot 1'\n"
        );
        assert_eq!(
            dry(&["start", "TM"]).await,
            "VBoxManage startvm TM --type headless\n"
        );
        assert_eq!(
            dry(&["provision", "--template", "/t/base.vdi", "--vm", "web1", "--profile", "medium"]).await,
            "VBoxManage createvm --name web1 --register\n\
             VBoxManage modifyvm web1 --cpus 2 --memory 2048\n\
             VBoxManage storagectl web1 --name SATA --add sata --controller IntelAhci\n\
             VBoxManage storageattach web1 --storagectl SATA --port 0 --device 0 --type hdd --medium /t/base.vdi --mtype multiattach\n"
        );
        assert_eq!(
            dry(&["provision", "--template", "/t/base.vdi", "--vm", "web1", "--profile", "small", "--bridge", "eth0"])
                .await
                .lines()
                .nth(1),
            Some("VBoxManage modifyvm web1 --cpus 1 --memory 1024 --nic1 bridged --bridgeadapter1 eth0")
        );
        assert_eq!(
            dry(&["list"]).await,
            "VBoxManage list vms\nVBoxManage list runningvms\n"
        );
        assert_eq!(
            dry(&["info", "TM"]).await,
            "VBoxManage showvminfo TM --machinereadable\n"
        );
        assert_eq!(
            dry(&["snapshot", "list", "TM", "--tree"]).await,
            "VBoxManage snapshot TM list --machinereadable\n"
        );
    }

    #[tokio::test]
    async fn migrate_set_prints_the_files_one_per_line() {
        let vbox_file = fixture("vbox/joco-kad__teaching__Meta.vbox");
        let migrate = |snapshot: &'static str| {
            let f = vbox_file.to_str().unwrap().to_owned();
            async move {
                let (code, out, err) = vbox(
                    &["--dry-run", "migrate-set", &f, "--snapshot", snapshot],
                    || None,
                )
                .await;
                assert_eq!(code, 0, "{err}");
                // The fixture comes without its disks: missing files are warnings on stderr.
                assert!(
                    err.lines().all(|l| l.starts_with("warning: missing file")),
                    "{err}"
                );
                out
            }
        };
        let out = migrate("Root. End Practice One").await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], vbox_file.to_str().unwrap());
        assert!(
            lines.iter().any(|l| l.ends_with("Metasploitable.vmdk")),
            "{out}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("{3ff2d7f3-5f4c-49af-b1f2-43deef3e5743}.vmdk")),
            "{out}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("2023-01-01T09-50-03-442257300Z.sav")),
            "{out}"
        );
        // The other branch's disk is not needed.
        assert!(!out.contains("47ee5431"), "{out}");
        // By uuid too.
        let by_uuid = migrate("f92e4f98-f883-4a18-a20f-7d552eecc797").await;
        assert_eq!(by_uuid, out);
    }

    #[tokio::test]
    async fn migrate_set_escapes_hostile_locations() {
        let dir = tempfile::tempdir().unwrap();
        let vbox_file = dir.path().join("TM.vbox");
        std::fs::write(
            &vbox_file,
            r#"<VirtualBox version="1.19-linux"><Machine uuid="{11111111-1111-1111-1111-111111111111}" name="TM" OSType="Linux" stateFile="Snapshots/a&#10;/etc/shadow&#27;[2K.sav">
            <Hardware/></Machine></VirtualBox>"#,
        )
        .unwrap();
        let f = vbox_file.to_str().unwrap().to_owned();
        let (code, out, err) = vbox(&["migrate-set", &f, "--snapshot", "current"], || None).await;
        assert_eq!(code, 0, "{err}");
        // Two files, two lines: the settings and the saved state, escaped.
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(out.contains("Snapshots/a\\n/etc/shadow"), "{out}");
        assert!(
            !out.contains('\u{1b}') && !err.contains('\u{1b}'),
            "{out:?} {err:?}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[tokio::test]
    async fn without_vboxmanage_one_line_and_exit_2() {
        let (code, out, err) = vbox(&["start", "TM"], || None).await;
        assert_eq!(code, 2);
        assert_eq!(out, "");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("VBoxManage was not found"), "{err}");
        assert!(err.contains("--dry-run"), "{err}");
    }

    #[tokio::test]
    async fn errors_are_one_line_with_exit_2() {
        for args in [
            vec![
                "provision",
                "--template",
                "/t/base.vdi",
                "--vm",
                "web1",
                "--profile",
                "huge",
            ],
            vec!["snapshot", "take", "TM"],
            vec!["frobnicate"],
            vec!["snapshot"],
            vec!["migrate-set", "/nonexistent/x.vbox", "--snapshot", "s"],
        ] {
            let mut a = vec!["--dry-run"];
            a.extend(args.iter().copied());
            let (code, out, err) = vbox(&a, || None).await;
            assert_eq!(code, 2, "{args:?}");
            assert_eq!(out, "", "{args:?}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
        // A snapshot name that matches nothing.
        let vbox_file = fixture("vbox/joco-kad__teaching__Meta.vbox");
        let (code, _, err) = vbox(
            &[
                "migrate-set",
                vbox_file.to_str().unwrap(),
                "--snapshot",
                "nope",
            ],
            || None,
        )
        .await;
        assert_eq!((code, err.lines().count()), (2, 1), "{err}");
    }

    #[tokio::test]
    async fn real_mode_runs_the_same_commands_and_reports_vboxmanage_errors() {
        let shared = Arc::new(
            ReplayRunner::new()
                .then_ok(
                    std::fs::read_to_string(fixture(
                        "vboxmanage/snapshot-take__unidentified-vbox-aliases-readme__1.txt",
                    ))
                    .unwrap(),
                )
                .then_err(
                    std::fs::read_to_string(fixture(
                        "vboxmanage/error-vm-not-found-windows__macos-virtualbox-issue9__1.txt",
                    ))
                    .unwrap(),
                ),
        );
        let r = shared.clone();
        let (code, out, _) = vbox(
            &["snapshot", "take", "TM", "Snapshot 1", "--live"],
            move || Some(r as Arc<dyn CommandRunner>),
        )
        .await;
        assert_eq!(
            (code, out.as_str()),
            (0, "snapshot taken: 947ad21d-2cad-4e64-80cc-2ff819d1be4e\n")
        );
        let r = shared.clone();
        let (code, _, err) = vbox(&["start", "Mojave"], move || {
            Some(r as Arc<dyn CommandRunner>)
        })
        .await;
        assert_eq!(code, 2);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("Could not find a registered machine named 'Mojave'"),
            "{err}"
        );
        assert_eq!(
            shared.lines(),
            [
                "VBoxManage snapshot TM take 'Snapshot 1' --live",
                "VBoxManage startvm Mojave --type headless"
            ]
        );
    }

    #[tokio::test]
    async fn snapshot_list_tree_in_real_mode() {
        let r = Arc::new(
            ReplayRunner::new().then_ok(
                std::fs::read_to_string(fixture(
                    "vboxmanage/snapshot-list-machinereadable__packer-plugin-virtualbox__1.txt",
                ))
                .unwrap(),
            ),
        );
        let (code, out, _) = vbox(&["snapshot", "list", "packer", "--tree"], move || {
            Some(r as Arc<dyn CommandRunner>)
        })
        .await;
        assert_eq!(code, 0);
        assert!(
            out.starts_with("Imported [7e5b4165-91ec-4091-a74c-a5709d584530]\n"),
            "{out}"
        );
        assert!(
            out.contains("Snapshot-Export [c857d1b8-4fd6-4044-9d2c-c6e465b3cdd4] *"),
            "{out}"
        );
    }
}
