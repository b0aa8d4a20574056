//! A small client of the QEMU Machine Protocol (QMP) over a Unix socket.
//!
//! QMP is line-delimited JSON: the server greets with `{"QMP": …}`, the client enters
//! command mode with `qmp_capabilities`, then sends `{"execute", "arguments", "id"}` and
//! reads either `{"return", "id"}` or `{"error": {"class", "desc"}, "id"}`. Asynchronous
//! events (`{"event", "data", "timestamp"}`) may arrive at any time between replies;
//! they are kept, in order, for [`Qmp::take_events`].
//!
//! Why not the `qapi` crate: it was evaluated first. Its `qapi-qmp` types are generated
//! at build time from the QEMU schema the crate bundles, i.e. from one QEMU release,
//! while this backend must work with Debian 12's QEMU 7.2 and anything newer; it brings
//! its own codec and executor glue for a dozen commands that have been stable since
//! QEMU 6 (`stop`, `cont`, `transaction`, `migrate`, `query-migrate`, `query-status`,
//! `migrate-set-capabilities`, `query-migrate-capabilities`, `query-block`, `quit`).
//! So this client speaks `serde_json::Value`, about 200 lines with its tests, and
//! capabilities are probed at run time instead of assumed from a schema.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

use super::img::BACKEND;

/// Longest reply line accepted from QEMU (query-block of a deep chain is a few KiB).
const MAX_LINE: usize = 4 << 20;

/// A connected QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: Vec<Value>,
    timeout: Duration,
    version: (u64, u64, u64),
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates command
    /// mode; each step is bounded by `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| Error::Timeout {
                operation: "connect to QMP",
                after: timeout,
            })?
            .map_err(|e| Error::io(path, e))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            events: Vec::new(),
            timeout,
            version: (0, 0, 0),
        };
        let greeting = qmp.read_message("read the QMP greeting").await?;
        let v = &greeting["QMP"]["version"]["qemu"];
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.version = (
            v["major"].as_u64().unwrap_or(0),
            v["minor"].as_u64().unwrap_or(0),
            v["micro"].as_u64().unwrap_or(0),
        );
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version as the greeting announced it.
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// Runs one command and returns its `return` value; a QMP error becomes
    /// [`Error::Backend`] naming the command, the error class and QEMU's description.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let (id, line) = self.command_line(command, arguments);
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| Error::io(&self.path, e))?;
        self.read_reply(command, id).await
    }

    /// Hands QEMU an open file under `name` (QMP `getfd`, the descriptor travelling as
    /// `SCM_RIGHTS` ancillary data), for a later `fd:<name>` migration target: QEMU
    /// then writes the file itself, with no shell and no helper process.
    pub async fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let (id, line) = self.command_line("getfd", Some(json!({ "fdname": name })));
        let raw = [fd.as_raw_fd()];
        let sock = self.writer.as_ref();
        loop {
            sock.writable()
                .await
                .map_err(|e| Error::io(&self.path, e))?;
            let iov = [std::io::IoSlice::new(line.as_bytes())];
            let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    sock.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == line.len() => break,
                Ok(_) => return Err(self.protocol("a getfd command was sent in part".to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        self.read_reply("getfd", id).await.map(drop)
    }

    fn command_line(&mut self, command: &str, arguments: Option<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        (id, line)
    }

    async fn read_reply(&mut self, command: &str, id: u64) -> Result<Value> {
        loop {
            let reply = self.read_message(command_operation(command)).await?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to a command whose caller gave up (timeout): skip it.
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(Error::Backend {
                    backend: BACKEND.to_owned(),
                    message: format!(
                        "QMP command {command} failed: {}: {}",
                        err["class"].as_str().unwrap_or("GenericError"),
                        err["desc"].as_str().unwrap_or("(no description)")
                    ),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Events received so far, oldest first; the buffer is emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// `query-status`: QEMU's run state (`running`, `paused`, `inmigrate`, …).
    pub async fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", None).await?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Whether the migration capability `name` exists in this QEMU.
    pub async fn has_migration_capability(&mut self, name: &str) -> Result<bool> {
        let caps = self.execute("query-migrate-capabilities", None).await?;
        Ok(caps
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["capability"] == name)))
    }

    async fn read_message(&mut self, operation: &'static str) -> Result<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.read_bounded_line(&mut line))
            .await
            .map_err(|_| Error::Timeout {
                operation,
                after: self.timeout,
            })??;
        if n == 0 {
            return Err(self.protocol("QEMU closed the QMP connection".to_owned()));
        }
        serde_json::from_str(&line)
            .map_err(|e| self.protocol(format!("QEMU sent a line that is not JSON ({e})")))
    }

    async fn read_bounded_line(&mut self, line: &mut String) -> Result<usize> {
        let mut buf = Vec::new();
        loop {
            let chunk = self
                .reader
                .fill_buf()
                .await
                .map_err(|e| Error::io(&self.path, e))?;
            if chunk.is_empty() {
                break;
            }
            let (take, done) = match memchr_newline(chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            buf.extend_from_slice(&chunk[..take]);
            self.reader.consume(take);
            if buf.len() > MAX_LINE {
                return Err(self.protocol(format!("a QMP line exceeded {MAX_LINE} bytes")));
            }
            if done {
                break;
            }
        }
        *line = String::from_utf8_lossy(&buf).into_owned();
        Ok(buf.len())
    }

    fn protocol(&self, message: String) -> Error {
        Error::Backend {
            backend: BACKEND.to_owned(),
            message: format!("QMP at {}: {message}", self.path.display()),
        }
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// A `'static` operation name for timeouts of well-known commands.
fn command_operation(command: &str) -> &'static str {
    match command {
        "stop" => "QMP stop",
        "cont" => "QMP cont",
        "transaction" => "QMP transaction",
        "migrate" => "QMP migrate",
        "query-migrate" => "QMP query-migrate",
        "query-status" => "QMP query-status",
        "quit" => "QMP quit",
        "qmp_capabilities" => "QMP capabilities negotiation",
        _ => "QMP command",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake QMP server that greets, then answers each line with the given replies.
    async fn serve(listener: UnixListener, replies: Vec<String>) {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(
            b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n",
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 4096];
        for r in replies {
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(r.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn events_between_replies_are_kept_and_errors_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve(
            listener,
            vec![
                "{\"return\": {}, \"id\": 1}\n".into(),
                "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {\"status\": \"paused\", \"running\": false}, \"id\": 2}\n".into(),
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"No space left on device\"}, \"id\": 3}\n".into(),
            ],
        ));
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).await.unwrap();
        assert_eq!(q.version(), (7, 2, 22));
        assert_eq!(q.status().await.unwrap(), "paused");
        assert_eq!(q.take_events()[0]["event"], "STOP");
        match q
            .execute("migrate", Some(json!({"uri": "exec:true"})))
            .await
        {
            Err(Error::Backend { message, .. }) => {
                assert!(message.contains("migrate") && message.contains("No space left"))
            }
            other => panic!("expected a backend error, got {other:?}"),
        }
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_that_is_not_qmp_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"SSH-2.0-OpenSSH\n").await.unwrap();
        });
        assert!(matches!(
            Qmp::connect(&sock, Duration::from_secs(5)).await,
            Err(Error::Backend { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let _keep = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        assert!(matches!(
            Qmp::connect(&sock, Duration::from_millis(200)).await,
            Err(Error::Timeout { .. })
        ));
    }
}
