//! Opening elements: the context each start tag gives its content, and the records
//! (machine, snapshot, medium, hardware) it creates.

use quick_xml::events::BytesStart;
use uuid::Uuid;

use super::{local_str, Ctx, Desc, Frame, Owner, Parser};
use crate::error::{Error, Result};
use crate::settings::{
    AttachedDevice, DeviceType, GlobalRegistry, HardDisk, Hardware, Image, ImageKind, MachineEntry,
    MachineSettings, MediaRegistry, NetworkAdapter, NetworkAttachment, SettingsVersion,
    SnapshotSettings, StorageController,
};

impl Parser<'_> {
    /// Handles a start (or empty) tag and returns the context for its content.
    pub(super) fn open(&mut self, e: &BytesStart<'_>) -> Result<Ctx> {
        self.elements += 1;
        if self.elements > self.limits.max_elements {
            return Err(Error::LimitExceeded {
                limit: "element count",
                field: "max_elements",
                max: self.limits.max_elements,
                element: local_str(e),
                line: self.line(),
            });
        }
        if e.len() > self.limits.max_tag_bytes {
            return Err(Error::LimitExceeded {
                limit: "start-tag/attribute size",
                field: "max_tag_bytes",
                max: self.limits.max_tag_bytes as u64,
                element: local_str(e),
                line: self.line(),
            });
        }
        // Fast path: nothing inside a skipped element or a description is kept.
        if let Some(Frame {
            ctx: Ctx::Other | Ctx::Description(_),
            ..
        }) = self.stack.last()
        {
            return Ok(Ctx::Other);
        }
        let local = e.local_name();
        let name = local.as_ref();
        let parent = match self.stack.last() {
            Some(f) => f.ctx,
            None => {
                if self.root_closed {
                    return Err(Error::TrailingContent { line: self.line() });
                }
                if name != b"VirtualBox" {
                    return Err(Error::WrongRoot {
                        found: local_str(e),
                        expected: "VirtualBox",
                        hint: " (not a VirtualBox settings file)",
                    });
                }
                self.open_root(e)?;
                return Ok(Ctx::VirtualBox);
            }
        };
        Ok(match (parent, name) {
            (Ctx::VirtualBox, b"Machine") => {
                self.check_single_document("Machine")?;
                self.machine = Some(self.open_machine(e)?);
                Ctx::Machine
            }
            (Ctx::VirtualBox, b"Global") => {
                self.check_single_document("Global")?;
                self.global = Some(GlobalRegistry {
                    version: self.version.clone().unwrap_or(SettingsVersion {
                        major: 1,
                        minor: 12,
                        platform: String::new(),
                    }),
                    machines: Vec::new(),
                    media: MediaRegistry::default(),
                    base_dir: Default::default(),
                });
                Ctx::Global
            }
            (Ctx::Machine | Ctx::Global, b"MediaRegistry") => {
                if self.media_seen {
                    return Err(Error::Structure {
                        element: "MediaRegistry",
                        parent: if matches!(parent, Ctx::Machine) {
                            "Machine"
                        } else {
                            "Global"
                        },
                        problem: "has more than one",
                    });
                }
                self.media_seen = true;
                Ctx::MediaRegistry
            }
            (Ctx::Machine, b"Hardware") => Ctx::Hardware(Owner::Machine),
            (Ctx::Machine, b"StorageControllers") => Ctx::StorageControllers(Owner::Machine),
            (Ctx::Machine, b"Description") => self.start_text(Desc::Machine),
            (Ctx::Machine, b"Snapshot") => {
                if !self.snapshots.is_empty() {
                    return Err(Error::Structure {
                        element: "Snapshot",
                        parent: "Machine",
                        problem: "has more than one root",
                    });
                }
                let s = self.open_snapshot(e, None)?;
                Ctx::Snapshot(s)
            }
            (Ctx::Global, b"MachineRegistry") => Ctx::MachineRegistry,
            (Ctx::MachineRegistry, b"MachineEntry") => {
                let (mut uuid, mut src) = (None, None);
                self.attrs(e, |key, v, p| {
                    match key {
                        b"uuid" => uuid = Some(p.uuid_attr("MachineEntry", "uuid", &v)?),
                        b"src" => src = Some(v.into_owned()),
                        _ => {}
                    }
                    Ok(())
                })?;
                let entry = MachineEntry {
                    uuid: uuid.ok_or_else(|| self.missing("MachineEntry", "uuid"))?,
                    src: src.ok_or_else(|| self.missing("MachineEntry", "src"))?,
                };
                if let Some(g) = self.global.as_mut() {
                    g.machines.push(entry);
                }
                Ctx::Other
            }
            (Ctx::MediaRegistry, b"HardDisks") => Ctx::HardDisks,
            (Ctx::MediaRegistry, b"DVDImages") => Ctx::Images(ImageKind::Dvd),
            (Ctx::MediaRegistry, b"FloppyImages") => Ctx::Images(ImageKind::Floppy),
            (Ctx::HardDisks, b"HardDisk") => Ctx::HardDisk(self.open_hard_disk(e, None)?),
            (Ctx::HardDisk(p), b"HardDisk") => Ctx::HardDisk(self.open_hard_disk(e, Some(p))?),
            (Ctx::HardDisk(d), b"Description") => self.start_text(Desc::HardDisk(d)),
            (Ctx::Images(kind), b"Image") => {
                let (mut uuid, mut location, mut format) = (None, None, None);
                self.attrs(e, |key, v, p| {
                    match key {
                        b"uuid" => uuid = Some(p.uuid_attr("Image", "uuid", &v)?),
                        b"location" => location = Some(v.into_owned()),
                        b"format" => format = Some(v.into_owned()),
                        _ => {}
                    }
                    Ok(())
                })?;
                let img = Image {
                    uuid: uuid.ok_or_else(|| self.missing("Image", "uuid"))?,
                    location: location.ok_or_else(|| self.missing("Image", "location"))?,
                    format,
                    kind,
                };
                match kind {
                    ImageKind::Dvd => self.media.dvd_images.push(img),
                    ImageKind::Floppy => self.media.floppy_images.push(img),
                }
                Ctx::Other
            }
            (Ctx::Snapshot(s), b"Hardware") => Ctx::Hardware(Owner::Snapshot(s)),
            (Ctx::Snapshot(s), b"StorageControllers") => {
                Ctx::StorageControllers(Owner::Snapshot(s))
            }
            (Ctx::Snapshot(s), b"Snapshots") => Ctx::Snapshots(s),
            (Ctx::Snapshot(s), b"Description") => self.start_text(Desc::Snapshot(s)),
            (Ctx::Snapshots(p), b"Snapshot") => Ctx::Snapshot(self.open_snapshot(e, Some(p))?),
            (Ctx::Hardware(o), b"CPU") => {
                let mut count = None;
                self.attrs(e, |key, v, p| {
                    if key == b"count" {
                        count = Some(p.num_attr::<u32>("CPU", "count", &v)?);
                    }
                    Ok(())
                })?;
                if let Some(c) = count {
                    self.hw(o).cpu_count = c;
                }
                Ctx::Other
            }
            (Ctx::Hardware(o), b"Memory") => {
                let mut ram = None;
                self.attrs(e, |key, v, p| {
                    if key == b"RAMSize" {
                        ram = Some(p.num_attr::<u64>("Memory", "RAMSize", &v)?);
                    }
                    Ok(())
                })?;
                self.hw(o).memory_mb = ram;
                Ctx::Other
            }
            (Ctx::Hardware(o), b"Network") => Ctx::Network(o),
            (Ctx::Hardware(o), b"StorageControllers") => Ctx::StorageControllers(o),
            (Ctx::Network(o), b"Adapter") => {
                let mut a = NetworkAdapter {
                    slot: 0,
                    enabled: false,
                    mac_address: None,
                    adapter_type: None,
                    cable_connected: None,
                    attachment: NetworkAttachment::None,
                };
                let mut slot = None;
                self.attrs(e, |key, v, p| {
                    match key {
                        b"slot" => slot = Some(p.num_attr::<u32>("Adapter", "slot", &v)?),
                        b"enabled" => a.enabled = p.bool_attr("Adapter", "enabled", &v)?,
                        b"MACAddress" => a.mac_address = Some(v.into_owned()),
                        b"type" => a.adapter_type = Some(v.into_owned()),
                        b"cable" => a.cable_connected = Some(p.bool_attr("Adapter", "cable", &v)?),
                        _ => {}
                    }
                    Ok(())
                })?;
                a.slot = slot.ok_or_else(|| self.missing("Adapter", "slot"))?;
                let hw = self.hw(o);
                hw.network_adapters.push(a);
                Ctx::Adapter(o, hw.network_adapters.len() - 1)
            }
            (Ctx::Adapter(o, i), mode) => {
                let attachment = self.network_mode(mode, e)?;
                if let Some(att) = attachment {
                    if let Some(a) = self.hw(o).network_adapters.get_mut(i) {
                        a.attachment = att;
                    }
                }
                Ctx::Other
            }
            (Ctx::StorageControllers(o), b"StorageController") => {
                let mut c = StorageController {
                    name: String::new(),
                    controller_type: String::new(),
                    port_count: None,
                    bootable: None,
                    devices: Vec::new(),
                };
                let (mut name, mut ty) = (None, None);
                self.attrs(e, |key, v, p| {
                    match key {
                        b"name" => name = Some(v.into_owned()),
                        b"type" => ty = Some(v.into_owned()),
                        b"PortCount" => {
                            c.port_count =
                                Some(p.num_attr::<u32>("StorageController", "PortCount", &v)?)
                        }
                        b"Bootable" => {
                            c.bootable = Some(p.bool_attr("StorageController", "Bootable", &v)?)
                        }
                        _ => {}
                    }
                    Ok(())
                })?;
                c.name = name.ok_or_else(|| self.missing("StorageController", "name"))?;
                c.controller_type = ty.ok_or_else(|| self.missing("StorageController", "type"))?;
                let hw = self.hw(o);
                hw.storage_controllers.push(c);
                Ctx::StorageController(o, hw.storage_controllers.len() - 1)
            }
            (Ctx::StorageController(o, ci), b"AttachedDevice") => {
                let mut d = AttachedDevice {
                    device_type: DeviceType::HardDisk,
                    port: 0,
                    device: 0,
                    image: None,
                    host_drive: None,
                    passthrough: false,
                    nonrotational: false,
                    hotpluggable: false,
                };
                let mut ty = None;
                self.attrs(e, |key, v, p| {
                    match key {
                        b"type" => {
                            ty = Some(match &*v {
                                "HardDisk" => DeviceType::HardDisk,
                                "DVD" => DeviceType::Dvd,
                                "Floppy" => DeviceType::Floppy,
                                other => {
                                    return Err(p.invalid(
                                        "AttachedDevice",
                                        "type",
                                        other,
                                        "expected HardDisk, DVD or Floppy",
                                    ))
                                }
                            })
                        }
                        b"port" => d.port = p.num_attr("AttachedDevice", "port", &v)?,
                        b"device" => d.device = p.num_attr("AttachedDevice", "device", &v)?,
                        b"passthrough" => {
                            d.passthrough = p.bool_attr("AttachedDevice", "passthrough", &v)?
                        }
                        b"nonrotational" => {
                            d.nonrotational = p.bool_attr("AttachedDevice", "nonrotational", &v)?
                        }
                        b"hotpluggable" => {
                            d.hotpluggable = p.bool_attr("AttachedDevice", "hotpluggable", &v)?
                        }
                        _ => {}
                    }
                    Ok(())
                })?;
                d.device_type = ty.ok_or_else(|| self.missing("AttachedDevice", "type"))?;
                let hw = self.hw(o);
                match hw.storage_controllers.get_mut(ci) {
                    Some(c) => {
                        c.devices.push(d);
                        Ctx::AttachedDevice(o, ci, c.devices.len() - 1)
                    }
                    None => Ctx::Other,
                }
            }
            (Ctx::AttachedDevice(o, ci, di), b"Image") => {
                let mut uuid = None;
                self.attrs(e, |key, v, p| {
                    if key == b"uuid" {
                        uuid = Some(p.uuid_attr("Image", "uuid", &v)?);
                    }
                    Ok(())
                })?;
                let uuid = uuid.ok_or_else(|| self.missing("Image", "uuid"))?;
                if let Some(d) = self.device(o, ci, di) {
                    d.image = Some(uuid);
                }
                Ctx::Other
            }
            (Ctx::AttachedDevice(o, ci, di), b"HostDrive") => {
                let mut src = None;
                self.attrs(e, |key, v, _| {
                    if key == b"src" {
                        src = Some(v.into_owned());
                    }
                    Ok(())
                })?;
                if let Some(d) = self.device(o, ci, di) {
                    d.host_drive = src;
                }
                Ctx::Other
            }
            _ => Ctx::Other,
        })
    }

    pub(super) fn check_single_document(&self, what: &'static str) -> Result<()> {
        if self.machine.is_some() || self.global.is_some() {
            return Err(Error::Structure {
                element: what,
                parent: "VirtualBox",
                problem: "has more than one Machine/Global child, such as",
            });
        }
        Ok(())
    }

    pub(super) fn start_text(&mut self, d: Desc) -> Ctx {
        self.text.clear();
        Ctx::Description(d)
    }

    pub(super) fn hw(&mut self, o: Owner) -> &mut Hardware {
        match o {
            Owner::Snapshot(i) if i < self.snapshots.len() => &mut self.snapshots[i].hardware,
            _ => match self.machine.as_mut() {
                Some(m) => &mut m.hardware,
                // Owner::Machine only exists inside <Machine>, so this is never used.
                None => &mut self.scratch,
            },
        }
    }

    pub(super) fn device(&mut self, o: Owner, ci: usize, di: usize) -> Option<&mut AttachedDevice> {
        self.hw(o)
            .storage_controllers
            .get_mut(ci)
            .and_then(|c| c.devices.get_mut(di))
    }

    pub(super) fn network_mode(
        &self,
        mode: &[u8],
        e: &BytesStart<'_>,
    ) -> Result<Option<NetworkAttachment>> {
        let attr_name = |key: &'static [u8]| -> Result<Option<String>> {
            let mut out = None;
            self.attrs(e, |k, v, _| {
                if k == key {
                    out = Some(v.into_owned());
                }
                Ok(())
            })?;
            Ok(out)
        };
        Ok(Some(match mode {
            b"DisabledModes" => return Ok(None),
            b"NAT" => NetworkAttachment::Nat,
            b"NATNetwork" => NetworkAttachment::NatNetwork {
                name: attr_name(b"name")?,
            },
            b"BridgedInterface" | b"HostInterface" => NetworkAttachment::Bridged {
                interface: attr_name(b"name")?,
            },
            b"InternalNetwork" => NetworkAttachment::Internal {
                name: attr_name(b"name")?,
            },
            b"HostOnlyInterface" => NetworkAttachment::HostOnly {
                interface: attr_name(b"name")?,
            },
            b"GenericInterface" => NetworkAttachment::Generic {
                driver: attr_name(b"driver")?,
            },
            b"HostOnlyNetwork" | b"CloudNetwork" => NetworkAttachment::Other {
                element: String::from_utf8_lossy(mode).into_owned(),
                name: attr_name(b"name")?,
            },
            _ => return Ok(None),
        }))
    }

    pub(super) fn open_root(&mut self, e: &BytesStart<'_>) -> Result<()> {
        let mut version = None;
        let mut ns = None;
        self.attrs_full(e, |key, v, p| {
            match key {
                b"version" => version = Some(v.into_owned()),
                b"xmlns" => ns = Some(v.into_owned()),
                _ => {}
            }
            let _ = p;
            Ok(())
        })?;
        let raw = version.ok_or_else(|| self.missing("VirtualBox", "version"))?;
        let v = SettingsVersion::parse(&raw).ok_or_else(|| Error::UnsupportedVersion {
            version: raw.clone(),
            reason: "expected <major>.<minor>-<platform>, e.g. 1.19-windows",
        })?;
        if v.major != 1 || (v.major, v.minor) < SettingsVersion::OLDEST {
            return Err(Error::UnsupportedVersion {
                version: raw,
                reason: "settings older than 1.12 (VirtualBox 4.1) are not supported; open and save the machine with a newer VirtualBox",
            });
        }
        self.version = Some(v);
        self.namespace = ns;
        Ok(())
    }

    pub(super) fn open_machine(&self, e: &BytesStart<'_>) -> Result<MachineSettings> {
        let (mut uuid, mut name) = (None, None);
        let version = self.version.clone().unwrap_or(SettingsVersion {
            major: 1,
            minor: 12,
            platform: String::new(),
        });
        let mut m = MachineSettings {
            version,
            namespace: self.namespace.clone(),
            uuid: Uuid::nil(),
            name: String::new(),
            os_type: None,
            description: None,
            current_snapshot: None,
            snapshot_folder: None,
            state_file: None,
            last_state_change: None,
            current_state_modified: true,
            aborted: false,
            hardware: Hardware::default(),
            media: MediaRegistry::default(),
            snapshots: Vec::new(),
            warnings: Vec::new(),
        };
        self.attrs(e, |key, v, p| {
            match key {
                b"uuid" => uuid = Some(p.uuid_attr("Machine", "uuid", &v)?),
                b"name" => name = Some(v.into_owned()),
                b"OSType" => m.os_type = Some(v.into_owned()),
                b"currentSnapshot" => {
                    m.current_snapshot = Some(p.uuid_attr("Machine", "currentSnapshot", &v)?)
                }
                b"snapshotFolder" => m.snapshot_folder = Some(v.into_owned()),
                b"stateFile" => m.state_file = Some(v.into_owned()),
                b"lastStateChange" => m.last_state_change = Some(v.into_owned()),
                b"currentStateModified" => {
                    m.current_state_modified = p.bool_attr("Machine", "currentStateModified", &v)?
                }
                b"aborted" => m.aborted = p.bool_attr("Machine", "aborted", &v)?,
                _ => {}
            }
            Ok(())
        })?;
        m.uuid = uuid.ok_or_else(|| self.missing("Machine", "uuid"))?;
        m.name = name.ok_or_else(|| self.missing("Machine", "name"))?;
        Ok(m)
    }

    pub(super) fn open_snapshot(
        &mut self,
        e: &BytesStart<'_>,
        parent: Option<usize>,
    ) -> Result<usize> {
        let mut uuid = None;
        let mut s = SnapshotSettings {
            uuid: Uuid::nil(),
            name: String::new(),
            time_stamp: None,
            description: None,
            state_file: None,
            hardware: Hardware::default(),
            parent,
            children: Vec::new(),
        };
        let mut name = None;
        self.attrs(e, |key, v, p| {
            match key {
                b"uuid" => uuid = Some(p.uuid_attr("Snapshot", "uuid", &v)?),
                b"name" => name = Some(v.into_owned()),
                b"timeStamp" => s.time_stamp = Some(v.into_owned()),
                b"stateFile" => s.state_file = Some(v.into_owned()),
                _ => {}
            }
            Ok(())
        })?;
        s.uuid = uuid.ok_or_else(|| self.missing("Snapshot", "uuid"))?;
        s.name = name.ok_or_else(|| self.missing("Snapshot", "name"))?;
        let idx = self.snapshots.len();
        if let Some(p) = parent {
            if let Some(ps) = self.snapshots.get_mut(p) {
                ps.children.push(idx);
            }
        }
        self.snapshots.push(s);
        Ok(idx)
    }

    pub(super) fn open_hard_disk(
        &mut self,
        e: &BytesStart<'_>,
        parent: Option<usize>,
    ) -> Result<usize> {
        let (mut uuid, mut location, mut format) = (None, None, None);
        let mut d = HardDisk {
            uuid: Uuid::nil(),
            location: String::new(),
            format: String::new(),
            disk_type: None,
            parent,
            children: Vec::new(),
            auto_reset: false,
            description: None,
        };
        self.attrs(e, |key, v, p| {
            match key {
                b"uuid" => uuid = Some(p.uuid_attr("HardDisk", "uuid", &v)?),
                b"location" => location = Some(v.into_owned()),
                b"format" => format = Some(v.into_owned()),
                b"type" => {
                    d.disk_type = Some(v.parse().map_err(|_| {
                        p.invalid(
                            "HardDisk",
                            "type",
                            &v,
                            "expected Normal, Immutable, Writethrough, Shareable, Readonly or MultiAttach",
                        )
                    })?)
                }
                b"autoReset" => d.auto_reset = p.bool_attr("HardDisk", "autoReset", &v)?,
                _ => {}
            }
            Ok(())
        })?;
        d.uuid = uuid.ok_or_else(|| self.missing("HardDisk", "uuid"))?;
        d.location = location.ok_or_else(|| self.missing("HardDisk", "location"))?;
        d.format = format.unwrap_or_default();
        let idx = self.media.hard_disks.len();
        if let Some(p) = parent {
            if let Some(pd) = self.media.hard_disks.get_mut(p) {
                pd.children.push(idx);
            }
        }
        self.media.hard_disks.push(d);
        Ok(idx)
    }
}
