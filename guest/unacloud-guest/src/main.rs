//! `unacloud-guest`: the agent inside the unacloud test guest.
//!
//! `heartbeat` proves from the outside that a VM is alive and that its disk keeps
//! changing: once per interval it writes `heartbeat <n>` to the serial console and
//! `<n>\n` to a state file on the root disk. `ring-peer` is a ring peer of RCPBT, the
//! token-ring benchmark, so the ring can run inside VMs (see [`ring_peer`]). The program
//! uses only the standard library and is linked statically, so it runs in the
//! busybox-only guest.

mod ring_peer;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const DEFAULT_CONSOLE: &str = "/dev/ttyS0";
const DEFAULT_STATE: &str = "/var/lib/unacloud/heartbeat";
const DEFAULT_INTERVAL_MS: u64 = 1000;
const DEFAULT_DEADLINE_S: u64 = 3600;

const USAGE: &str = "\
unacloud-guest: the agent of the unacloud test guest

USAGE:
    unacloud-guest heartbeat [--console PATH] [--state PATH] [--interval-ms N] [--count N]
    unacloud-guest ring-peer --manager IP:PORT --ip IP [--deadline-s N] [--console PATH]
    unacloud-guest --help | --version

heartbeat:
    Once per interval, writes the line `heartbeat <n>` (n = 1, 2, ... since start) to
    the console and `<n>` plus a newline to the state file. The state file is replaced
    atomically and durably (PATH.tmp is written and fsynced, then renamed over PATH),
    so it always holds a whole number and the guest's disk changes every beat. The
    state is written before the console line: `heartbeat <n>` on the console means
    n has reached the disk.

    --console PATH     console to write to, `-` for stdout   [default: /dev/ttyS0]
    --state PATH       state file to overwrite                [default: /var/lib/unacloud/heartbeat]
    --interval-ms N    milliseconds between beats, >= 1       [default: 1000]
    --count N          stop after N beats                     [default: never stop]

    Errors go to stderr; a failed write is reported once and retried on the next beat.

ring-peer:
    One peer of an RCPBT token ring (the test manager of unacloud-snapshot). Connects
    to the manager (retrying until the deadline: the network may come up later), sends
    `REGISTER <IP>`, listens on IP and the port the manager assigns, connects to its
    successor while accepting its predecessor, forwards `Hello <n>` tokens as `Hello
    <n+1>`, then `Exit` messages, and says `BYE <id> <hellos received>` (and `END
    <tokens>` if it received the last token). Prints `ring-peer: registered as <id>
    ...`, `ring-peer: ring closed ...` and `ring-peer: done, <n> hellos` on the
    console; an error is printed as `ring-peer: error: ...` (on stderr, and on the
    console too when it is not stdout) and exits with status 1. Every wait ends at the
    deadline, measured from start with the monotonic clock only; the VM may be
    snapshotted, killed and restored with its TCP connections meanwhile.

    --manager IP:PORT  the test manager's address             [required]
    --ip IP            this peer's IPv4 address                [required]
    --deadline-s N     bound on the whole run, seconds, >= 1   [default: 3600]
    --console PATH     console to write to, `-` for stdout    [default: -]

Exit status: 0 done, 1 runtime error, 2 usage error.
";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Help,
    Version,
    Heartbeat(HeartbeatOpts),
    RingPeer(RingPeerOpts),
}

/// Options of `heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeartbeatOpts {
    console: PathBuf,
    state: PathBuf,
    interval: Duration,
    count: Option<u64>,
}

impl Default for HeartbeatOpts {
    fn default() -> Self {
        Self {
            console: PathBuf::from(DEFAULT_CONSOLE),
            state: PathBuf::from(DEFAULT_STATE),
            interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
            count: None,
        }
    }
}

/// Options of `ring-peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RingPeerOpts {
    manager: SocketAddr,
    ip: Ipv4Addr,
    deadline: Duration,
    console: PathBuf,
}

/// A command-line mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage_err(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Walks the options of a subcommand: `--flag value` or `--flag=value`.
struct Flags<I> {
    args: I,
    inline: Option<String>,
}

impl<I: Iterator<Item = String>> Flags<I> {
    /// The next flag; its `=value`, if any, is kept for [`Flags::value`].
    fn next_flag(&mut self) -> Option<String> {
        let arg = self.args.next()?;
        match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => {
                self.inline = Some(v.to_string());
                Some(f.to_string())
            }
            _ => {
                self.inline = None;
                Some(arg)
            }
        }
    }

    /// The value of the flag `name` just returned by [`Flags::next_flag`].
    fn value(&mut self, name: &str) -> Result<String, UsageError> {
        match self.inline.take() {
            Some(v) => Ok(v),
            None => self
                .args
                .next()
                .ok_or_else(|| usage_err(format!("{name} needs a value"))),
        }
    }

    /// The value of `name`, which must not be empty (a path).
    fn path(&mut self, name: &str) -> Result<PathBuf, UsageError> {
        let v = self.value(name)?;
        if v.is_empty() {
            return Err(usage_err(format!("{name} must not be empty")));
        }
        Ok(PathBuf::from(v))
    }

    /// The value of `name` as a whole number of at least `min`.
    fn number(&mut self, name: &str, min: u64) -> Result<u64, UsageError> {
        let v = self.value(name)?;
        let n: u64 = v
            .parse()
            .map_err(|_| usage_err(format!("{name}: `{v}` is not a whole number")))?;
        if n < min {
            return Err(usage_err(format!("{name} must be at least {min}")));
        }
        Ok(n)
    }
}

fn is_help(flag: &str) -> bool {
    flag == "-h" || flag == "--help"
}

fn parse_args<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = String>,
{
    let mut args = args.into_iter();
    let sub = match args.next() {
        None => return Err(usage_err("missing subcommand (try --help)")),
        Some(s) => s,
    };
    let flags = Flags { args, inline: None };
    match sub.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "-V" | "--version" => Ok(Command::Version),
        "heartbeat" => parse_heartbeat(flags),
        "ring-peer" => parse_ring_peer(flags),
        other => Err(usage_err(format!(
            "unknown subcommand `{other}` (try --help)"
        ))),
    }
}

fn parse_heartbeat<I: Iterator<Item = String>>(mut flags: Flags<I>) -> Result<Command, UsageError> {
    let mut opts = HeartbeatOpts::default();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            f if is_help(f) => return Ok(Command::Help),
            "--console" => opts.console = flags.path("--console")?,
            "--state" => opts.state = flags.path("--state")?,
            "--interval-ms" => {
                opts.interval = Duration::from_millis(flags.number("--interval-ms", 1)?);
            }
            "--count" => opts.count = Some(flags.number("--count", 0)?),
            other => return Err(usage_err(format!("heartbeat: unknown option `{other}`"))),
        }
    }
    Ok(Command::Heartbeat(opts))
}

fn parse_ring_peer<I: Iterator<Item = String>>(mut flags: Flags<I>) -> Result<Command, UsageError> {
    let mut manager = None;
    let mut ip = None;
    let mut deadline = Duration::from_secs(DEFAULT_DEADLINE_S);
    let mut console = PathBuf::from("-");
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            f if is_help(f) => return Ok(Command::Help),
            "--manager" => {
                let v = flags.value("--manager")?;
                manager = Some(v.parse::<SocketAddr>().map_err(|_| {
                    usage_err(format!("--manager: `{v}` is not an IP:PORT address"))
                })?);
            }
            "--ip" => {
                let v = flags.value("--ip")?;
                ip = Some(
                    v.parse::<Ipv4Addr>()
                        .map_err(|_| usage_err(format!("--ip: `{v}` is not an IPv4 address")))?,
                );
            }
            "--deadline-s" => deadline = Duration::from_secs(flags.number("--deadline-s", 1)?),
            "--console" => console = flags.path("--console")?,
            other => return Err(usage_err(format!("ring-peer: unknown option `{other}`"))),
        }
    }
    Ok(Command::RingPeer(RingPeerOpts {
        manager: manager.ok_or_else(|| usage_err("ring-peer: --manager is required"))?,
        ip: ip.ok_or_else(|| usage_err("ring-peer: --ip is required"))?,
        deadline,
        console,
    }))
}

/// Where beats are printed: a device or file opened for appending, or stdout.
enum Console {
    Stdout,
    Path { path: PathBuf, file: Option<File> },
}

impl Console {
    fn new(path: &Path) -> Self {
        if path == Path::new("-") {
            Console::Stdout
        } else {
            Console::Path {
                path: path.to_path_buf(),
                file: None,
            }
        }
    }

    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new().append(true).open(path)
    }

    /// Writes one line; (re)opens the device when needed.
    fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Console::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            Console::Path { path, file } => {
                if file.is_none() {
                    *file = Some(Self::open(path)?);
                }
                let result = match file.as_mut() {
                    Some(f) => f.write_all(line.as_bytes()).and_then(|()| f.flush()),
                    None => Ok(()),
                };
                if result.is_err() {
                    // Reopen on the next beat.
                    *file = None;
                }
                result
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Console::Stdout => "stdout".to_string(),
            Console::Path { path, .. } => path.display().to_string(),
        }
    }
}

/// Replaces the state file with `<n>\n` durably: write and fsync `PATH.tmp`, rename it
/// over `PATH`, fsync the directory. Each beat therefore reaches the virtual disk at
/// once instead of sitting in the guest's page cache.
fn write_state(path: &Path, n: u64) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(format!("{n}\n").as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Reports a failing channel once, and once more when it works again.
#[derive(Debug, Default)]
struct ErrorLatch {
    failing: bool,
}

impl ErrorLatch {
    fn observe(&mut self, what: &str, result: io::Result<()>) {
        match result {
            Ok(()) => {
                if self.failing {
                    eprintln!("unacloud-guest: {what}: working again");
                    self.failing = false;
                }
            }
            Err(e) => {
                if !self.failing {
                    eprintln!("unacloud-guest: {what}: {e} (will keep retrying)");
                    self.failing = true;
                }
            }
        }
    }
}

fn heartbeat(opts: &HeartbeatOpts) -> ExitCode {
    let mut console = Console::new(&opts.console);
    // A console that cannot be opened at all is a configuration error, not a hiccup.
    if let Console::Path { path, file } = &mut console {
        match Console::open(path) {
            Ok(f) => *file = Some(f),
            Err(e) => {
                eprintln!(
                    "unacloud-guest: cannot open console {}: {e}",
                    path.display()
                );
                return ExitCode::from(1);
            }
        }
    }
    let console_what = format!("console {}", console.describe());
    let state_what = format!("state file {}", opts.state.display());
    let mut console_latch = ErrorLatch::default();
    let mut state_latch = ErrorLatch::default();

    let mut base = Instant::now();
    let mut beats_since_base: u32 = 0;
    let mut n: u64 = 0;
    loop {
        if opts.count.is_some_and(|c| n >= c) {
            return ExitCode::SUCCESS;
        }
        n += 1;
        // State first: once `heartbeat <n>` is on the console, n is on the disk.
        state_latch.observe(&state_what, write_state(&opts.state, n));
        console_latch.observe(
            &console_what,
            console.write_line(&format!("heartbeat {n}\n")),
        );

        if opts.count.is_some_and(|c| n >= c) {
            return ExitCode::SUCCESS;
        }
        // Fixed-rate schedule without drift; if the guest fell far behind (a paused or
        // very slow VM), start a new schedule instead of bursting to catch up.
        beats_since_base = beats_since_base.saturating_add(1);
        let deadline = base + opts.interval.saturating_mul(beats_since_base);
        let now = Instant::now();
        if deadline > now {
            thread::sleep(deadline - now);
        } else if now - deadline > opts.interval {
            base = now;
            beats_since_base = 0;
        }
    }
}

fn ring_peer(opts: &RingPeerOpts) -> ExitCode {
    let mut console = Console::new(&opts.console);
    if let Console::Path { path, file } = &mut console {
        match Console::open(path) {
            Ok(f) => *file = Some(f),
            Err(e) => {
                eprintln!(
                    "ring-peer: error: cannot open console {}: {e}",
                    path.display()
                );
                return ExitCode::from(1);
            }
        }
    }
    let console_what = format!("console {}", console.describe());
    let mut latch = ErrorLatch::default();
    let mut log =
        |line: &str| latch.observe(&console_what, console.write_line(&format!("{line}\n")));
    match ring_peer::run(opts.manager, opts.ip, opts.deadline, &mut log) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let line = format!("ring-peer: error: {e}");
            if !matches!(console, Console::Stdout) {
                let _ = console.write_line(&format!("{line}\n"));
            }
            eprintln!("{line}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("unacloud-guest {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Heartbeat(opts)) => heartbeat(&opts),
        Ok(Command::RingPeer(opts)) => ring_peer(&opts),
        Err(e) => {
            eprintln!("unacloud-guest: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, UsageError> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults() {
        assert_eq!(
            parse(&["heartbeat"]),
            Ok(Command::Heartbeat(HeartbeatOpts::default()))
        );
    }

    #[test]
    fn all_options_both_spellings() {
        let want = HeartbeatOpts {
            console: PathBuf::from("/dev/hvc0"),
            state: PathBuf::from("/tmp/s"),
            interval: Duration::from_millis(250),
            count: Some(3),
        };
        let spaced = [
            "heartbeat",
            "--console",
            "/dev/hvc0",
            "--state",
            "/tmp/s",
            "--interval-ms",
            "250",
            "--count",
            "3",
        ];
        let inline = [
            "heartbeat",
            "--console=/dev/hvc0",
            "--state=/tmp/s",
            "--interval-ms=250",
            "--count=3",
        ];
        assert_eq!(parse(&spaced), Ok(Command::Heartbeat(want.clone())));
        assert_eq!(parse(&inline), Ok(Command::Heartbeat(want)));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["heartbeat", "--help"]), Ok(Command::Help));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
    }

    #[test]
    fn usage_errors() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["beat"]).is_err());
        assert!(parse(&["heartbeat", "--interval-ms"]).is_err());
        assert!(parse(&["heartbeat", "--interval-ms", "0"]).is_err());
        assert!(parse(&["heartbeat", "--interval-ms", "-5"]).is_err());
        assert!(parse(&["heartbeat", "--count", "x"]).is_err());
        assert!(parse(&["heartbeat", "--state="]).is_err());
        assert!(parse(&["heartbeat", "--bogus"]).is_err());
    }

    #[test]
    fn ring_peer_options() {
        let manager: SocketAddr = "10.77.0.1:7000".parse().expect("addr");
        let ip = Ipv4Addr::new(10, 77, 0, 2);
        assert_eq!(
            parse(&[
                "ring-peer",
                "--manager",
                "10.77.0.1:7000",
                "--ip",
                "10.77.0.2"
            ]),
            Ok(Command::RingPeer(RingPeerOpts {
                manager,
                ip,
                deadline: Duration::from_secs(3600),
                console: PathBuf::from("-"),
            }))
        );
        let want = Ok(Command::RingPeer(RingPeerOpts {
            manager,
            ip,
            deadline: Duration::from_secs(60),
            console: PathBuf::from("/dev/ttyS0"),
        }));
        let spaced = [
            "ring-peer",
            "--ip",
            "10.77.0.2",
            "--deadline-s",
            "60",
            "--console",
            "/dev/ttyS0",
            "--manager",
            "10.77.0.1:7000",
        ];
        let inline = [
            "ring-peer",
            "--manager=10.77.0.1:7000",
            "--ip=10.77.0.2",
            "--deadline-s=60",
            "--console=/dev/ttyS0",
        ];
        assert_eq!(parse(&spaced), want);
        assert_eq!(parse(&inline), want);
        assert_eq!(parse(&["ring-peer", "--help"]), Ok(Command::Help));
    }

    #[test]
    fn ring_peer_usage_errors() {
        let ok = [
            "ring-peer",
            "--manager",
            "10.0.0.1:7000",
            "--ip",
            "10.0.0.2",
        ];
        assert!(parse(&ok).is_ok());
        assert!(parse(&ok[..3]).is_err(), "no --ip");
        assert!(
            parse(&["ring-peer", "--ip", "10.0.0.2"]).is_err(),
            "no --manager"
        );
        let with = |extra: &[&str]| {
            let mut v = ok.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert!(with(&["--manager", "10.0.0.1"]).is_err(), "no port");
        assert!(with(&["--manager", "host:7000"]).is_err(), "not an IP");
        assert!(with(&["--ip", "::1"]).is_err(), "not IPv4");
        assert!(with(&["--ip", "10.0.0.256"]).is_err());
        assert!(with(&["--deadline-s", "0"]).is_err());
        assert!(with(&["--deadline-s", "1.5"]).is_err());
        assert!(with(&["--deadline-s"]).is_err());
        assert!(with(&["--console="]).is_err());
        assert!(with(&["--state", "/tmp/s"]).is_err(), "a heartbeat option");
    }

    #[test]
    fn state_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("unacloud-guest-test-{}", std::process::id()));
        let state = dir.join("sub").join("heartbeat");
        write_state(&state, 7).expect("write 7");
        write_state(&state, 12).expect("write 12");
        assert_eq!(fs::read_to_string(&state).expect("read"), "12\n");
        assert!(!dir.join("sub").join("heartbeat.tmp").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
