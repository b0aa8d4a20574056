//! The emulated PCs: their QEMU backends, the VMs provisioned on them, their hosts for the protocol, consoles, and moving a VM to a spare PC.

use super::*;

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::ResultsIo {
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn hv_err(what: String) -> impl FnOnce(unacloud_core::Error) -> Error {
    move |e| Error::Rcpbt {
        reason: format!("{what}: {}", crate::net::error::error_chain(&e)),
    }
}

/// Opens a PC's QEMU backend with its own copy of the template (registered
/// multiattach, with the guest's boot files).
pub(super) async fn open_pc(
    name: String,
    ns: String,
    addr: Ipv4Addr,
    root: PathBuf,
    guest: &GuestImage,
    accel: Accel,
) -> Result<Pc> {
    let templates = root.join("templates");
    std::fs::create_dir_all(&templates).map_err(io_err(&templates))?;
    let template = templates.join("rootfs.qcow2");
    std::fs::copy(&guest.template, &template).map_err(io_err(&template))?;
    let hv =
        QemuHypervisor::open_configured(&root, QemuImg::new(), QemuSystem::new().with_accel(accel))
            .await
            .map_err(hv_err(format!("opening the QEMU backend of {name}")))?;
    let disk = hv
        .register_disk(&template)
        .await
        .map_err(hv_err(format!("registering the template on {name}")))?;
    let d = DiskRef::Uuid(disk.uuid);
    hv.set_disk_type(&d, DiskType::MultiAttach)
        .await
        .map_err(hv_err(format!("making the template multiattach on {name}")))?;
    Ok(Pc {
        name,
        ns,
        addr,
        root,
        template,
        hv: Some(Arc::new(hv)),
    })
}

/// Reopens a PC's backend after its power came back (it finds its VMs `Aborted`).
pub(super) async fn reopen_pc(pc: &Pc, accel: Accel) -> Result<Arc<QemuHypervisor>> {
    debug_assert!(pc.hv.is_none());
    let hv = QemuHypervisor::open_configured(
        &pc.root,
        QemuImg::new(),
        QemuSystem::new().with_accel(accel),
    )
    .await
    .map_err(hv_err(format!("reopening the QEMU backend of {}", pc.name)))?;
    Ok(Arc::new(hv))
}

/// Creates VM `v` on `pc` from the template and boots it into the ring.
pub(super) async fn provision_vm(
    pc: &Pc,
    guest: &GuestImage,
    v: usize,
    memory_mb: u64,
) -> Result<VmId> {
    let name = vm_name(v);
    let id = VmId::from(name.as_str());
    let fail = |what: &str| hv_err(format!("{what} {name} on {}", pc.name));
    let spec = VmSpec::new(&name, HardwareProfile::Small)
        .with_memory_mb(memory_mb)
        .with_cores(1);
    let hv = pc.hv()?;
    hv.create_vm(&spec).await.map_err(fail("creating"))?;
    hv.attach_disk(&id, &AttachSpec::sata(DiskRef::Path(pc.template.clone())))
        .await
        .map_err(fail("attaching the template to"))?;
    let uuid = hv
        .vm_info(&id)
        .await
        .map_err(fail("reading"))?
        .uuid
        .ok_or_else(|| Error::Rcpbt {
            reason: format!("VM {name} has no uuid"),
        })?;
    hv.set_vm_network(&id, tap_config(&pc.ns, v, &mac_for(&uuid)))
        .await
        .map_err(fail("connecting"))?;
    let cmd = format!(
        "unacloud-guest,ring-peer,--manager,{HUB_ADDR}:{TM_PORT},--ip,{}",
        vm_addr(v)
    );
    hv.set_vm_boot(
        &id,
        Some(BootFiles {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            cmdline: Some(format!("quiet unacloud.cmd={cmd}")),
        }),
    )
    .await
    .map_err(fail("setting the kernel of"))?;
    Ok(id)
}

/// The protocol's host for VM `v` on `pc`: colouring on its tap, local snapshots
/// through the PC's hypervisor.
pub(super) fn vm_host(
    pc_name: &str,
    pc_ns: &str,
    hv: Arc<QemuHypervisor>,
    v: usize,
    backend: BackendKind,
) -> Result<Arc<dyn HostActions>> {
    let scope = Scope::interface(&tap_name(v))?;
    let dscp = DscpConfig::default();
    let vm = crate::net::daemon::VmConfig {
        name: vm_name(v),
        netns: Some(pc_ns.to_string()),
        tap: Some(tap_name(v)),
        ..Default::default()
    };
    let colour: Box<dyn ColourBackend> = match backend {
        BackendKind::NftNetlink => Box::new(NftNetlink::open_in_netns(pc_ns, dscp)?.scope(scope)),
        other => crate::net::daemon::build_vm_backend(other, &vm, dscp)?,
    };
    let hv: Arc<dyn Hypervisor> = hv;
    Ok(Arc::new(VmHost::on_host(
        pc_name,
        vm_name(v),
        colour,
        LocalSnapshot::Hypervisor {
            hv,
            live: true,
            margin: 64 << 20,
        },
    )?))
}

/// The protocol's hosts of every VM, VM `v` on PC `placement[v]`.
pub(super) fn vm_hosts(
    pcs: &[Pc],
    placement: &[usize],
    backend: BackendKind,
) -> Result<Vec<Arc<dyn HostActions>>> {
    placement
        .iter()
        .enumerate()
        .map(|(v, &h)| vm_host(&pcs[h].name, &pcs[h].ns, pcs[h].hv()?.clone(), v, backend))
        .collect()
}

/// Whether the guest console of `vm` shows `needle` since its current run started.
pub(super) async fn console_has(hv: &QemuHypervisor, vm: &VmId, needle: &str) -> bool {
    let Ok((log, off)) = hv.console(vm).await else {
        return false;
    };
    let Ok(bytes) = std::fs::read(&log) else {
        return false;
    };
    let from = usize::try_from(off).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).contains(needle)
}

/// The console tail of a VM, for errors.
pub(super) async fn console_tail(hv: &QemuHypervisor, vm: &VmId) -> String {
    let Ok((log, _)) = hv.console(vm).await else {
        return String::new();
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(4).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Copies the minimal file set of `vm` for `snapshot` from `from` to `to`'s root and
/// registers it there, on `to_ns`'s tap; returns the bytes copied.
pub(super) async fn relocate_vm(
    from: &QemuHypervisor,
    from_root: &Path,
    to: &QemuHypervisor,
    to_root: &Path,
    to_ns: &str,
    v: usize,
    snapshot: &str,
) -> Result<u64> {
    let name = vm_name(v);
    let id = VmId::from(name.as_str());
    let set = from
        .snapshot_files(&id, snapshot)
        .await
        .map_err(hv_err(format!(
            "listing the files of {name} for {snapshot}"
        )))?;
    let mut settings = None;
    let mut bytes = 0;
    for f in &set.files {
        let rel = f.path.strip_prefix(from_root).map_err(|_| Error::Rcpbt {
            reason: format!("{} is outside {}", f.path.display(), from_root.display()),
        })?;
        let dest = to_root.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        bytes += std::fs::copy(&f.path, &dest).map_err(io_err(&dest))?;
        if f.role == unacloud_core::files::FileRole::Settings {
            settings = Some(dest);
        }
    }
    let settings = settings.ok_or_else(|| Error::Rcpbt {
        reason: format!("the file set of {name} has no settings file"),
    })?;
    let info = to
        .register_vm(&settings)
        .await
        .map_err(hv_err(format!("registering {name} on the spare host")))?;
    let uuid = info.uuid.ok_or_else(|| Error::Rcpbt {
        reason: format!("VM {name} has no uuid"),
    })?;
    to.set_vm_network(&id, tap_config(to_ns, v, &mac_for(&uuid)))
        .await
        .map_err(hv_err(format!("connecting {name} on the spare host")))?;
    Ok(bytes)
}
