//! A versioned catalog of preconfigured templates (thesis strategy 1, and the image
//! life cycle it names as future work).
//!
//! A template version records its name, version number, OS, format, size and a
//! streaming content [`Checksum`] (BLAKE3 by default: the provisioning benchmark measured
//! it several times faster than SHA-256 on the same machine, see `BENCHMARKS.md`), the
//! thesis's image requirements (Table 2.2) that can be checked from the image's settings,
//! and a [`TemplateStatus`]. The catalog also records which VMs were built from which
//! version, so that a version still in use cannot be removed, and a new version never
//! changes VMs built from an older one.
//!
//! The catalog is a JSON file written atomically (temporary file, `fsync`, `rename`);
//! before each write the previous good file is kept as `<file>.bak`. A corrupt catalog is
//! reported as [`Error::Corrupt`] naming the backup and is never overwritten.
//!
//! ```
//! use unacloud_core::provision::catalog::{Catalog, ImageSettings, NewTemplate, TemplateStatus};
//! use unacloud_core::model::DiskFormat;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let image = dir.path().join("ubuntu.qcow2");
//! std::fs::write(&image, b"pretend this is a disk image").unwrap();
//!
//! let mut catalog = Catalog::open(dir.path().join("catalog.json")).unwrap();
//! let mut new = NewTemplate::new("ubuntu-16.04", "Ubuntu_64", DiskFormat::Qcow2, &image);
//! new.settings = ImageSettings { os_type: Some("Ubuntu_64".into()), bridged_adapter: Some(true), ..Default::default() };
//! let v1 = catalog.add_draft(new).unwrap();
//! catalog.publish("ubuntu-16.04", v1).unwrap();
//! catalog.record_use("ubuntu-16.04", v1, "host-1", "TM").unwrap();
//! assert!(catalog.remove_version("ubuntu-16.04", v1).is_err()); // TM still uses it
//!
//! let reopened = Catalog::open(dir.path().join("catalog.json")).unwrap();
//! assert_eq!(reopened.get("ubuntu-16.04", v1).unwrap().status, TemplateStatus::Published);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::{Error, Result};
use crate::model::DiskFormat;

const CATALOG_FORMAT: &str = "unacloud-catalog/1";

/// A checksum algorithm for template content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumAlgorithm {
    /// BLAKE3 (the default: fastest on the measured machine).
    #[default]
    Blake3,
    /// SHA-256.
    Sha256,
}

impl ChecksumAlgorithm {
    /// `blake3` or `sha256`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Blake3 => "blake3",
            ChecksumAlgorithm::Sha256 => "sha256",
        }
    }
}

/// A streaming hasher for either algorithm.
#[derive(Debug, Clone)]
pub enum ContentHasher {
    /// BLAKE3 state.
    Blake3(Box<blake3::Hasher>),
    /// SHA-256 state.
    Sha256(sha2::Sha256),
}

impl ContentHasher {
    /// A fresh hasher.
    pub fn new(algorithm: ChecksumAlgorithm) -> Self {
        match algorithm {
            ChecksumAlgorithm::Blake3 => ContentHasher::Blake3(Box::new(blake3::Hasher::new())),
            ChecksumAlgorithm::Sha256 => ContentHasher::Sha256(sha2::Sha256::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            ContentHasher::Blake3(h) => {
                h.update(bytes);
            }
            ContentHasher::Sha256(h) => h.update(bytes),
        }
    }

    /// The checksum of everything fed.
    pub fn finish(self) -> Checksum {
        match self {
            ContentHasher::Blake3(h) => Checksum {
                algorithm: ChecksumAlgorithm::Blake3,
                hex: h.finalize().to_hex().to_string(),
            },
            ContentHasher::Sha256(h) => Checksum {
                algorithm: ChecksumAlgorithm::Sha256,
                hex: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            },
        }
    }
}

/// A content checksum, written `algorithm:hex`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checksum {
    /// The algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// The digest in lower-case hex.
    pub hex: String,
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl FromStr for Checksum {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| Error::InvalidInput(format!("checksum {s:?} is not algorithm:hex")))?;
        let algorithm = match alg {
            "blake3" => ChecksumAlgorithm::Blake3,
            "sha256" => ChecksumAlgorithm::Sha256,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "unknown checksum algorithm {alg:?}; expected blake3 or sha256"
                )))
            }
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidInput(format!(
                "checksum digest {hex:?} is not 64 hex digits"
            )));
        }
        Ok(Checksum {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }
}

/// The checksum of a file, read once in 1 MiB chunks.
pub fn checksum_file(path: &Path, algorithm: ChecksumAlgorithm) -> Result<Checksum> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = ContentHasher::new(algorithm);
    crate::fsutil::stream(path, f, |b| h.update(b))?;
    Ok(h.finish())
}

/// Where a template version is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateStatus {
    /// Being prepared; not offered for deployments.
    Draft,
    /// Offered for new deployments.
    Published,
    /// Kept for the VMs that use it; not offered for new deployments.
    Deprecated,
}

impl fmt::Display for TemplateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TemplateStatus::Draft => "draft",
            TemplateStatus::Published => "published",
            TemplateStatus::Deprecated => "deprecated",
        })
    }
}

/// What an image's settings say about the thesis's image requirements (Table 2.2).
/// `None` means the settings do not tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageSettings {
    /// Guest OS type as the hypervisor names it (`Ubuntu_64`).
    #[serde(default)]
    pub os_type: Option<String>,
    /// Whether the first network adapter is bridged.
    #[serde(default)]
    pub bridged_adapter: Option<bool>,
    /// Version of the guest additions installed in the image.
    #[serde(default)]
    pub guest_additions_version: Option<String>,
}

impl ImageSettings {
    /// Reads what a QEMU backend VM settings file says.
    #[cfg(feature = "qemu")]
    pub fn from_qemu_settings(settings: &crate::qemu::VmSettings) -> Self {
        ImageSettings {
            os_type: settings.os_type.clone(),
            bridged_adapter: Some(settings.bridge_adapter.is_some()),
            guest_additions_version: None,
        }
    }
}

/// Whether one requirement holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "detail", rename_all = "kebab-case")]
pub enum RequirementStatus {
    /// The settings show it holds.
    Met,
    /// The settings show it does not hold, and why.
    NotMet(String),
    /// Cannot be decided from the settings (needs a running guest), and why.
    Unknown(String),
}

/// One of Table 2.2's requirements with its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Short name (`supported-os`, `bridged-adapter`, …).
    pub name: String,
    /// Its status.
    pub status: RequirementStatus,
}

/// What to check the settings against.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequirementPolicy {
    /// OS types the desktop cloud supports (empty: any OS type is accepted).
    pub supported_os: Vec<String>,
    /// The hosts' hypervisor version the guest additions must match, when known.
    pub hypervisor_version: Option<String>,
}

/// Checks Table 2.2's requirements against what the settings say.
///
/// ```
/// use unacloud_core::provision::catalog::{check_requirements, ImageSettings, RequirementPolicy, RequirementStatus};
/// let s = ImageSettings { os_type: Some("Ubuntu_64".into()), bridged_adapter: Some(false), ..Default::default() };
/// let r = check_requirements(&s, &RequirementPolicy::default());
/// let bridged = r.iter().find(|r| r.name == "bridged-adapter").unwrap();
/// assert!(matches!(bridged.status, RequirementStatus::NotMet(_)));
/// ```
pub fn check_requirements(
    settings: &ImageSettings,
    policy: &RequirementPolicy,
) -> Vec<Requirement> {
    let req = |name: &str, status| Requirement {
        name: name.to_owned(),
        status,
    };
    let os = match &settings.os_type {
        None => RequirementStatus::Unknown("the settings name no OS type".into()),
        Some(os)
            if policy.supported_os.is_empty()
                || policy
                    .supported_os
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(os)) =>
        {
            RequirementStatus::Met
        }
        Some(os) => RequirementStatus::NotMet(format!(
            "OS type {os} is not one of {}",
            policy.supported_os.join(", ")
        )),
    };
    let bridged = match settings.bridged_adapter {
        None => {
            RequirementStatus::Unknown("the settings do not describe the network adapter".into())
        }
        Some(true) => RequirementStatus::Met,
        Some(false) => RequirementStatus::NotMet(
            "the first network adapter is not bridged; desktop-cloud VMs need a bridged adapter"
                .into(),
        ),
    };
    let additions = match (
        &settings.guest_additions_version,
        &policy.hypervisor_version,
    ) {
        (Some(g), Some(h)) if g == h => RequirementStatus::Met,
        (Some(g), Some(h)) => RequirementStatus::NotMet(format!(
            "guest additions {g} do not match the hosts' hypervisor {h}"
        )),
        _ => {
            RequirementStatus::Unknown("guest additions or hypervisor version not recorded".into())
        }
    };
    let needs_guest = |what: &str| {
        RequirementStatus::Unknown(format!("{what} can only be checked in a running guest"))
    };
    vec![
        req("supported-os", os),
        req("bridged-adapter", bridged),
        req(
            "fixed-ip",
            RequirementStatus::Unknown(
                "the IP address is rewritten when each VM is configured".into(),
            ),
        ),
        req("guest-additions", additions),
        req(
            "superuser-account",
            needs_guest("a working superuser account"),
        ),
        req("remote-access", needs_guest("SSH access")),
    ]
}

/// One version of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateVersion {
    /// Template name (`ubuntu-16.04-dev`).
    pub name: String,
    /// Version number, from 1.
    pub version: u32,
    /// Guest OS.
    pub os: String,
    /// Image format.
    pub format: DiskFormat,
    /// Image length in bytes.
    pub size_bytes: u64,
    /// Content checksum.
    pub checksum: Checksum,
    /// File name hosts store the image under (`<name>-<version>.<ext>`).
    pub file_name: String,
    /// What the image's settings say.
    pub settings: ImageSettings,
    /// Table 2.2 requirements as checked when the version was added.
    pub requirements: Vec<Requirement>,
    /// Life-cycle status.
    pub status: TemplateStatus,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

impl TemplateVersion {
    /// `name@version`.
    pub fn id(&self) -> String {
        version_id(&self.name, self.version)
    }
}

fn version_id(name: &str, version: u32) -> String {
    format!("{name}@{version}")
}

/// A VM built from a template version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmUse {
    /// The host it runs on.
    pub host: String,
    /// The VM's name.
    pub vm: String,
}

impl fmt::Display for VmUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.vm, self.host)
    }
}

/// What to add to the catalog.
#[derive(Debug, Clone)]
pub struct NewTemplate {
    /// Template name.
    pub name: String,
    /// Guest OS.
    pub os: String,
    /// Image format.
    pub format: DiskFormat,
    /// The image file (read once to compute size and checksum).
    pub image: PathBuf,
    /// What its settings say.
    pub settings: ImageSettings,
    /// Requirements policy.
    pub policy: RequirementPolicy,
    /// Checksum algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// Free text.
    pub description: Option<String>,
}

impl NewTemplate {
    /// A template with default settings, policy and algorithm.
    pub fn new(
        name: impl Into<String>,
        os: impl Into<String>,
        format: DiskFormat,
        image: impl Into<PathBuf>,
    ) -> Self {
        NewTemplate {
            name: name.into(),
            os: os.into(),
            format,
            image: image.into(),
            settings: ImageSettings::default(),
            policy: RequirementPolicy::default(),
            algorithm: ChecksumAlgorithm::default(),
            description: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CatalogData {
    format: String,
    templates: Vec<TemplateVersion>,
    /// `name@version` → VMs built from it.
    usage: BTreeMap<String, Vec<VmUse>>,
    /// Highest version number ever given to each name, so removed numbers are never
    /// reused.
    #[serde(default)]
    last_versions: BTreeMap<String, u32>,
}

/// The template catalog, stored in one JSON file. Every change is saved before the call
/// returns; if saving fails the catalog in memory is left as it was.
#[derive(Debug, Clone)]
pub struct Catalog {
    path: PathBuf,
    data: CatalogData,
}

fn parse(path: &Path, text: &str) -> std::result::Result<CatalogData, String> {
    let data: CatalogData = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if data.format != CATALOG_FORMAT {
        return Err(format!(
            "format {:?}, expected {CATALOG_FORMAT:?}",
            data.format
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for t in &data.templates {
        if !seen.insert(t.id()) {
            return Err(format!("template {} appears twice", t.id()));
        }
    }
    let _ = path;
    Ok(data)
}

impl Catalog {
    /// Opens the catalog at `path`; a missing file is an empty catalog.
    ///
    /// A file that cannot be parsed is [`Error::Corrupt`], naming `<path>.bak` when a
    /// good previous copy exists (see [`Catalog::recover`]). Nothing is written.
    pub fn open(path: impl Into<PathBuf>) -> Result<Catalog> {
        let path = path.into();
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse(&path, &text) {
                Ok(data) => Ok(Catalog { path, data }),
                Err(reason) => {
                    let bak = backup_path(&path);
                    let backup = std::fs::read_to_string(&bak)
                        .ok()
                        .filter(|t| parse(&bak, t).is_ok())
                        .map(|_| bak);
                    Err(Error::Corrupt {
                        what: "template catalog",
                        path,
                        reason,
                        backup,
                    })
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Catalog {
                path,
                data: CatalogData {
                    format: CATALOG_FORMAT.to_owned(),
                    ..Default::default()
                },
            }),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Opens the last good copy `<path>.bak` of a corrupt catalog. The next change is
    /// saved to `path`; the corrupt file is first kept as `<path>.corrupt`.
    pub fn recover(path: impl Into<PathBuf>) -> Result<Catalog> {
        let path = path.into();
        let bak = backup_path(&path);
        let text = std::fs::read_to_string(&bak).map_err(|e| Error::io(&bak, e))?;
        let data = parse(&bak, &text).map_err(|reason| Error::Corrupt {
            what: "template catalog backup",
            path: bak.clone(),
            reason,
            backup: None,
        })?;
        if let Ok(bytes) = std::fs::read(&path) {
            if std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| parse(&path, t).ok())
                .is_none()
            {
                let corrupt = path.with_extension("json.corrupt");
                crate::fsutil::write_atomic(&corrupt, &bytes)?;
            }
        }
        Ok(Catalog { path, data })
    }

    /// The catalog file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every template version, in the order they were added.
    pub fn templates(&self) -> &[TemplateVersion] {
        &self.data.templates
    }

    /// One version.
    pub fn get(&self, name: &str, version: u32) -> Result<&TemplateVersion> {
        self.data
            .templates
            .iter()
            .find(|t| t.name == name && t.version == version)
            .ok_or_else(|| Error::NotFound {
                kind: "template version",
                id: version_id(name, version),
            })
    }

    /// The newest published version of `name`.
    pub fn latest_published(&self, name: &str) -> Result<&TemplateVersion> {
        self.data
            .templates
            .iter()
            .filter(|t| t.name == name && t.status == TemplateStatus::Published)
            .max_by_key(|t| t.version)
            .ok_or_else(|| Error::NotFound {
                kind: "published template",
                id: name.to_owned(),
            })
    }

    /// The VMs built from a version.
    pub fn users(&self, name: &str, version: u32) -> &[VmUse] {
        self.data
            .usage
            .get(&version_id(name, version))
            .map_or(&[], Vec::as_slice)
    }

    /// The version a VM was built from.
    pub fn version_of(&self, host: &str, vm: &str) -> Option<&TemplateVersion> {
        let (id, _) = self
            .data
            .usage
            .iter()
            .find(|(_, users)| users.iter().any(|u| u.host == host && u.vm == vm))?;
        self.data.templates.iter().find(|t| t.id() == *id)
    }

    fn commit(&mut self, data: CatalogData) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(&data).map_err(|e| Error::InvalidInput(e.to_string()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        // Keep the current file as the last good copy (it parsed when it was opened or
        // was written by this process), then replace it atomically.
        match std::fs::read(&self.path) {
            Ok(old) => {
                if std::str::from_utf8(&old)
                    .ok()
                    .and_then(|t| parse(&self.path, t).ok())
                    .is_some()
                {
                    crate::fsutil::write_atomic(&backup_path(&self.path), &old)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&self.path, e)),
        }
        crate::fsutil::write_atomic(&self.path, &bytes)?;
        self.data = data;
        Ok(())
    }

    /// Adds a new draft version of `new.name` (version = highest ever given + 1, so a
    /// removed version's number is never reused), reading the image once for its size
    /// and checksum. Returns the version number.
    pub fn add_draft(&mut self, new: NewTemplate) -> Result<u32> {
        if new.name.is_empty() || new.name.contains(['/', '\\', '@', '\0']) {
            return Err(Error::InvalidInput(format!(
                "template name {:?} must be non-empty without '/', '\\\\' or '@'",
                new.name
            )));
        }
        let size_bytes = std::fs::metadata(&new.image)
            .map_err(|e| Error::io(&new.image, e))?
            .len();
        let checksum = checksum_file(&new.image, new.algorithm)?;
        let version = self
            .data
            .templates
            .iter()
            .filter(|t| t.name == new.name)
            .map(|t| t.version)
            .chain(self.data.last_versions.get(&new.name).copied())
            .max()
            .unwrap_or(0)
            + 1;
        let ext = new
            .image
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| new.format.to_string().to_ascii_lowercase());
        let t = TemplateVersion {
            file_name: format!("{}-{version}.{ext}", new.name),
            name: new.name,
            version,
            os: new.os,
            format: new.format,
            size_bytes,
            checksum,
            requirements: check_requirements(&new.settings, &new.policy),
            settings: new.settings,
            status: TemplateStatus::Draft,
            description: new.description,
        };
        let mut data = self.data.clone();
        data.last_versions.insert(t.name.clone(), version);
        data.templates.push(t);
        self.commit(data)?;
        Ok(version)
    }

    fn set_status(&mut self, name: &str, version: u32, status: TemplateStatus) -> Result<()> {
        let t = self.get(name, version)?;
        if status == TemplateStatus::Published {
            let unmet: Vec<String> = t
                .requirements
                .iter()
                .filter_map(|r| match &r.status {
                    RequirementStatus::NotMet(why) => Some(format!("{}: {why}", r.name)),
                    _ => None,
                })
                .collect();
            if !unmet.is_empty() {
                return Err(Error::InvalidState {
                    operation: "publish",
                    id: t.id(),
                    state: format!("failing requirements ({})", unmet.join("; ")),
                });
            }
        }
        let mut data = self.data.clone();
        for t in &mut data.templates {
            if t.name == name && t.version == version {
                t.status = status;
            }
        }
        self.commit(data)
    }

    /// Offers a version for new deployments. Refused while a Table 2.2 requirement is
    /// known not to hold. VMs built from other versions are not touched.
    pub fn publish(&mut self, name: &str, version: u32) -> Result<()> {
        self.set_status(name, version, TemplateStatus::Published)
    }

    /// Withdraws a version from new deployments; VMs built from it keep it.
    pub fn deprecate(&mut self, name: &str, version: u32) -> Result<()> {
        self.set_status(name, version, TemplateStatus::Deprecated)
    }

    /// Records that `vm` on `host` was built from a version. Only published versions
    /// can be used for new VMs.
    pub fn record_use(&mut self, name: &str, version: u32, host: &str, vm: &str) -> Result<()> {
        let t = self.get(name, version)?;
        if t.status != TemplateStatus::Published {
            return Err(Error::InvalidState {
                operation: "build a VM from",
                id: t.id(),
                state: t.status.to_string(),
            });
        }
        let id = t.id();
        let mut data = self.data.clone();
        let users = data.usage.entry(id.clone()).or_default();
        let u = VmUse {
            host: host.to_owned(),
            vm: vm.to_owned(),
        };
        if users.contains(&u) {
            return Ok(());
        }
        if let Some((other, _)) = self
            .data
            .usage
            .iter()
            .find(|(k, us)| **k != id && us.contains(&u))
        {
            return Err(Error::AlreadyExists {
                kind: "VM built from template",
                id: format!("{u} (built from {other})"),
            });
        }
        users.push(u);
        users.sort();
        self.commit(data)
    }

    /// Forgets `vm` on `host` (after it was deleted). Unknown VMs are ignored.
    pub fn release_use(&mut self, host: &str, vm: &str) -> Result<()> {
        let mut data = self.data.clone();
        let mut changed = false;
        for users in data.usage.values_mut() {
            let before = users.len();
            users.retain(|u| !(u.host == host && u.vm == vm));
            changed |= users.len() != before;
        }
        data.usage.retain(|_, v| !v.is_empty());
        if changed {
            self.commit(data)?;
        }
        Ok(())
    }

    /// Moves the record of a VM to another host (after a migration).
    pub fn move_use(&mut self, vm: &str, from_host: &str, to_host: &str) -> Result<()> {
        let mut data = self.data.clone();
        for users in data.usage.values_mut() {
            for u in users.iter_mut() {
                if u.host == from_host && u.vm == vm {
                    u.host = to_host.to_owned();
                }
            }
            users.sort();
        }
        self.commit(data)
    }

    /// Removes a version from the catalog. Refused with [`Error::InUse`] listing the VMs
    /// while any VM was built from it.
    pub fn remove_version(&mut self, name: &str, version: u32) -> Result<()> {
        let t = self.get(name, version)?;
        let users = self.users(name, version);
        if !users.is_empty() {
            return Err(Error::InUse {
                id: t.id(),
                users: users.iter().map(ToString::to_string).collect(),
            });
        }
        let mut data = self.data.clone();
        data.templates
            .retain(|t| !(t.name == name && t.version == version));
        self.commit(data)
    }
}

fn backup_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".bak");
    PathBuf::from(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_published_test_vectors() {
        let mut h = ContentHasher::new(ChecksumAlgorithm::Sha256);
        h.update(b"abc");
        assert_eq!(
            h.finish().hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = ContentHasher::new(ChecksumAlgorithm::Blake3);
        h.update(b"");
        assert_eq!(
            h.finish().hex,
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn checksum_text_round_trips_and_rejects_garbage() {
        let mut h = ContentHasher::new(ChecksumAlgorithm::Blake3);
        h.update(b"x");
        let c = h.finish();
        assert_eq!(c.to_string().parse::<Checksum>().unwrap(), c);
        assert!("md5:abc".parse::<Checksum>().is_err());
        assert!("blake3:zz".parse::<Checksum>().is_err());
    }
}
