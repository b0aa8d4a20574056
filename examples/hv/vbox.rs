//! `--backend vbox`: the VBoxManage commands of each verb, run or printed.

use super::*;

/// The name of a verb as typed.
pub(super) fn verb(cmd: &Command) -> &'static str {
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
pub(super) fn vbox_plan(cmd: &Command) -> Fallible<Vec<VBoxCommand>> {
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

pub(super) async fn run_vbox<F>(cli: &Cli, locate: F, out: &mut dyn Write) -> Fallible<()>
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

pub(super) fn real_runner() -> Option<Arc<dyn CommandRunner>> {
    locate_vboxmanage(std::env::var_os("PATH"))
        .map(|p| Arc::new(TokioRunner::new(p)) as Arc<dyn CommandRunner>)
}
