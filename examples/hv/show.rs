//! `--backend qemu`: what the commands print (VM state, files, snapshots), as text or
//! JSON.

use super::*;

pub(super) async fn print_state(
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
pub(super) async fn vm_json(hv: &QemuHypervisor, info: &VmInfo) -> Fallible<Value> {
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

pub(super) async fn print_vm(
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

pub(super) async fn vm_list(hv: &QemuHypervisor, json: bool, out: &mut dyn Write) -> Fallible<()> {
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
pub(super) async fn resolve_snapshot(
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

pub(super) async fn vm_files(
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
pub(super) fn human(bytes: u64) -> String {
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

pub(super) async fn snapshot_take(
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

pub(super) async fn print_snapshot_done(
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
