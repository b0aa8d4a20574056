//! The core's hypervisor conformance suite run against the VirtualBox backend.
//!
//! VirtualBox cannot run on the build machines, so the backend talks to a small
//! simulation of `VBoxManage`: a [`CommandRunner`] that keeps VMs, media and snapshots
//! in memory and answers each command line with output in VBoxManage's formats — the
//! layouts of the real samples in `shared/fixtures/vboxmanage/` (`createvm`'s three
//! lines, `--machinereadable` keys, `list hdds` records, `Snapshot taken. UUID:`, the
//! `VBoxManage: error:` / `Details: code …` error layout). The contents are simulated;
//! error messages other than "Could not find a registered machine named" are worded by
//! this test, with the status codes VirtualBox defines for those situations. The
//! simulation also writes a minimal `.vbox` per VM so the backend can read snapshot
//! state files as it does on a real host.
//!
//! Why a simulation and not a replay of recorded VBoxManage runs: the suite needs one
//! consistent session (the uuids `createvm` prints must come back in `showvminfo`, the
//! snapshot taken must appear in `snapshot list`), and the real outputs available are
//! single commands collected from unrelated machines and VirtualBox versions, not a
//! session of one VM. Recording such a session needs a host with VirtualBox, which the
//! project's build machines cannot install; until one is recorded, the simulation keeps
//! the real outputs' layouts and the parsers are tested against the real outputs
//! themselves (`manage_parse`).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use unacloud_core::conformance::{self, ConformanceEnv};
use unacloud_core::model::Uuid;
use unacloud_core::tree::{Snapshot, SnapshotTree};
use unacloud_vbox::manage::parse::render_machine_readable;
use unacloud_vbox::manage::{CommandOutput, CommandRunner, VBoxCommand, VBoxManageHypervisor};

#[derive(Debug, Clone)]
struct Snap {
    uuid: Uuid,
    name: String,
    parent: Option<usize>,
    state_file: Option<String>,
}

#[derive(Debug, Clone)]
struct Vm {
    uuid: Uuid,
    name: String,
    state: &'static str,
    cpus: u32,
    memory: u64,
    controllers: Vec<String>,
    attachments: Vec<(String, u32, u32, Uuid)>,
    snapshots: Vec<Snap>,
    snapshot_disks: Vec<Vec<(String, u32, u32, Uuid)>>,
    current: Option<usize>,
    dir: PathBuf,
}

#[derive(Debug, Clone)]
struct Medium {
    uuid: Uuid,
    location: String,
    mtype: &'static str,
    parent: Option<Uuid>,
    owner: Option<Uuid>,
}

#[derive(Debug)]
struct State {
    root: PathBuf,
    next: u128,
    vms: Vec<Vm>,
    media: Vec<Medium>,
}

#[derive(Debug)]
struct SimVBoxManage {
    state: Mutex<State>,
    log: Mutex<Vec<String>>,
}

fn ok(stdout: impl Into<String>) -> CommandOutput {
    CommandOutput::ok(stdout)
}

fn vbox_error(msg: &str, code: &str, hex: &str, component: &str, interface: &str) -> CommandOutput {
    CommandOutput::failed(
        1,
        format!(
            "VBoxManage: error: {msg}\nVBoxManage: error: Details: code {code} ({hex}), component {component}, interface {interface}, callee nsISupports\nVBoxManage: error: Context: \"simulated\" at line 1 of file VBoxManageSim.cpp\n"
        ),
    )
}

fn not_found(vm: &str) -> CommandOutput {
    vbox_error(
        &format!("Could not find a registered machine named '{vm}'"),
        "VBOX_E_OBJECT_NOT_FOUND",
        "0x80bb0001",
        "VirtualBoxWrap",
        "IVirtualBox",
    )
}

const PROGRESS: &str = "0%...10%...20%...30%...40%...50%...60%...70%...80%...90%...100%\n";

fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

impl State {
    fn uuid(&mut self) -> Uuid {
        self.next += 1;
        Uuid::from_u128(0x5151_0000_0000_4000_8000_0000_0000_0000 | self.next)
    }

    fn vm(&mut self, id: &str) -> Option<&mut Vm> {
        self.vms
            .iter_mut()
            .find(|v| v.name == id || v.uuid.to_string() == id)
    }

    fn medium(&self, r: &str) -> Option<&Medium> {
        self.media
            .iter()
            .find(|m| m.uuid.to_string() == r || m.location == r)
    }

    fn tree(vm: &Vm) -> SnapshotTree {
        let mut t = SnapshotTree::new();
        let mut ids = Vec::new();
        for s in &vm.snapshots {
            let mut snap = Snapshot::new(s.uuid.to_string(), s.name.clone());
            snap.state_file = s.state_file.clone();
            let id = match s.parent {
                Some(p) => t.add_child(ids[p], snap).unwrap(),
                None => t.add_root(snap).unwrap(),
            };
            ids.push(id);
        }
        t.set_current(vm.current.map(|c| ids[c]));
        t
    }

    fn cfg(vm: &Vm) -> PathBuf {
        vm.dir.join(format!("{}.vbox", vm.name))
    }

    /// A minimal settings file with the snapshot tree and state files.
    fn write_settings(vm: &Vm) {
        fn snap_xml(vm: &Vm, i: usize, out: &mut String) {
            let s = &vm.snapshots[i];
            let _ = write!(
                out,
                "<Snapshot uuid=\"{{{}}}\" name=\"{}\" timeStamp=\"2026-01-01T00:00:00Z\"",
                s.uuid, s.name
            );
            if let Some(f) = &s.state_file {
                let _ = write!(out, " stateFile=\"{f}\"");
            }
            out.push('>');
            let kids: Vec<usize> = (0..vm.snapshots.len())
                .filter(|k| vm.snapshots[*k].parent == Some(i))
                .collect();
            if !kids.is_empty() {
                out.push_str("<Snapshots>");
                for k in kids {
                    snap_xml(vm, k, out);
                }
                out.push_str("</Snapshots>");
            }
            out.push_str("</Snapshot>");
        }
        let mut xml = String::from("<?xml version=\"1.0\"?>\n<VirtualBox xmlns=\"http://www.virtualbox.org/\" version=\"1.16-linux\">");
        let _ = write!(
            xml,
            "<Machine uuid=\"{{{}}}\" name=\"{}\" OSType=\"Other\" snapshotFolder=\"Snapshots\"",
            vm.uuid, vm.name
        );
        if let Some(c) = vm.current {
            let _ = write!(xml, " currentSnapshot=\"{{{}}}\"", vm.snapshots[c].uuid);
        }
        xml.push('>');
        if !vm.snapshots.is_empty() {
            snap_xml(vm, 0, &mut xml);
        }
        xml.push_str("</Machine></VirtualBox>\n");
        std::fs::create_dir_all(&vm.dir).unwrap();
        std::fs::write(Self::cfg(vm), xml).unwrap();
    }

    fn showvminfo(vm: &Vm) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "name=\"{}\"\ngroups=\"/\"\nostype=\"Other\"\nUUID=\"{}\"",
            vm.name, vm.uuid
        );
        let _ = writeln!(s, "CfgFile=\"{}\"", Self::cfg(vm).display());
        let _ = writeln!(
            s,
            "SnapFldr=\"{}/Snapshots\"\nLogFldr=\"{}/Logs\"",
            vm.dir.display(),
            vm.dir.display()
        );
        let _ = writeln!(
            s,
            "memory={}\npagefusion=\"off\"\nvram=8\ncpus={}",
            vm.memory, vm.cpus
        );
        let _ = writeln!(
            s,
            "VMState=\"{}\"\nVMStateChangeTime=\"2026-01-01T00:00:00.000000000\"",
            vm.state
        );
        if vm.state == "saved" {
            let _ = writeln!(
                s,
                "VMStateFile=\"{}/Snapshots/state.sav\"",
                vm.dir.display()
            );
        }
        for (i, c) in vm.controllers.iter().enumerate() {
            let _ = writeln!(
                s,
                "storagecontrollername{i}=\"{c}\"\nstoragecontrollertype{i}=\"IntelAhci\"\nstoragecontrollerinstance{i}=\"0\"\nstoragecontrollermaxportcount{i}=\"30\"\nstoragecontrollerportcount{i}=\"1\"\nstoragecontrollerbootable{i}=\"on\""
            );
        }
        for c in &vm.controllers {
            match vm
                .attachments
                .iter()
                .find(|a| &a.0 == c && a.1 == 0 && a.2 == 0)
            {
                Some((_, _, _, u)) => {
                    let _ = writeln!(
                        s,
                        "\"{c}-0-0\"=\"{}/Snapshots/{{{u}}}.vdi\"\n\"{c}-ImageUUID-0-0\"=\"{u}\"",
                        vm.dir.display()
                    );
                }
                None => {
                    let _ = writeln!(s, "\"{c}-0-0\"=\"none\"");
                }
            }
        }
        s.push_str("natnet1=\"nat\"\nmacaddress1=\"080027E5FA8F\"\ncableconnected1=\"on\"\nnic1=\"nat\"\nnic2=\"none\"\nGuestMemoryBalloon=0\n");
        s.push_str(&render_machine_readable(&Self::tree(vm)));
        s
    }

    fn medium_record(m: &Medium) -> String {
        let parent = m.parent.map_or("base".to_owned(), |p| p.to_string());
        let ty = match (m.mtype, m.parent) {
            ("normal", None) => "normal (base)".to_owned(),
            ("normal", Some(_)) => "normal (differencing)".to_owned(),
            (t, _) => t.to_owned(),
        };
        format!(
            "UUID:           {}\nParent UUID:    {parent}\nState:          created\nType:           {ty}\nLocation:       {}\nStorage format: VDI\nCapacity:       5120 MBytes\nEncryption:     disabled\n",
            m.uuid, m.location
        )
    }

    fn handle(&mut self, a: &[String]) -> CommandOutput {
        let a1 = a.get(1).map(String::as_str).unwrap_or("");
        match a.first().map(String::as_str).unwrap_or("") {
            "createvm" => {
                let name = opt(a, "--name").unwrap().to_owned();
                let dir = self.root.join(&name);
                if self.vms.iter().any(|v| v.name == name) {
                    return vbox_error(
                        &format!(
                            "Machine settings file '{}/{name}.vbox' already exists",
                            dir.display()
                        ),
                        "VBOX_E_FILE_ERROR",
                        "0x80bb0004",
                        "MachineWrap",
                        "IMachine",
                    );
                }
                let uuid = self.uuid();
                let vm = Vm {
                    uuid,
                    name: name.clone(),
                    state: "poweroff",
                    cpus: 1,
                    memory: 128,
                    controllers: vec![],
                    attachments: vec![],
                    snapshots: vec![],
                    snapshot_disks: vec![],
                    current: None,
                    dir,
                };
                Self::write_settings(&vm);
                let out = format!(
                    "Virtual machine '{name}' is created and registered.\nUUID: {uuid}\nSettings file: '{}'\n",
                    Self::cfg(&vm).display()
                );
                self.vms.push(vm);
                ok(out)
            }
            "modifyvm" => {
                let Some(vm) = self.vm(a1) else {
                    return not_found(a1);
                };
                if let Some(c) = opt(a, "--cpus") {
                    vm.cpus = c.parse().unwrap();
                }
                if let Some(m) = opt(a, "--memory") {
                    vm.memory = m.parse().unwrap();
                }
                ok("")
            }
            "list" => match a1 {
                "vms" | "runningvms" => ok(self
                    .vms
                    .iter()
                    .filter(|v| a1 == "vms" || v.state == "running")
                    .map(|v| format!("\"{}\" {{{}}}\n", v.name, v.uuid))
                    .collect::<String>()),
                "hdds" => ok(self
                    .media
                    .iter()
                    .map(|m| Self::medium_record(m) + "\n")
                    .collect::<String>()),
                _ => CommandOutput::failed(2, "Syntax error\n"),
            },
            "showvminfo" => match self.vm(a1) {
                Some(vm) => ok(Self::showvminfo(vm)),
                None => not_found(a1),
            },
            "unregistervm" => {
                let Some(vm) = self.vm(a1).cloned() else {
                    return not_found(a1);
                };
                if matches!(vm.state, "running" | "paused") {
                    return vbox_error(
                        &format!(
                            "Cannot unregister the machine '{}' while it is locked",
                            vm.name
                        ),
                        "VBOX_E_INVALID_OBJECT_STATE",
                        "0x80bb0007",
                        "MachineWrap",
                        "IMachine",
                    );
                }
                self.vms.retain(|v| v.uuid != vm.uuid);
                if a.iter().any(|x| x == "--delete") {
                    self.media.retain(|m| m.owner != Some(vm.uuid));
                }
                CommandOutput {
                    exit_code: Some(0),
                    stdout: String::new(),
                    stderr: PROGRESS.to_owned(),
                }
            }
            "showmediuminfo" => {
                let r = a[2].clone();
                if self.medium(&r).is_none() && Path::new(&r).is_file() {
                    let uuid = self.uuid();
                    self.media.push(Medium {
                        uuid,
                        location: r.clone(),
                        mtype: "normal",
                        parent: None,
                        owner: None,
                    });
                }
                match self.medium(&r) {
                    Some(m) => ok(Self::medium_record(m)),
                    None => vbox_error(
                        &format!("Could not find file for the medium '{r}' (VERR_FILE_NOT_FOUND)"),
                        "VBOX_E_FILE_ERROR",
                        "0x80bb0004",
                        "MediumWrap",
                        "IMedium",
                    ),
                }
            }
            "modifymedium" => {
                let t = opt(a, "--type").unwrap();
                let r = a[2].clone();
                match self
                    .media
                    .iter_mut()
                    .find(|m| m.uuid.to_string() == r || m.location == r)
                {
                    Some(m) => {
                        m.mtype = if t == "multiattach" {
                            "multiattach"
                        } else {
                            "normal"
                        };
                        ok("")
                    }
                    None => CommandOutput::failed(1, "VBoxManage: error: no such medium\n"),
                }
            }
            "closemedium" => {
                let r = a[2].clone();
                let Some(m) = self.medium(&r).cloned() else {
                    return CommandOutput::failed(1, "VBoxManage: error: no such medium\n");
                };
                let children = self
                    .media
                    .iter()
                    .filter(|c| c.parent == Some(m.uuid))
                    .count();
                if children > 0 {
                    return vbox_error(
                        &format!(
                            "Cannot close medium '{}' because it has {children} child media",
                            m.location
                        ),
                        "VBOX_E_OBJECT_IN_USE",
                        "0x80bb000c",
                        "MediumWrap",
                        "IMedium",
                    );
                }
                self.media.retain(|x| x.uuid != m.uuid);
                ok("")
            }
            "storagectl" => {
                let Some(vm) = self.vm(a1) else {
                    return not_found(a1);
                };
                vm.controllers.push(opt(a, "--name").unwrap().to_owned());
                ok("")
            }
            "storageattach" => {
                let ctl = opt(a, "--storagectl").unwrap().to_owned();
                let port = opt(a, "--port").unwrap().parse().unwrap();
                let device = opt(a, "--device").unwrap().parse().unwrap();
                let r = opt(a, "--medium").unwrap().to_owned();
                let Some(m) = self.medium(&r).cloned() else {
                    return CommandOutput::failed(1, "VBoxManage: error: no such medium\n");
                };
                let Some(vm) = self.vm(a1).cloned() else {
                    return not_found(a1);
                };
                let attached =
                    if m.mtype == "multiattach" || opt(a, "--mtype") == Some("multiattach") {
                        let uuid = self.uuid();
                        self.media.push(Medium {
                            uuid,
                            location: format!("{}/Snapshots/{{{uuid}}}.vdi", vm.dir.display()),
                            mtype: "normal",
                            parent: Some(m.uuid),
                            owner: Some(vm.uuid),
                        });
                        uuid
                    } else {
                        m.uuid
                    };
                self.vm(a1)
                    .unwrap()
                    .attachments
                    .push((ctl, port, device, attached));
                ok("")
            }
            "startvm" => {
                let Some(vm) = self.vm(a1) else {
                    return not_found(a1);
                };
                if matches!(vm.state, "running" | "paused") {
                    return vbox_error(
                        &format!("The machine '{}' is already locked by a session (or being locked or unlocked)", vm.name),
                        "VBOX_E_INVALID_OBJECT_STATE",
                        "0x80bb0007",
                        "MachineWrap",
                        "IMachine",
                    );
                }
                vm.state = "running";
                ok(format!("Waiting for VM \"{a1}\" to power on...\nVM \"{a1}\" has been successfully started.\n"))
            }
            "controlvm" => {
                let Some(vm) = self.vm(a1) else {
                    return not_found(a1);
                };
                vm.state = match a[2].as_str() {
                    "poweroff" => "poweroff",
                    "savestate" => "saved",
                    "pause" => "paused",
                    "resume" => "running",
                    _ => vm.state,
                };
                ok("")
            }
            "snapshot" => {
                let Some(vm) = self.vm(a1).cloned() else {
                    return not_found(a1);
                };
                match a[2].as_str() {
                    "take" => {
                        let uuid = self.uuid();
                        let vm = self.vm(a1).unwrap();
                        let state_file = matches!(vm.state, "running" | "paused")
                            .then(|| format!("Snapshots/{uuid}.sav"));
                        vm.snapshots.push(Snap {
                            uuid,
                            name: a[3].clone(),
                            parent: vm.current,
                            state_file,
                        });
                        vm.snapshot_disks.push(vm.attachments.clone());
                        vm.current = Some(vm.snapshots.len() - 1);
                        Self::write_settings(vm);
                        CommandOutput {
                            exit_code: Some(0),
                            stdout: format!("Snapshot taken. UUID: {uuid}\n"),
                            stderr: PROGRESS.to_owned(),
                        }
                    }
                    "list" if vm.snapshots.is_empty() => CommandOutput {
                        exit_code: Some(1),
                        stdout: "This machine does not have any snapshots\n".to_owned(),
                        stderr: String::new(),
                    },
                    "list" => ok(render_machine_readable(&Self::tree(&vm))),
                    "restore" => {
                        if matches!(vm.state, "running" | "paused") {
                            return vbox_error(
                                "Cannot restore a snapshot of a running machine",
                                "VBOX_E_INVALID_VM_STATE",
                                "0x80bb0002",
                                "MachineWrap",
                                "IMachine",
                            );
                        }
                        let Some(i) = vm.snapshots.iter().position(|s| s.uuid.to_string() == a[3])
                        else {
                            return CommandOutput::failed(
                                1,
                                "VBoxManage: error: no such snapshot\n",
                            );
                        };
                        let vm = self.vm(a1).unwrap();
                        vm.current = Some(i);
                        vm.state = if vm.snapshots[i].state_file.is_some() {
                            "saved"
                        } else {
                            "poweroff"
                        };
                        Self::write_settings(vm);
                        ok("")
                    }
                    _ => CommandOutput::failed(2, "Syntax error\n"),
                }
            }
            "clonevm" => {
                let Some(src) = self.vm(a1).cloned() else {
                    return not_found(a1);
                };
                let name = opt(a, "--name").unwrap().to_owned();
                let snap = opt(a, "--snapshot").map(|s| {
                    src.snapshots
                        .iter()
                        .position(|x| x.uuid.to_string() == s)
                        .unwrap()
                });
                let disks = snap.map_or(src.attachments.clone(), |i| src.snapshot_disks[i].clone());
                let uuid = self.uuid();
                let dir = self.root.join(&name);
                let mut attachments = Vec::new();
                for (c, p, d, disk) in disks {
                    let child = self.uuid();
                    self.media.push(Medium {
                        uuid: child,
                        location: format!("{}/Snapshots/{{{child}}}.vdi", dir.display()),
                        mtype: "normal",
                        parent: Some(disk),
                        owner: Some(uuid),
                    });
                    attachments.push((c, p, d, child));
                }
                let vm = Vm {
                    uuid,
                    name: name.clone(),
                    state: "poweroff",
                    snapshots: vec![],
                    snapshot_disks: vec![],
                    current: None,
                    attachments,
                    dir,
                    ..src
                };
                Self::write_settings(&vm);
                self.vms.push(vm);
                CommandOutput {
                    exit_code: Some(0),
                    stdout: format!("Machine has been successfully cloned as \"{name}\"\n"),
                    stderr: PROGRESS.to_owned(),
                }
            }
            _ => CommandOutput::failed(2, format!("Syntax error: unknown command {a:?}\n")),
        }
    }
}

#[async_trait]
impl CommandRunner for SimVBoxManage {
    async fn run(
        &self,
        command: &VBoxCommand,
        _timeout: Duration,
    ) -> unacloud_vbox::Result<CommandOutput> {
        self.log.lock().unwrap().push(command.shell_line());
        Ok(self.state.lock().unwrap().handle(command.args()))
    }
}

#[tokio::test]
async fn virtualbox_backend_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("templates/base.vdi");
    std::fs::create_dir_all(template.parent().unwrap()).unwrap();
    std::fs::write(
        &template,
        b"not a real image; the simulation only needs the file",
    )
    .unwrap();
    let sim = Arc::new(SimVBoxManage {
        state: Mutex::new(State {
            root: dir.path().join("VMs"),
            next: 0,
            vms: vec![],
            media: vec![],
        }),
        log: Mutex::new(Vec::new()),
    });
    let hv = VBoxManageHypervisor::new(sim.clone());
    // The contracts this simulation of VBoxManage implements. It has no `snapshot …
    // delete`, `registervm` or `guestcontrol`, so `conformance::files_and_registration`
    // (part of `run_all`) is not run against it: that needs recorded runs of the real
    // commands.
    let env = ConformanceEnv::new(&template);
    conformance::vm_registry(&hv, &env).await;
    conformance::multiattach_and_snapshots(&hv, &env).await;
    assert_eq!(
        conformance::power_cycle(&hv, &env).await,
        None,
        "power cycle ran"
    );
    // Every command the backend ran is one the simulation knows.
    let log = sim.log.lock().unwrap();
    let mut verbs: HashMap<String, usize> = HashMap::new();
    for l in log.iter() {
        let verb = l.split_whitespace().nth(1).unwrap_or("").to_owned();
        *verbs.entry(verb).or_default() += 1;
    }
    for v in [
        "createvm",
        "modifyvm",
        "showvminfo",
        "storageattach",
        "snapshot",
        "clonevm",
        "closemedium",
        "startvm",
        "controlvm",
    ] {
        assert!(verbs.contains_key(v), "{v} never ran: {verbs:?}");
    }
}
