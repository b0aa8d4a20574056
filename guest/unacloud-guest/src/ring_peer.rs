//! `ring-peer`: one ring peer of RCPBT, the token-ring benchmark, with blocking
//! `std::net`. It interoperates with the test manager of `unacloud-snapshot`
//! (`rcpbt.rs`) and behaves like its reference peer `run_peer`.
//!
//! ```text
//! peer → TM   REGISTER <ip>
//! TM → peer   ID <id> <port> <tokens> <participants>       (id 0 is the initiator)
//! peer → TM   READY                                        (listening on <ip>:<port>)
//! TM → peer   SUCC <ip> <port>
//! TM → peer 0 START
//! peer → next Hello <n>        n = 0 … tokens-1, each peer forwards n+1
//! peer → next Exit <m>         after the last token; forwarded until every peer left
//! peer → TM   END <tokens>     (the peer that received the last token)
//! peer → TM   BYE <id> <hellos received>
//! ```
//!
//! The VM this runs in may be snapshotted live, killed and restored from its memory
//! image much later, with its TCP connections. So nothing here measures wall-clock
//! time: the deadline (an `Instant`) is the only clock, every socket timeout is the
//! whole time left until it, and keepalive stays off; TCP retransmits what was lost.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// What went wrong, in words.
pub type Result<T> = std::result::Result<T, String>;

/// What one peer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Id the manager assigned.
    pub id: u32,
    /// `Hello` messages received.
    pub hellos: u64,
    /// Whether this peer received the last token.
    pub ended: bool,
}

fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    } else {
        Ok(left)
    }
}

/// A stream whose every read and write waits at most until the deadline.
struct Bounded {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream
            .set_read_timeout(Some(time_left(self.deadline)?))?;
        self.stream.read(buf)
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream
            .set_write_timeout(Some(time_left(self.deadline)?))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// One connection speaking `\n`-terminated lines. Reads go through a buffer, so lines
/// may arrive split over several segments or several in one.
struct Conn {
    io: BufReader<Bounded>,
    who: &'static str,
}

impl Conn {
    fn new(stream: TcpStream, deadline: Instant, who: &'static str) -> Result<Self> {
        stream
            .set_nodelay(true)
            .map_err(|e| format!("setting TCP_NODELAY on the {who} connection: {e}"))?;
        Ok(Self {
            io: BufReader::new(Bounded { stream, deadline }),
            who,
        })
    }

    /// Reads one line, without its `\n` (or `\r\n`).
    fn recv(&mut self, what: &str) -> Result<String> {
        let mut line = String::new();
        match self.io.read_line(&mut line) {
            Ok(0) => Err(format!(
                "the {} closed the connection while waiting for {what}",
                self.who
            )),
            Ok(_) => {
                if line.ends_with('\n') {
                    line.pop();
                    if line.ends_with('\r') {
                        line.pop();
                    }
                }
                Ok(line)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(format!(
                    "timed out waiting for {what} from the {}",
                    self.who
                ))
            }
            Err(e) => Err(format!("reading {what} from the {} failed: {e}", self.who)),
        }
    }

    /// Sends `line` and its `\n` in one write.
    fn send(&mut self, line: &str) -> Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.io
            .get_mut()
            .write_all(&buf)
            .map_err(|e| format!("sending {line:?} to the {} failed: {e}", self.who))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.io.get_ref().stream.shutdown(Shutdown::Write)
    }
}

/// Connects, retrying with a backoff of 5 ms doubling to 200 ms until the deadline
/// (the network may come up after the program starts, the successor may not listen yet).
fn connect_retry(addr: SocketAddr, deadline: Instant, who: &str) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let err = match time_left(deadline) {
            Ok(left) => match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => return Ok(s),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if Instant::now() + backoff >= deadline {
            return Err(format!("cannot connect to the {who} at {addr}: {err}"));
        }
        thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

/// Accepts one connection before the deadline (std has no accept timeout: the listener
/// is polled, every 1 ms at first, then every 20 ms).
fn accept_until(listener: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let mut pause = Duration::from_millis(1);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                thread::sleep(pause.min(time_left(deadline)?));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

fn parse_id(line: &str) -> Result<(u32, u16, u64, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["ID", id, port, tokens, n] => {
            match (id.parse(), port.parse(), tokens.parse(), n.parse()) {
                (Ok(a), Ok(b), Ok(c), Ok(d)) => Ok((a, b, c, d)),
                _ => Err(format!("bad ID line {line:?}")),
            }
        }
        _ => Err(format!("expected ID, got {line:?}")),
    }
}

fn parse_succ(line: &str) -> Result<SocketAddr> {
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["SUCC", ip, port] => match (ip.parse::<Ipv4Addr>(), port.parse::<u16>()) {
            (Ok(ip), Ok(port)) => Ok(SocketAddr::from((ip, port))),
            _ => Err(format!("bad SUCC line {line:?}")),
        },
        _ => Err(format!("expected SUCC, got {line:?}")),
    }
}

/// Runs one ring peer to completion; `log` gets the few lines meant for humans.
pub fn run(
    manager: SocketAddr,
    ip: Ipv4Addr,
    deadline: Duration,
    log: &mut dyn FnMut(&str),
) -> Result<Summary> {
    let deadline = Instant::now()
        .checked_add(deadline)
        .ok_or("the deadline is too far away")?;
    let mut tm = Conn::new(
        connect_retry(manager, deadline, "test manager")?,
        deadline,
        "test manager",
    )?;
    tm.send(&format!("REGISTER {ip}"))?;
    let (id, port, tokens, participants) = parse_id(&tm.recv("ID")?)?;
    let listener =
        TcpListener::bind((ip, port)).map_err(|e| format!("cannot listen on {ip}:{port}: {e}"))?;
    tm.send("READY")?;
    log(&format!(
        "ring-peer: registered as {id} (listening on {ip}:{port}, {tokens} tokens, {participants} peers)"
    ));
    let succ = parse_succ(&tm.recv("SUCC")?)?;

    // Connect to the successor and accept the predecessor concurrently.
    let connecting = thread::spawn(move || connect_retry(succ, deadline, "successor"));
    let prev = accept_until(&listener, deadline)
        .map_err(|e| format!("waiting for the predecessor on {ip}:{port}: {e}"))?;
    let next = connecting
        .join()
        .map_err(|_| "the connecting thread panicked".to_string())??;
    drop(listener);
    let mut prev = Conn::new(prev, deadline, "predecessor")?;
    let mut next = Conn::new(next, deadline, "successor")?;
    log(&format!("ring-peer: ring closed (successor {succ})"));

    if id == 0 {
        let l = tm.recv("START")?;
        if l != "START" {
            return Err(format!("expected START, got {l:?}"));
        }
        next.send("Hello 0")?;
    }
    let mut hellos = 0u64;
    let mut ended = false;
    loop {
        let l = prev.recv("the next token")?;
        let mut it = l.split_whitespace();
        match (it.next(), it.next().map(str::parse::<u64>)) {
            (Some("Hello"), Some(Ok(n))) => {
                hellos += 1;
                if n + 1 >= tokens {
                    ended = true;
                    tm.send(&format!("END {}", n + 1))?;
                    if participants > 1 {
                        next.send(&format!("Exit {}", n + 1))?;
                    }
                    break;
                }
                next.send(&format!("Hello {}", n + 1))?;
            }
            (Some("Exit"), Some(Ok(m))) => {
                // The peers still to leave after this one: participants - 2 - (m - tokens).
                if m.saturating_sub(tokens) + 2 < participants {
                    next.send(&format!("Exit {}", m + 1))?;
                }
                break;
            }
            _ => return Err(format!("peer {id} received {l:?}")),
        }
    }
    next.shutdown_write()
        .map_err(|e| format!("closing the ring connection failed: {e}"))?;
    tm.send(&format!("BYE {id} {hellos}"))?;
    let _ = tm.shutdown_write();
    if ended {
        log(&format!("ring-peer: received the last token, END {tokens}"));
    }
    log(&format!("ring-peer: done, {hellos} hellos"));
    Ok(Summary { id, hellos, ended })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal test manager speaking the protocol: returns (BYE counts by id, END counts).
    fn manager(
        listener: TcpListener,
        n: usize,
        tokens: u64,
        base: u16,
    ) -> (Vec<Option<u64>>, Vec<u64>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut peers = Vec::new();
        let mut ips = Vec::new();
        for id in 0..n {
            let (s, _) = listener.accept().expect("accept");
            let mut c = Conn::new(s, deadline, "peer").expect("conn");
            let reg = c.recv("REGISTER").expect("REGISTER");
            let ip: Ipv4Addr = reg
                .strip_prefix("REGISTER ")
                .and_then(|s| s.parse().ok())
                .expect("REGISTER <ip>");
            c.send(&format!("ID {id} {} {tokens} {n}", base + id as u16))
                .expect("ID");
            ips.push(ip);
            peers.push(c);
        }
        for c in &mut peers {
            assert_eq!(c.recv("READY").expect("READY"), "READY");
        }
        for (i, c) in peers.iter_mut().enumerate() {
            let j = (i + 1) % n;
            c.send(&format!("SUCC {} {}", ips[j], base + j as u16))
                .expect("SUCC");
        }
        peers[0].send("START").expect("START");
        // After START a peer only writes END/BYE and closes: read each to its end.
        let mut byes = vec![None; n];
        let mut ends = Vec::new();
        for (id, c) in peers.iter_mut().enumerate() {
            while let Ok(l) = c.recv("END or BYE") {
                match l.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["END", t] => ends.push(t.parse().expect("END <t>")),
                    ["BYE", pid, count] => {
                        assert_eq!(pid.parse::<usize>().expect("BYE id"), id);
                        assert!(byes[id].is_none(), "two BYEs from {id}");
                        byes[id] = Some(count.parse().expect("BYE count"));
                    }
                    other => panic!("unexpected line {other:?}"),
                }
            }
        }
        (byes, ends)
    }

    #[test]
    fn ring_of_three_counts_exactly() {
        let tokens = 50;
        let n = 3;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind manager");
        let addr = listener.local_addr().expect("addr");
        // Each peer has its own loopback address, so only base..base+n must be free there.
        let base = addr.port().clamp(20_000, 60_000);
        let tm = thread::spawn(move || manager(listener, n, tokens, base));
        let peers: Vec<_> = (0..n)
            .map(|i| {
                let ip = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
                thread::spawn(move || run(addr, ip, Duration::from_secs(20), &mut |_| {}))
            })
            .collect();
        let summaries: Vec<Summary> = peers
            .into_iter()
            .map(|p| p.join().expect("peer thread").expect("peer run"))
            .collect();
        let (byes, ends) = tm.join().expect("manager thread");
        let byes: Vec<u64> = byes.into_iter().map(|b| b.expect("a BYE")).collect();
        assert_eq!(byes.iter().sum::<u64>(), tokens);
        assert_eq!(ends, vec![tokens]);
        assert_eq!(summaries.iter().filter(|s| s.ended).count(), 1);
        let mut ids: Vec<u32> = summaries.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2]);
        for s in &summaries {
            assert_eq!(byes[s.id as usize], s.hellos);
        }
    }

    #[test]
    fn lines_may_arrive_split_or_batched() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let writer = thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            for part in ["Hel", "lo 1\nHello 2\r\nEx", "it 3\n"] {
                s.write_all(part.as_bytes()).expect("write");
                thread::sleep(Duration::from_millis(20));
            }
        });
        let (s, _) = listener.accept().expect("accept");
        let mut c = Conn::new(s, Instant::now() + Duration::from_secs(10), "test").expect("conn");
        assert_eq!(c.recv("1").expect("1"), "Hello 1");
        assert_eq!(c.recv("2").expect("2"), "Hello 2");
        assert_eq!(c.recv("3").expect("3"), "Exit 3");
        writer.join().expect("writer");
        assert!(c.recv("eof").is_err());
    }

    #[test]
    fn waits_end_at_the_deadline() {
        // A manager that accepts but never answers: reading ID times out.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let started = Instant::now();
        let err = run(
            addr,
            Ipv4Addr::LOCALHOST,
            Duration::from_millis(300),
            &mut |_| {},
        )
        .expect_err("must time out");
        assert!(err.contains("timed out waiting for ID"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(listener);

        // Nobody listening: the connection retries end at the deadline.
        let started = Instant::now();
        let err = run(
            addr,
            Ipv4Addr::LOCALHOST,
            Duration::from_millis(300),
            &mut |_| {},
        )
        .expect_err("must fail");
        assert!(err.contains("cannot connect to the test manager"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn protocol_lines_parse() {
        assert_eq!(parse_id("ID 2 7002 100 5"), Ok((2, 7002, 100, 5)));
        assert!(parse_id("ID 2 70000 100 5").is_err());
        assert!(parse_id("SUCC 1.2.3.4 5").is_err());
        assert_eq!(
            parse_succ("SUCC 10.0.0.3 7001"),
            Ok(SocketAddr::from(([10, 0, 0, 3], 7001)))
        );
        assert!(parse_succ("SUCC ::1 7001").is_err());
        assert!(parse_succ("START").is_err());
    }
}
