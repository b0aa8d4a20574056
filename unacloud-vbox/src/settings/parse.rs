//! The streaming parser behind [`super::MachineSettings`] and [`super::GlobalRegistry`].
//!
//! One pass over quick-xml events with an explicit stack of contexts: no recursion,
//! no DOM, no allocation for elements that are not kept. Every element is counted and
//! its start tag measured against [`ParseLimits`].

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::Reader;
use uuid::Uuid;

use super::{
    AttachedDevice, DeviceType, GlobalRegistry, HardDisk, Hardware, Image, ImageKind, MachineEntry,
    MachineSettings, MediaRegistry, NetworkAdapter, NetworkAttachment, ParseLimits,
    SettingsVersion, SnapshotSettings, StorageController,
};
use crate::error::{Error, Result};

pub(crate) enum Document {
    Machine(Box<MachineSettings>),
    Global(Box<GlobalRegistry>),
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Machine,
    Snapshot(usize),
}

#[derive(Debug, Clone, Copy)]
enum Desc {
    Machine,
    Snapshot(usize),
    HardDisk(usize),
}

#[derive(Debug, Clone, Copy)]
enum Ctx {
    VirtualBox,
    Machine,
    Global,
    MachineRegistry,
    MediaRegistry,
    HardDisks,
    HardDisk(usize),
    Images(ImageKind),
    Snapshot(usize),
    Snapshots(usize),
    Hardware(Owner),
    Network(Owner),
    Adapter(Owner, usize),
    StorageControllers(Owner),
    StorageController(Owner, usize),
    AttachedDevice(Owner, usize, usize),
    Description(Desc),
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    ctx: Ctx,
    name_off: usize,
    name_len: usize,
}

struct Parser<'a> {
    input: &'a str,
    reader: Reader<&'a [u8]>,
    limits: ParseLimits,
    stack: Vec<Frame>,
    elements: u64,
    root_closed: bool,
    version: Option<SettingsVersion>,
    namespace: Option<String>,
    machine: Option<MachineSettings>,
    global: Option<GlobalRegistry>,
    media: MediaRegistry,
    media_seen: bool,
    snapshots: Vec<SnapshotSettings>,
    text: String,
    scratch: Hardware,
}

pub(crate) fn parse_document(input: &str, limits: &ParseLimits) -> Result<Document> {
    // A UTF-8 byte-order mark is not text before the root element.
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let mut reader = Reader::from_str(input);
    let cfg = reader.config_mut();
    cfg.check_end_names = true;
    cfg.expand_empty_elements = false;
    let mut p = Parser {
        input,
        reader,
        limits: *limits,
        stack: Vec::with_capacity(64),
        elements: 0,
        root_closed: false,
        version: None,
        namespace: None,
        machine: None,
        global: None,
        media: MediaRegistry::default(),
        media_seen: false,
        snapshots: Vec::new(),
        text: String::new(),
        scratch: Hardware::default(),
    };
    p.run()?;
    p.finish()
}

/// Shortens a value for an error message.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(77).collect();
        out.push_str("...");
        out
    }
}

impl<'a> Parser<'a> {
    fn line_at(&self, pos: u64) -> u64 {
        let end = usize::try_from(pos)
            .unwrap_or(usize::MAX)
            .min(self.input.len());
        let bytes = &self.input.as_bytes()[..end];
        bytes.iter().filter(|b| **b == b'\n').count() as u64 + 1
    }

    fn line(&self) -> u64 {
        self.line_at(self.reader.buffer_position())
    }

    /// An error the reader itself raised: it knows where.
    fn xml_error(&self, source: quick_xml::Error) -> Error {
        Error::Xml {
            line: self.line_at(self.reader.error_position()),
            source,
        }
    }

    /// An error found in `bytes` (a slice of the input: an attribute value, an entity
    /// reference, a text) after the reader returned it; `offset` is the position of
    /// the problem inside `bytes`. The reader's error position does not apply here.
    fn xml_error_in(&self, bytes: &[u8], offset: usize, source: quick_xml::Error) -> Error {
        let base = self.input.as_ptr() as usize;
        let p = bytes.as_ptr() as usize;
        let pos = if p >= base && p <= base + self.input.len() {
            (p - base).saturating_add(offset) as u64
        } else {
            self.reader.buffer_position()
        };
        Error::Xml {
            line: self.line_at(pos),
            source,
        }
    }

    fn frame_name(&self, f: &Frame) -> String {
        self.input
            .get(f.name_off..f.name_off + f.name_len)
            .map(|n| n.rsplit(':').next().unwrap_or(n).to_owned())
            .unwrap_or_else(|| "element".to_owned())
    }

    fn run(&mut self) -> Result<()> {
        loop {
            let ev = match self.reader.read_event() {
                Ok(ev) => ev,
                Err(e) => return Err(self.xml_error(e)),
            };
            match ev {
                Event::Start(e) => {
                    let ctx = self.open(&e)?;
                    let (name_off, name_len) = self.name_span(&e);
                    self.stack.push(Frame {
                        ctx,
                        name_off,
                        name_len,
                    });
                    if self.stack.len() > self.limits.max_depth {
                        return Err(Error::LimitExceeded {
                            limit: "nesting depth",
                            field: "max_depth",
                            max: self.limits.max_depth as u64,
                            element: local_str(&e),
                            line: self.line(),
                        });
                    }
                }
                Event::Empty(e) => {
                    let ctx = self.open(&e)?;
                    self.close(ctx);
                    if self.stack.is_empty() {
                        self.root_closed = true;
                    }
                }
                Event::End(_) => {
                    if let Some(f) = self.stack.pop() {
                        self.close(f.ctx);
                    }
                    if self.stack.is_empty() {
                        self.root_closed = true;
                    }
                }
                Event::Text(t) => {
                    if let Some(Frame {
                        ctx: Ctx::Description(_),
                        ..
                    }) = self.stack.last()
                    {
                        let s = t
                            .xml10_content()
                            .map_err(|e| self.xml_error_in(&t, 0, e.into()))?;
                        self.push_text(&s)?;
                    } else if self.stack.is_empty() && !t.iter().all(u8::is_ascii_whitespace) {
                        return Err(self.outside_root());
                    }
                }
                Event::CData(t) => {
                    if let Some(Frame {
                        ctx: Ctx::Description(_),
                        ..
                    }) = self.stack.last()
                    {
                        let s = t
                            .xml10_content()
                            .map_err(|e| self.xml_error_in(&t, 0, e.into()))?;
                        self.push_text(&s)?;
                    } else if self.stack.is_empty() {
                        return Err(self.outside_root());
                    }
                }
                Event::GeneralRef(r) => {
                    if self.stack.is_empty() {
                        return Err(self.outside_root());
                    }
                    if let Some(Frame {
                        ctx: Ctx::Description(_),
                        ..
                    }) = self.stack.last()
                    {
                        let s = self.resolve_ref(&r)?;
                        self.push_text(&s)?;
                    }
                }
                Event::Eof => {
                    if let Some(f) = self.stack.last() {
                        return Err(Error::Truncated {
                            element: self.frame_name(f),
                            line: self.line(),
                        });
                    }
                    return Ok(());
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            }
        }
    }

    fn outside_root(&self) -> Error {
        if self.root_closed {
            Error::TrailingContent { line: self.line() }
        } else {
            Error::Structure {
                element: "VirtualBox",
                parent: "document",
                problem: "has text before its root element",
            }
        }
    }

    fn name_span(&self, e: &BytesStart<'_>) -> (usize, usize) {
        let name = e.name();
        let name = name.as_ref();
        let base = self.input.as_ptr() as usize;
        let p = name.as_ptr() as usize;
        if p >= base && p + name.len() <= base + self.input.len() {
            (p - base, name.len())
        } else {
            (usize::MAX, 0)
        }
    }

    /// `bytes` as a `&str` when it is a slice of the input (always, for this reader):
    /// quote characters are ASCII, so a value between them is valid UTF-8 already.
    fn input_slice(&self, bytes: &[u8]) -> Option<&'a str> {
        let base = self.input.as_ptr() as usize;
        let p = bytes.as_ptr() as usize;
        if p < base || p + bytes.len() > base + self.input.len() {
            return None;
        }
        self.input.get(p - base..p - base + bytes.len())
    }

    fn resolve_ref(&self, r: &BytesRef<'_>) -> Result<String> {
        if let Some(c) = r
            .resolve_char_ref()
            .map_err(|e| self.xml_error_in(r, 0, e))?
        {
            return Ok(c.to_string());
        }
        let name = r.decode().map_err(|e| self.xml_error_in(r, 0, e.into()))?;
        Ok(match quick_xml::escape::resolve_predefined_entity(&name) {
            Some(s) => s.to_owned(),
            None => format!("&{name};"),
        })
    }

    fn push_text(&mut self, s: &str) -> Result<()> {
        if self.text.len() + s.len() > self.limits.max_text_bytes {
            return Err(Error::LimitExceeded {
                limit: "description text size",
                field: "max_text_bytes",
                max: self.limits.max_text_bytes as u64,
                element: "Description".into(),
                line: self.line(),
            });
        }
        self.text.push_str(s);
        Ok(())
    }

    /// Handles a start (or empty) tag and returns the context for its content.
    fn open(&mut self, e: &BytesStart<'_>) -> Result<Ctx> {
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

    fn check_single_document(&self, what: &'static str) -> Result<()> {
        if self.machine.is_some() || self.global.is_some() {
            return Err(Error::Structure {
                element: what,
                parent: "VirtualBox",
                problem: "has more than one Machine/Global child, such as",
            });
        }
        Ok(())
    }

    fn start_text(&mut self, d: Desc) -> Ctx {
        self.text.clear();
        Ctx::Description(d)
    }

    fn close(&mut self, ctx: Ctx) {
        if let Ctx::Description(d) = ctx {
            let text = std::mem::take(&mut self.text);
            match d {
                Desc::Machine => {
                    if let Some(m) = self.machine.as_mut() {
                        m.description = Some(text);
                    }
                }
                Desc::Snapshot(i) => {
                    if let Some(s) = self.snapshots.get_mut(i) {
                        s.description = Some(text);
                    }
                }
                Desc::HardDisk(i) => {
                    if let Some(h) = self.media.hard_disks.get_mut(i) {
                        h.description = Some(text);
                    }
                }
            }
        }
    }

    fn hw(&mut self, o: Owner) -> &mut Hardware {
        match o {
            Owner::Snapshot(i) if i < self.snapshots.len() => &mut self.snapshots[i].hardware,
            _ => match self.machine.as_mut() {
                Some(m) => &mut m.hardware,
                // Owner::Machine only exists inside <Machine>, so this is never used.
                None => &mut self.scratch,
            },
        }
    }

    fn device(&mut self, o: Owner, ci: usize, di: usize) -> Option<&mut AttachedDevice> {
        self.hw(o)
            .storage_controllers
            .get_mut(ci)
            .and_then(|c| c.devices.get_mut(di))
    }

    fn network_mode(&self, mode: &[u8], e: &BytesStart<'_>) -> Result<Option<NetworkAttachment>> {
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

    fn open_root(&mut self, e: &BytesStart<'_>) -> Result<()> {
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

    fn open_machine(&self, e: &BytesStart<'_>) -> Result<MachineSettings> {
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

    fn open_snapshot(&mut self, e: &BytesStart<'_>, parent: Option<usize>) -> Result<usize> {
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

    fn open_hard_disk(&mut self, e: &BytesStart<'_>, parent: Option<usize>) -> Result<usize> {
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

    /// Calls `f(local_key, unescaped_value, self)` for every attribute except
    /// namespace declarations.
    fn attrs<F>(&self, e: &BytesStart<'_>, mut f: F) -> Result<()>
    where
        F: FnMut(&[u8], std::borrow::Cow<'_, str>, &Self) -> Result<()>,
    {
        self.attrs_full(e, |k, v, p| {
            if k == b"xmlns" {
                return Ok(());
            }
            f(k, v, p)
        })
    }

    /// Scans the start tag's attributes directly (`S Name Eq AttValue`, strict XML
    /// syntax, no HTML leniency). Only values whose key some handler reads are
    /// UTF-8-checked and unescaped; duplicates are not diagnosed (the last one wins).
    ///
    /// One pass: the key loop also notes the last `:` (for the local name), and one
    /// `memchr2` search finds the closing quote and whether the value holds a `&`.
    fn attrs_full<F>(&self, e: &BytesStart<'_>, mut f: F) -> Result<()>
    where
        F: FnMut(&[u8], std::borrow::Cow<'_, str>, &Self) -> Result<()>,
    {
        use quick_xml::events::attributes::AttrError;
        let raw = e.attributes_raw();
        let n = raw.len();
        let err = |a: AttrError| {
            let at = match a {
                AttrError::ExpectedEq(p)
                | AttrError::ExpectedValue(p)
                | AttrError::UnquotedValue(p)
                | AttrError::ExpectedQuote(p, _)
                | AttrError::Duplicated(p, _) => p,
            };
            self.xml_error_in(raw, at, quick_xml::Error::InvalidAttr(a))
        };
        let mut i = 0;
        loop {
            while i < n && raw[i].is_ascii_whitespace() {
                i += 1;
            }
            // A trailing `/` of an empty element may remain in the raw attributes.
            if i >= n || (raw[i] == b'/' && i + 1 == n) {
                return Ok(());
            }
            let key_start = i;
            let mut colon = None;
            while i < n {
                let c = raw[i];
                if c == b'=' || c.is_ascii_whitespace() {
                    break;
                }
                if c == b':' {
                    colon = Some(i);
                }
                i += 1;
            }
            let key = &raw[key_start..i];
            while i < n && raw[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= n || raw[i] != b'=' || key.is_empty() {
                return Err(err(AttrError::ExpectedEq(i)));
            }
            i += 1;
            while i < n && raw[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= n {
                return Err(err(AttrError::ExpectedValue(i)));
            }
            let quote = raw[i];
            if quote != b'"' && quote != b'\'' {
                return Err(err(AttrError::UnquotedValue(i)));
            }
            let value_start = i + 1;
            let rest = &raw[value_start..];
            let (len, has_amp) = match memchr::memchr2(quote, b'&', rest) {
                Some(p) if rest[p] == quote => (p, false),
                Some(p) => match memchr::memchr(quote, &rest[p + 1..]) {
                    Some(q) => (p + 1 + q, true),
                    None => return Err(err(AttrError::ExpectedQuote(n, quote))),
                },
                None => return Err(err(AttrError::ExpectedQuote(n, quote))),
            };
            let value = &rest[..len];
            i = value_start + len + 1;
            let local = match colon {
                None => key,
                Some(c) => {
                    if key.starts_with(b"xmlns:") {
                        continue;
                    }
                    &key[c - key_start + 1..]
                }
            };
            if !is_kept_attribute(local) {
                continue;
            }
            let text = match self.input_slice(value) {
                Some(t) => t,
                None => std::str::from_utf8(value).map_err(|u| {
                    self.xml_error_in(
                        value,
                        u.valid_up_to(),
                        quick_xml::encoding::EncodingError::from(u).into(),
                    )
                })?,
            };
            let v = if has_amp {
                quick_xml::escape::unescape(text).map_err(|x| {
                    let at = match &x {
                        quick_xml::escape::EscapeError::UnrecognizedEntity(r, _)
                        | quick_xml::escape::EscapeError::UnterminatedEntity(r) => r.start,
                        _ => 0,
                    };
                    self.xml_error_in(value, at, x.into())
                })?
            } else {
                std::borrow::Cow::Borrowed(text)
            };
            f(local, v, self)?;
        }
    }

    fn missing(&self, element: &'static str, attribute: &'static str) -> Error {
        Error::MissingAttribute {
            element,
            attribute,
            line: self.line(),
        }
    }

    fn invalid(
        &self,
        element: &'static str,
        attribute: &'static str,
        value: &str,
        reason: &str,
    ) -> Error {
        Error::InvalidAttribute {
            element,
            attribute,
            value: shorten(value),
            reason: reason.to_owned(),
            line: self.line(),
        }
    }

    fn uuid_attr(&self, element: &'static str, attribute: &'static str, v: &str) -> Result<Uuid> {
        let trimmed = v.trim();
        let inner = trimmed
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(trimmed);
        if let Some(u) = parse_hyphenated_uuid(inner.as_bytes()) {
            return Ok(u);
        }
        // Every other form (and every error message) comes from the uuid crate.
        Uuid::try_parse(inner)
            .map_err(|e| self.invalid(element, attribute, v, &format!("not a uuid ({e})")))
    }

    fn num_attr<T: std::str::FromStr>(
        &self,
        element: &'static str,
        attribute: &'static str,
        v: &str,
    ) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        v.trim().parse().map_err(|e: T::Err| {
            self.invalid(element, attribute, v, &format!("not a number ({e})"))
        })
    }

    fn bool_attr(&self, element: &'static str, attribute: &'static str, v: &str) -> Result<bool> {
        match v.trim() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(self.invalid(element, attribute, v, "expected true or false")),
        }
    }

    fn finish(self) -> Result<Document> {
        if !self.root_closed {
            return Err(Error::Structure {
                element: "VirtualBox",
                parent: "document",
                problem: "has no root element",
            });
        }
        if let Some(mut m) = self.machine {
            m.media = self.media;
            m.snapshots = self.snapshots;
            let v = &m.version;
            if (v.major, v.minor) > SettingsVersion::NEWEST_KNOWN {
                m.warnings.push(format!(
                    "settings version {v} is newer than the newest this crate was checked against (1.19); elements it does not know were ignored"
                ));
            }
            if m.current_snapshot.is_none() && !m.snapshots.is_empty() {
                m.warnings.push(
                    "the machine has snapshots but no currentSnapshot attribute; the current state's position in the tree is unknown".into(),
                );
            }
            return Ok(Document::Machine(Box::new(m)));
        }
        if let Some(mut g) = self.global {
            g.media = self.media;
            return Ok(Document::Global(Box::new(g)));
        }
        Err(Error::Structure {
            element: "Machine",
            parent: "VirtualBox",
            problem: "has no",
        })
    }
}

/// The common case of a uuid attribute, `8-4-4-4-12` hex digits (VirtualBox writes
/// it between braces, which the caller strips): decoded directly, `None` for anything
/// else so the caller can let [`Uuid::try_parse`] accept the other forms or explain
/// the error.
fn parse_hyphenated_uuid(s: &[u8]) -> Option<Uuid> {
    /// Start of each two-digit byte in the hyphenated form.
    const POS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    /// Value of each ASCII hex digit, 0xff for every other byte.
    const HEX: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    if s.len() != 36 || s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
        return None;
    }
    let mut bytes = [0u8; 16];
    let mut bad = 0u8;
    for (b, &p) in bytes.iter_mut().zip(POS.iter()) {
        let (hi, lo) = (HEX[usize::from(s[p])], HEX[usize::from(s[p + 1])]);
        bad |= hi | lo;
        *b = (hi << 4) | lo;
    }
    // Every digit's value is below 16; 0xff marks a byte that is not a digit.
    (bad < 16).then(|| Uuid::from_bytes(bytes))
}

/// Every attribute name some element's handler reads; others are skipped without
/// being decoded.
fn is_kept_attribute(key: &[u8]) -> bool {
    matches!(
        key,
        b"uuid"
            | b"name"
            | b"location"
            | b"format"
            | b"type"
            | b"autoReset"
            | b"src"
            | b"OSType"
            | b"currentSnapshot"
            | b"snapshotFolder"
            | b"stateFile"
            | b"lastStateChange"
            | b"currentStateModified"
            | b"aborted"
            | b"timeStamp"
            | b"count"
            | b"RAMSize"
            | b"slot"
            | b"enabled"
            | b"MACAddress"
            | b"cable"
            | b"PortCount"
            | b"Bootable"
            | b"port"
            | b"device"
            | b"passthrough"
            | b"nonrotational"
            | b"hotpluggable"
            | b"driver"
            | b"version"
            | b"xmlns"
    )
}

fn local_str(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.local_name().as_ref()).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_hyphenated_uuid;
    use proptest::prelude::*;
    use uuid::Uuid;

    #[test]
    fn fast_uuid_path_matches_the_uuid_crate_on_known_forms() {
        for s in [
            "9e02142e-0923-41ba-9f5f-d41958f9f753",
            "9E02142E-0923-41BA-9F5F-D41958F9F753",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(parse_hyphenated_uuid(s.as_bytes()), Uuid::try_parse(s).ok());
        }
        // Forms the fast path leaves to the uuid crate.
        for s in [
            "9e02142e092341ba9f5fd41958f9f753",
            "{9e02142e-0923-41ba-9f5f-d41958f9f753}",
            "9e02142e-0923-41ba-9f5f-d41958f9f75g",
            "9e02142e+0923-41ba-9f5f-d41958f9f753",
            "9e02142e-0923-41ba-9f5f-d41958f9f7530",
            "",
        ] {
            assert_eq!(parse_hyphenated_uuid(s.as_bytes()), None, "{s}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whenever the fast path accepts, the uuid crate accepts the same value.
        #[test]
        fn fast_uuid_path_agrees_with_the_uuid_crate(s in "[0-9a-fA-FgG-]{30,40}") {
            if let Some(u) = parse_hyphenated_uuid(s.as_bytes()) {
                prop_assert_eq!(Some(u), Uuid::try_parse(&s).ok());
            }
            if s.len() == 36 {
                if let Ok(u) = Uuid::try_parse(&s) {
                    prop_assert_eq!(parse_hyphenated_uuid(s.as_bytes()), Some(u));
                }
            }
        }

        /// Every uuid's hyphenated text round-trips through the fast path.
        #[test]
        fn fast_uuid_path_round_trips(bytes in any::<[u8; 16]>(), upper in any::<bool>()) {
            let u = Uuid::from_bytes(bytes);
            let mut text = u.hyphenated().to_string();
            if upper {
                text = text.to_ascii_uppercase();
            }
            prop_assert_eq!(parse_hyphenated_uuid(text.as_bytes()), Some(u));
        }
    }
}
