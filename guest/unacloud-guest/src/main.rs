//! `unacloud-guest`: the agent inside the unacloud test guest.
//!
//! One subcommand, `heartbeat`, proves from the outside that a VM is alive and that its
//! disk keeps changing: once per interval it writes `heartbeat <n>` to the serial
//! console and `<n>\n` to a state file on the root disk. The program uses only the
//! standard library and is linked statically, so it runs in the busybox-only guest.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const DEFAULT_CONSOLE: &str = "/dev/ttyS0";
const DEFAULT_STATE: &str = "/var/lib/unacloud/heartbeat";
const DEFAULT_INTERVAL_MS: u64 = 1000;

const USAGE: &str = "\
unacloud-guest: the agent of the unacloud test guest

USAGE:
    unacloud-guest heartbeat [--console PATH] [--state PATH] [--interval-ms N] [--count N]
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
Exit status: 0 done, 1 runtime error, 2 usage error.
";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Help,
    Version,
    Heartbeat(HeartbeatOpts),
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

fn parse_args<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = String>,
{
    let mut args = args.into_iter();
    let sub = match args.next() {
        None => return Err(usage_err("missing subcommand (try --help)")),
        Some(s) => s,
    };
    match sub.as_str() {
        "-h" | "--help" | "help" => return Ok(Command::Help),
        "-V" | "--version" => return Ok(Command::Version),
        "heartbeat" => {}
        other => {
            return Err(usage_err(format!(
                "unknown subcommand `{other}` (try --help)"
            )))
        }
    }

    let mut opts = HeartbeatOpts::default();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, UsageError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .ok_or_else(|| usage_err(format!("{name} needs a value"))),
            }
        };
        match flag.as_str() {
            "--console" => {
                let v = value("--console")?;
                if v.is_empty() {
                    return Err(usage_err("--console must not be empty"));
                }
                opts.console = PathBuf::from(v);
            }
            "--state" => {
                let v = value("--state")?;
                if v.is_empty() {
                    return Err(usage_err("--state must not be empty"));
                }
                opts.state = PathBuf::from(v);
            }
            "--interval-ms" => {
                let v = value("--interval-ms")?;
                let ms: u64 = v.parse().map_err(|_| {
                    usage_err(format!("--interval-ms: `{v}` is not a whole number"))
                })?;
                if ms == 0 {
                    return Err(usage_err("--interval-ms must be at least 1"));
                }
                opts.interval = Duration::from_millis(ms);
            }
            "--count" => {
                let v = value("--count")?;
                let n: u64 = v
                    .parse()
                    .map_err(|_| usage_err(format!("--count: `{v}` is not a whole number")))?;
                opts.count = Some(n);
            }
            other => return Err(usage_err(format!("heartbeat: unknown option `{other}`"))),
        }
    }
    Ok(Command::Heartbeat(opts))
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
