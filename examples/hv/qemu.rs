//! `--backend qemu`: running each command on a QEMU backend (templates, VMs,
//! starts).

use super::*;

pub(super) async fn run_qemu(cli: &Cli, out: &mut dyn Write) -> Fallible<()> {
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
pub(super) fn boot_files_for(
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
pub(super) async fn template_add(
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

pub(super) fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

pub(super) fn template_ref(text: &str) -> DiskRef {
    match Uuid::try_parse(text.trim()) {
        Ok(u) => DiskRef::Uuid(u),
        Err(_) => DiskRef::Path(PathBuf::from(text)),
    }
}

pub(super) async fn vm_create(
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

pub(super) async fn vm_start(
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
