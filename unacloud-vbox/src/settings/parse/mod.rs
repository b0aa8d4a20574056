//! The streaming parser behind [`super::MachineSettings`] and [`super::GlobalRegistry`].
//!
//! One pass over quick-xml events with an explicit stack of contexts: no recursion,
//! no DOM, no allocation for elements that are not kept. Every element is counted and
//! its start tag measured against [`ParseLimits`].

use std::borrow::Cow;

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::Reader;

use super::{
    GlobalRegistry, Hardware, ImageKind, MachineSettings, MediaRegistry, ParseLimits,
    SettingsVersion, SnapshotSettings,
};
use crate::error::{Error, Result};

mod attrs;
mod open;

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
                    self.content(&t, true, || t.xml10_content().map_err(Into::into))?;
                }
                Event::CData(t) => {
                    self.content(&t, false, || t.xml10_content().map_err(Into::into))?;
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

    /// Text or CDATA `raw`: inside a description it is decoded (only then) and kept;
    /// outside the root element it is an error, unless it is white space and
    /// `blank_allowed`; anywhere else it is ignored.
    fn content<'t>(
        &mut self,
        raw: &'t [u8],
        blank_allowed: bool,
        decode: impl FnOnce() -> std::result::Result<Cow<'t, str>, quick_xml::Error>,
    ) -> Result<()> {
        if let Some(Frame {
            ctx: Ctx::Description(_),
            ..
        }) = self.stack.last()
        {
            let s = decode().map_err(|e| self.xml_error_in(raw, 0, e))?;
            self.push_text(&s)
        } else if self.stack.is_empty()
            && !(blank_allowed && raw.iter().all(u8::is_ascii_whitespace))
        {
            Err(self.outside_root())
        } else {
            Ok(())
        }
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

fn local_str(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.local_name().as_ref()).into_owned()
}
