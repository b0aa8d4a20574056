//! Running `qemu-img` and parsing what it prints.
//!
//! Every call runs the real program through `tokio::process` with a time limit; the
//! child is killed when the limit passes or the future is dropped. Structured output is
//! read from `--output=json` (the form QEMU documents as machine-readable); snapshot
//! lists come from `qemu-img info --output=json`, which reports the same internal
//! snapshots as `qemu-img snapshot -l` in a stable format.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The backend name used in errors.
pub(crate) const BACKEND: &str = "qemu";

/// One image as `qemu-img info --output=json` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The image file as qemu-img names it.
    pub filename: String,
    /// Its format (`qcow2`, `raw`, …).
    pub format: String,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host file system.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// The backing file as written in the image header.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// The backing file resolved to a full path.
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    /// The backing file's format, when the header records it.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// Cluster size (qcow2).
    #[serde(default)]
    pub cluster_size: Option<u64>,
    /// Whether the image was not closed cleanly.
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    /// Internal snapshots.
    #[serde(default)]
    pub snapshots: Vec<ImageSnapshot>,
}

/// One internal snapshot of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageSnapshot {
    /// The numeric id qemu-img assigned (per image).
    pub id: String,
    /// The tag (qemu-img's name for the snapshot's name).
    pub name: String,
    /// Bytes of saved VM state (0 for a snapshot of a stopped VM).
    #[serde(default)]
    pub vm_state_size: u64,
    /// Creation time, seconds since the Unix epoch.
    #[serde(default)]
    pub date_sec: i64,
    /// Nanoseconds part of the creation time.
    #[serde(default)]
    pub date_nsec: i64,
}

/// Parses the output of `qemu-img info --output=json`, with or without
/// `--backing-chain` (an array from the image down to its base, or one object).
///
/// ```
/// let one = r#"{"filename": "t.qcow2", "format": "qcow2", "virtual-size": 1048576}"#;
/// let chain = unacloud_core::qemu::parse_info(one).unwrap();
/// assert_eq!(chain[0].virtual_size, 1 << 20);
/// ```
pub fn parse_info(json: &str) -> Result<Vec<ImageInfo>> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::Backend {
        backend: BACKEND.to_owned(),
        message: format!("qemu-img info printed JSON this library cannot read: {e}"),
    })?;
    let parse = |v: serde_json::Value| {
        serde_json::from_value::<ImageInfo>(v).map_err(|e| Error::Backend {
            backend: BACKEND.to_owned(),
            message: format!("unexpected qemu-img info JSON: {e}"),
        })
    };
    match value {
        serde_json::Value::Array(items) => items.into_iter().map(parse).collect(),
        v @ serde_json::Value::Object(_) => Ok(vec![parse(v)?]),
        _ => Err(Error::Backend {
            backend: BACKEND.to_owned(),
            message: "qemu-img info printed neither an object nor an array".to_owned(),
        }),
    }
}

/// Runs the `qemu-img` program.
#[derive(Debug, Clone)]
pub struct QemuImg {
    program: PathBuf,
    timeout: Duration,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg::new()
    }
}

impl QemuImg {
    /// `qemu-img` from `PATH`, each call limited to 2 minutes.
    pub fn new() -> Self {
        QemuImg {
            program: PathBuf::from("qemu-img"),
            timeout: Duration::from_secs(120),
        }
    }

    /// Uses another program (a full path, or a wrapper script).
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Changes the time limit of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The program that is run.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Runs qemu-img with `args` and returns its standard output.
    pub async fn run(&self, operation: &'static str, args: &[&OsStr]) -> Result<String> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(args);
        let out = match output_within(cmd, self.timeout).await {
            Ok(out) => out,
            Err(Ran::Spawn(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Unsupported {
                    backend: BACKEND.to_owned(),
                    operation,
                    reason: format!(
                        "{} was not found; install qemu-utils (Debian/Ubuntu) or qemu-img",
                        self.program.display()
                    ),
                })
            }
            Err(Ran::Spawn(e) | Ran::Wait(e)) => return Err(Error::io(&self.program, e)),
            Err(Ran::TimedOut) => {
                return Err(Error::Timeout {
                    operation,
                    after: self.timeout,
                })
            }
        };
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        // The image the command is about: its last argument that is neither an option
        // nor a size.
        let path = args
            .iter()
            .rev()
            .find(|a| {
                let a = a.to_string_lossy();
                !a.starts_with('-') && !a.chars().all(|c| c.is_ascii_digit())
            })
            .map(PathBuf::from)
            .unwrap_or_default();
        Err(Error::QemuImg {
            operation,
            path,
            kind: crate::error::ImageFailure::classify(&stderr),
            exit_code: out.status.code(),
            source: crate::error::ToolOutput {
                status: out.status.to_string(),
                stderr,
            },
        })
    }

    /// `qemu-img --version`, first line.
    pub async fn version(&self) -> Result<String> {
        let out = self
            .run("query version", &[OsStr::new("--version")])
            .await?;
        Ok(out.lines().next().unwrap_or_default().to_owned())
    }

    /// Creates an empty image of `size` bytes in `format`.
    pub async fn create(&self, path: &Path, format: &str, size: u64) -> Result<()> {
        let size = size.to_string();
        self.run(
            "create image",
            &[
                OsStr::new("create"),
                OsStr::new("-q"),
                OsStr::new("-f"),
                OsStr::new(format),
                path.as_os_str(),
                OsStr::new(&size),
            ],
        )
        .await
        .map(drop)
    }

    /// Creates a qcow2 overlay of `backing` (`qemu-img create -f qcow2 -b … -F …`).
    pub async fn create_overlay(
        &self,
        path: &Path,
        backing: &Path,
        backing_format: &str,
    ) -> Result<()> {
        self.overlay(path, backing, backing_format, None).await
    }

    /// Converts an image (`qemu-img convert -f <from> -O <to> src dst`).
    pub async fn convert(&self, src: &Path, from: &str, dst: &Path, to: &str) -> Result<()> {
        self.run(
            "convert image",
            &[
                OsStr::new("convert"),
                OsStr::new("-q"),
                OsStr::new("-f"),
                OsStr::new(from),
                OsStr::new("-O"),
                OsStr::new(to),
                src.as_os_str(),
                dst.as_os_str(),
            ],
        )
        .await
        .map(drop)
    }

    /// `qemu-img info --output=json` of one image (its backing file is not opened).
    pub async fn info(&self, path: &Path) -> Result<ImageInfo> {
        let out = self
            .run(
                "inspect image",
                &[
                    OsStr::new("info"),
                    OsStr::new("--output=json"),
                    OsStr::new("-U"),
                    path.as_os_str(),
                ],
            )
            .await?;
        parse_info(&out)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Backend {
                backend: BACKEND.to_owned(),
                message: format!("qemu-img info printed nothing for {}", path.display()),
            })
    }

    /// `qemu-img info --backing-chain --output=json`: the image first, its base last.
    pub async fn info_chain(&self, path: &Path) -> Result<Vec<ImageInfo>> {
        let out = self
            .run(
                "inspect backing chain",
                &[
                    OsStr::new("info"),
                    OsStr::new("--backing-chain"),
                    OsStr::new("--output=json"),
                    OsStr::new("-U"),
                    path.as_os_str(),
                ],
            )
            .await?;
        parse_info(&out)
    }

    async fn snapshot(
        &self,
        operation: &'static str,
        flag: &str,
        tag: &str,
        path: &Path,
    ) -> Result<()> {
        self.run(
            operation,
            &[
                OsStr::new("snapshot"),
                OsStr::new(flag),
                OsStr::new(tag),
                path.as_os_str(),
            ],
        )
        .await
        .map(drop)
    }

    /// `qemu-img snapshot -c <tag>`.
    pub async fn snapshot_create(&self, path: &Path, tag: &str) -> Result<()> {
        self.snapshot("take snapshot", "-c", tag, path).await
    }

    /// `qemu-img snapshot -a <tag>`: reverts the image to the snapshot.
    pub async fn snapshot_apply(&self, path: &Path, tag: &str) -> Result<()> {
        self.snapshot("restore snapshot", "-a", tag, path).await
    }

    /// `qemu-img snapshot -d <tag>`.
    pub async fn snapshot_delete(&self, path: &Path, tag: &str) -> Result<()> {
        self.snapshot("delete snapshot", "-d", tag, path).await
    }

    /// Creates a qcow2 overlay of `backing` without opening it (`-u`), so it can be made
    /// while a running VM holds the backing image's write lock. `backing` is written
    /// into the header as given (a relative name is resolved from the overlay's folder).
    pub async fn create_overlay_unopened(
        &self,
        path: &Path,
        backing: &Path,
        backing_format: &str,
        size: u64,
    ) -> Result<()> {
        self.overlay(path, backing, backing_format, Some(size))
            .await
    }

    /// `qemu-img create -f qcow2 -b <backing> -F <format> <path>`, with `-u <size>` when
    /// the backing image is not to be opened.
    async fn overlay(
        &self,
        path: &Path,
        backing: &Path,
        backing_format: &str,
        unopened_size: Option<u64>,
    ) -> Result<()> {
        let size = unopened_size.map(|s| s.to_string());
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
        ];
        if size.is_some() {
            args.push(OsStr::new("-u"));
        }
        args.extend([
            OsStr::new("-b"),
            backing.as_os_str(),
            OsStr::new("-F"),
            OsStr::new(backing_format),
            path.as_os_str(),
        ]);
        args.extend(size.as_deref().map(OsStr::new));
        self.run("create overlay", &args).await.map(drop)
    }

    /// Moves an overlay onto another backing image, copying whatever differs so the
    /// overlay's content stays the same (`qemu-img rebase -b <backing> -F <format>`):
    /// how a snapshot between the two is merged away.
    pub async fn rebase_safe(&self, path: &Path, backing: &Path, format: &str) -> Result<()> {
        self.run(
            "merge snapshot image",
            &[
                OsStr::new("rebase"),
                OsStr::new("-q"),
                OsStr::new("-b"),
                backing.as_os_str(),
                OsStr::new("-F"),
                OsStr::new(format),
                path.as_os_str(),
            ],
        )
        .await
        .map(drop)
    }

    /// Writes the content of `src` (its whole chain) into a new qcow2 overlay `dst` of
    /// `backing`, storing only what differs from it (`qemu-img convert -B`).
    pub async fn convert_onto(
        &self,
        src: &Path,
        dst: &Path,
        backing: &Path,
        backing_format: &str,
    ) -> Result<()> {
        self.run(
            "copy image",
            &[
                OsStr::new("convert"),
                OsStr::new("-q"),
                OsStr::new("-O"),
                OsStr::new("qcow2"),
                OsStr::new("-B"),
                backing.as_os_str(),
                OsStr::new("-F"),
                OsStr::new(backing_format),
                src.as_os_str(),
                dst.as_os_str(),
            ],
        )
        .await
        .map(drop)
    }

    /// Points an overlay at another copy of its backing file without touching data
    /// (`qemu-img rebase -u -b <backing> -F <format>`).
    pub async fn rebase_unsafe(&self, path: &Path, backing: &Path, format: &str) -> Result<()> {
        let mut b = OsString::from(backing.as_os_str());
        b.push("");
        self.run(
            "rebase overlay",
            &[
                OsStr::new("rebase"),
                OsStr::new("-u"),
                OsStr::new("-b"),
                &b,
                OsStr::new("-F"),
                OsStr::new(format),
                path.as_os_str(),
            ],
        )
        .await
        .map(drop)
    }
}

/// Why [`output_within`] gave no output.
#[derive(Debug)]
pub(crate) enum Ran {
    /// The program could not be started (`NotFound`: it is not installed).
    Spawn(std::io::Error),
    /// Waiting for it or reading its output failed.
    Wait(std::io::Error),
    /// It ran longer than allowed and was killed.
    TimedOut,
}

/// Runs `cmd` with no standard input and its output captured, and returns the output.
/// The process is killed when it outlives `limit`, and when the returned future is
/// dropped (the caller was cancelled), so no tool outlives the operation that ran it.
pub(crate) async fn output_within(
    mut cmd: tokio::process::Command,
    limit: Duration,
) -> std::result::Result<std::process::Output, Ran> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(Ran::Spawn)?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.map_err(Ran::Wait),
        Err(_) => Err(Ran::TimedOut),
    }
}
