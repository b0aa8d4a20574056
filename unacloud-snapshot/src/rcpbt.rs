//! RCPBT, the *Ring-based Cloud Performance Benchmark Tool* of SPEC §6, as plain TCP
//! programs that know nothing about snapshots: a [`TestManager`] and N ring peers
//! ([`run_peer`]).
//!
//! Wire protocol (text lines over TCP, `\n`-terminated):
//!
//! ```text
//! peer → TM   REGISTER <ip>
//! TM → peer   ID <id> <port> <tokens> <participants>       (id 0 is the initiator)
//! peer → TM   READY                                        (listening on <ip>:<port>)
//! TM → peer   SUCC <ip> <port>                             (once all peers are READY)
//! TM → peer 0 START
//! peer → next Hello <n>        n = 0 … tokens-1, each peer forwards n+1
//! peer → next Exit <m>         after the last token; forwarded until every peer left
//! peer → TM   END <tokens>     (the peer that received the last token)
//! peer → TM   BYE <id> <hellos received>
//! ```
//!
//! The test manager sums the `Hello` messages every peer received: the application's own
//! proof that no message was lost or duplicated. It appends the CSV row
//! `tokens,duration_s,label,date` (Table 5.1).
//!
//! Every wait is bounded by the configured deadline.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::net::{Error, Result};

fn rerr(reason: impl Into<String>) -> Error {
    Error::Rcpbt {
        reason: reason.into(),
    }
}

async fn bounded<T>(
    deadline: Instant,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, fut)
        .await
        .map_err(|_| Error::Timeout {
            what: what.to_string(),
            after: left,
        })
}

async fn read_line(
    lines: &mut Lines<BufReader<OwnedReadHalf>>,
    deadline: Instant,
    what: &str,
) -> Result<String> {
    match bounded(deadline, what, lines.next_line()).await? {
        Ok(Some(l)) => Ok(l),
        Ok(None) => Err(rerr(format!("connection closed while waiting for {what}"))),
        Err(e) => Err(rerr(format!("read failed while waiting for {what}: {e}"))),
    }
}

async fn write_line(w: &mut OwnedWriteHalf, line: &str, what: &str) -> Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    w.write_all(&buf)
        .await
        .map_err(|e| rerr(format!("sending {what} failed: {e}")))
}

/// Test manager configuration.
#[derive(Debug, Clone)]
pub struct TestManagerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Number of tokens (`Hello 0` … `Hello tokens-1`).
    pub tokens: u64,
    /// Base port; peer `i` listens on `base_port + i`.
    pub base_port: u16,
    /// Number of ring peers (at least 2).
    pub participants: u32,
    /// Free-text label written to the CSV row.
    pub label: String,
    /// CSV file the row is appended to, if any.
    pub csv: Option<PathBuf>,
    /// Bound on the whole run.
    pub deadline: Duration,
}

/// What a ring run produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RingOutcome {
    /// Tokens configured.
    pub tokens_expected: u64,
    /// Sum of the `Hello` messages the peers received.
    pub tokens_counted: u64,
    /// Token count the last receiver announced in `END`.
    pub end_token: u64,
    /// `Hello` messages received per peer id.
    pub per_peer: Vec<u64>,
    /// From START to END, in seconds.
    pub duration_s: f64,
}

/// The RCPBT test manager.
#[derive(Debug)]
pub struct TestManager {
    cfg: TestManagerConfig,
    listener: TcpListener,
}

impl TestManager {
    /// Binds the listening socket.
    pub async fn bind(cfg: TestManagerConfig) -> Result<Self> {
        if cfg.participants < 2 {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "a ring needs at least 2 participants, {} configured",
                    cfg.participants
                ),
            });
        }
        if cfg.tokens == 0 {
            return Err(Error::InvalidConfig {
                reason: "a ring run needs at least 1 token".to_string(),
            });
        }
        if u32::from(cfg.base_port) + cfg.participants > 65_536 {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "base port {} + {} participants exceeds 65535",
                    cfg.base_port, cfg.participants
                ),
            });
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| Error::Network {
                peer: cfg.listen.to_string(),
                action: "listen",
                source,
            })?;
        Ok(Self { cfg, listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|source| Error::Network {
            peer: self.cfg.listen.to_string(),
            action: "read local address",
            source,
        })
    }

    /// Runs one ring to completion and appends the CSV row.
    pub async fn run(self) -> Result<RingOutcome> {
        let cfg = self.cfg;
        let deadline = Instant::now() + cfg.deadline;
        let n = cfg.participants as usize;
        let mut peers: Vec<(Ipv4Addr, Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf)> =
            Vec::with_capacity(n);
        while peers.len() < n {
            let (stream, from) =
                bounded(deadline, "ring peers to register", self.listener.accept())
                    .await?
                    .map_err(|source| Error::Network {
                        peer: cfg.listen.to_string(),
                        action: "accept",
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            let line = read_line(&mut lines, deadline, "REGISTER").await?;
            let ip: Ipv4Addr = match line.strip_prefix("REGISTER ").map(str::parse) {
                Some(Ok(ip)) => ip,
                _ => {
                    tracing::warn!(%from, %line, "ignoring a connection that did not register");
                    continue;
                }
            };
            let id = peers.len();
            let port = cfg.base_port + id as u16;
            write_line(
                &mut w,
                &format!("ID {id} {port} {} {}", cfg.tokens, cfg.participants),
                "ID",
            )
            .await?;
            peers.push((ip, lines, w));
        }
        for (ip, lines, _) in peers.iter_mut() {
            let l = read_line(lines, deadline, "READY").await?;
            if l != "READY" {
                return Err(rerr(format!("peer {ip} answered {l:?} instead of READY")));
            }
        }
        for i in 0..n {
            let (sip, _, _) = &peers[(i + 1) % n];
            let succ = format!("SUCC {sip} {}", cfg.base_port + ((i + 1) % n) as u16);
            write_line(&mut peers[i].2, &succ, "SUCC").await?;
        }
        let started = Instant::now();
        write_line(&mut peers[0].2, "START", "START").await?;

        // Collect END (from one peer) and BYE (from all), concurrently.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, String)>(4 * n);
        let mut writers = Vec::with_capacity(n);
        for (id, (_, mut lines, w)) in peers.into_iter().enumerate() {
            writers.push(w);
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(l)) = lines.next_line().await {
                    if tx.send((id, l)).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut per_peer = vec![None; n];
        let mut end: Option<(u64, Duration)> = None;
        while per_peer.iter().any(Option::is_none) {
            let msg = bounded(deadline, "the ring to finish", rx.recv()).await?;
            let Some((id, line)) = msg else {
                return Err(rerr(format!(
                    "peers {:?} left without saying BYE",
                    per_peer
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_none())
                        .map(|(i, _)| i)
                        .collect::<Vec<_>>()
                )));
            };
            let mut it = line.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some("END"), Some(t), None) => {
                    let t = t
                        .parse()
                        .map_err(|_| rerr(format!("bad END line {line:?}")))?;
                    end = Some((t, started.elapsed()));
                }
                (Some("BYE"), Some(pid), Some(count)) => {
                    let (Ok(pid), Ok(count)) = (pid.parse::<usize>(), count.parse::<u64>()) else {
                        return Err(rerr(format!("bad BYE line {line:?}")));
                    };
                    if pid != id {
                        return Err(rerr(format!("peer {id} said BYE as {pid}")));
                    }
                    per_peer[id] = Some(count);
                }
                _ => return Err(rerr(format!("peer {id} sent {line:?}"))),
            }
        }
        drop(writers);
        let (end_token, duration) =
            end.ok_or_else(|| rerr("every peer left but none announced END"))?;
        let per_peer: Vec<u64> = per_peer.into_iter().map(|v| v.unwrap_or(0)).collect();
        let outcome = RingOutcome {
            tokens_expected: cfg.tokens,
            tokens_counted: per_peer.iter().sum(),
            end_token,
            per_peer,
            duration_s: duration.as_secs_f64(),
        };
        if let Some(path) = &cfg.csv {
            append_csv_row(path, &outcome, &cfg.label)?;
        }
        Ok(outcome)
    }
}

/// Appends `tokens,duration_s,label,date` (writing the header when the file is new).
pub fn append_csv_row(path: &std::path::Path, o: &RingOutcome, label: &str) -> Result<()> {
    let label = label.replace([',', '\n', '\r'], " ");
    let row = format!(
        "{},{:.6},{},{}\n",
        o.tokens_counted,
        o.duration_s,
        label,
        utc_date_time(std::time::SystemTime::now())
    );
    append_results(path, "tokens,duration_s,label,date\n", &row)
}

/// Appends `rows` to the results file `path`, after `header` when the file is new.
pub(crate) fn append_results(path: &std::path::Path, header: &str, rows: &str) -> Result<()> {
    use std::io::Write;
    let io_error = |source: std::io::Error| Error::ResultsIo {
        path: path.to_path_buf(),
        source,
    };
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error)?;
    let text = if new {
        format!("{header}{rows}")
    } else {
        rows.to_string()
    };
    f.write_all(text.as_bytes()).map_err(io_error)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a system time (UTC).
pub fn utc_date_time(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    unacloud_core::time::CivilTime::from_unix(i64::try_from(secs).unwrap_or(i64::MAX)).to_string()
}

/// Ring peer configuration.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The test manager's address.
    pub manager: SocketAddr,
    /// This peer's own address (registered, and where it listens).
    pub ip: Ipv4Addr,
    /// Bound on the whole run.
    pub deadline: Duration,
}

/// What one peer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSummary {
    /// Id the manager assigned.
    pub id: u32,
    /// `Hello` messages received.
    pub hellos: u64,
    /// Whether this peer received the last token.
    pub ended: bool,
}

async fn connect_retry(addr: SocketAddr, deadline: Instant, what: &str) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if Instant::now() + backoff < deadline => {
                tracing::debug!(%addr, error = %e, "connect failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Err(source) => {
                return Err(Error::Network {
                    peer: format!("{what} {addr}"),
                    action: "connect",
                    source,
                })
            }
        }
    }
}

/// Runs one ring peer to completion.
pub async fn run_peer(cfg: PeerConfig) -> Result<PeerSummary> {
    let deadline = Instant::now() + cfg.deadline;
    let tm = bounded(
        deadline,
        "connecting to the test manager",
        connect_retry(cfg.manager, deadline, "test manager"),
    )
    .await??;
    let (r, mut tm_w) = tm.into_split();
    let mut tm_lines = BufReader::new(r).lines();
    write_line(&mut tm_w, &format!("REGISTER {}", cfg.ip), "REGISTER").await?;
    let id_line = read_line(&mut tm_lines, deadline, "ID").await?;
    let f: Vec<&str> = id_line.split_whitespace().collect();
    let (id, port, tokens, participants) = match f.as_slice() {
        ["ID", id, port, tokens, n] => {
            match (id.parse(), port.parse(), tokens.parse(), n.parse()) {
                (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
                _ => return Err(rerr(format!("bad ID line {id_line:?}"))),
            }
        }
        _ => return Err(rerr(format!("expected ID, got {id_line:?}"))),
    };
    let (id, port, tokens, participants): (u32, u16, u64, u64) = (id, port, tokens, participants);
    let listener = TcpListener::bind((cfg.ip, port))
        .await
        .map_err(|source| Error::Network {
            peer: format!("{}:{port}", cfg.ip),
            action: "listen",
            source,
        })?;
    write_line(&mut tm_w, "READY", "READY").await?;
    let succ_line = read_line(&mut tm_lines, deadline, "SUCC").await?;
    let succ: SocketAddr = match succ_line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["SUCC", ip, port] => match (ip.parse::<Ipv4Addr>(), port.parse::<u16>()) {
            (Ok(ip), Ok(port)) => SocketAddr::from((ip, port)),
            _ => return Err(rerr(format!("bad SUCC line {succ_line:?}"))),
        },
        _ => return Err(rerr(format!("expected SUCC, got {succ_line:?}"))),
    };
    // Connect to the successor and accept the predecessor concurrently.
    let (next, prev) = tokio::join!(
        connect_retry(succ, deadline, "successor"),
        bounded(deadline, "the predecessor to connect", listener.accept())
    );
    let next = next?;
    let (prev, _) = prev?.map_err(|source| Error::Network {
        peer: format!("{}:{port}", cfg.ip),
        action: "accept",
        source,
    })?;
    let _ = prev.set_nodelay(true);
    drop(listener);
    let (_nr, mut next_w) = next.into_split();
    let (pr, _pw) = prev.into_split();
    let mut prev_lines = BufReader::new(pr).lines();

    if id == 0 {
        let l = read_line(&mut tm_lines, deadline, "START").await?;
        if l != "START" {
            return Err(rerr(format!("expected START, got {l:?}")));
        }
        write_line(&mut next_w, "Hello 0", "Hello 0").await?;
    }
    let mut hellos = 0u64;
    let mut ended = false;
    loop {
        let l = read_line(&mut prev_lines, deadline, "the next token").await?;
        let mut it = l.split_whitespace();
        match (it.next(), it.next().map(str::parse::<u64>)) {
            (Some("Hello"), Some(Ok(n))) => {
                hellos += 1;
                if n + 1 >= tokens {
                    ended = true;
                    write_line(&mut tm_w, &format!("END {}", n + 1), "END").await?;
                    if participants > 1 {
                        write_line(&mut next_w, &format!("Exit {}", n + 1), "Exit").await?;
                    }
                    break;
                }
                write_line(&mut next_w, &format!("Hello {}", n + 1), "Hello").await?;
            }
            (Some("Exit"), Some(Ok(m))) => {
                // The peers still to leave after this one: participants - 2 - (m - tokens).
                if m.saturating_sub(tokens) + 2 < participants {
                    write_line(&mut next_w, &format!("Exit {}", m + 1), "Exit").await?;
                }
                break;
            }
            _ => return Err(rerr(format!("peer {id} received {l:?}"))),
        }
    }
    next_w
        .shutdown()
        .await
        .map_err(|e| rerr(format!("closing the ring connection failed: {e}")))?;
    write_line(&mut tm_w, &format!("BYE {id} {hellos}"), "BYE").await?;
    let _ = tm_w.shutdown().await;
    Ok(PeerSummary { id, hellos, ended })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_date_time(t), "2023-11-14T22:13:20Z");
        assert_eq!(utc_date_time(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    async fn ring(n: u32, tokens: u64) -> RingOutcome {
        // Peers on loopback addresses 127.0.0.10.., each listening on base + id; the
        // base is taken from a free ephemeral port (each peer has its own address, so
        // only the port numbers must be free on those addresses).
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port().clamp(20_000, 60_000);
        drop(probe);
        let tm = TestManager::bind(TestManagerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tokens,
            base_port: base,
            participants: n,
            label: "unit".into(),
            csv: None,
            deadline: Duration::from_secs(20),
        })
        .await
        .unwrap();
        let addr = tm.local_addr().unwrap();
        let mut peers = Vec::new();
        for i in 0..n {
            let ip = Ipv4Addr::new(127, 0, 0, 10 + i as u8);
            peers.push(tokio::spawn(run_peer(PeerConfig {
                manager: addr,
                ip,
                deadline: Duration::from_secs(20),
            })));
        }
        let out = tm.run().await.unwrap();
        let mut ended = 0;
        for p in peers {
            if p.await.unwrap().unwrap().ended {
                ended += 1;
            }
        }
        assert_eq!(ended, 1);
        out
    }

    #[tokio::test]
    async fn ring_counts_exactly() {
        for (n, t) in [(2, 1), (3, 100), (5, 1000)] {
            let o = ring(n, t).await;
            assert_eq!(o.tokens_counted, t, "{n} peers");
            assert_eq!(o.end_token, t);
            assert_eq!(o.per_peer.len(), n as usize);
        }
    }

    #[test]
    fn csv_row_has_header_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        let o = RingOutcome {
            tokens_expected: 3,
            tokens_counted: 3,
            end_token: 3,
            per_peer: vec![1, 2],
            duration_s: 0.5,
        };
        append_csv_row(&p, &o, "a,b").unwrap();
        append_csv_row(&p, &o, "x").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "tokens,duration_s,label,date");
        assert!(lines[1].starts_with("3,0.500000,a b,"));
    }
}
