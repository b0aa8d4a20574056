//! The `nftables` backend: a table of our own, run one process per change or through a
//! long-lived `nft -j -i` session.
//!
//! ```text
//! table inet unacloud {
//!     counter post_drop { }
//!     chain colour_out { type filter hook output priority mangle; policy accept;
//!         ip dscp set 0x10; ip6 dscp set 0x10 }                     (colour PRE)
//!     chain filter_in { type filter hook input priority filter; policy accept;
//!         ip dscp 0x12 counter name post_drop drop
//!         ip6 dscp 0x12 counter name post_drop drop }               (drop POST)
//! }
//! ```
//!
//! With [`super::Scope::Interface`] (a VM's tap at its host) both chains hook `forward`
//! instead, the table is `unacloud_<ifname>`, the marking rules match `iifname "<tap>"`
//! and the drop rules `oifname "<tap>"`:
//!
//! ```text
//! table inet unacloud_tap1 {
//!     chain colour_out { type filter hook forward priority mangle; policy accept;
//!         iifname "tap1" ip dscp set 0x10; iifname "tap1" ip6 dscp set 0x10 }
//!     chain filter_in { type filter hook forward priority filter; policy accept;
//!         oifname "tap1" ip dscp 0x12 counter name post_drop drop; … }
//! }
//! ```
//!
//! Every change is one nft transaction (`flush chain …; add rule …` on one line), so a
//! colour switch is atomic. Dropping is final across base chains, so a user's own accept
//! rules in other tables cannot undo the POST filter; accept in our table only ends our
//! chain. Removal is `add table …; delete table …` (idempotent).

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::exec::{check, CommandExecutor, DEFAULT_COMMAND_TIMEOUT};
use super::{Colour, ColourBackend, DscpConfig, Scope};
use crate::net::{Error, Result};

/// Runs nft command lines (one transaction each) and returns the JSON output of list
/// commands.
pub trait NftRunner: Send + std::fmt::Debug {
    /// Runs one command line. With `want_json` the line is a single `list …` command and
    /// its JSON document is returned.
    fn exec(&mut self, line: &str, want_json: bool) -> Result<Option<serde_json::Value>>;

    /// Where the commands run, for messages.
    fn place(&self) -> String;

    /// Whether a command returns in well under a millisecond.
    fn is_fast(&self) -> bool {
        false
    }
}

/// One `nft` process per command line, through any executor (host, namespace, guest).
#[derive(Debug)]
pub struct NftOneShot {
    exec: Arc<dyn CommandExecutor>,
    timeout: Duration,
}

impl NftOneShot {
    /// Runs `nft` through `exec`.
    pub fn new(exec: Arc<dyn CommandExecutor>) -> Self {
        Self {
            exec,
            timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

impl NftRunner for NftOneShot {
    fn exec(&mut self, line: &str, want_json: bool) -> Result<Option<serde_json::Value>> {
        let a: Vec<String> = if want_json {
            vec!["-j".to_string(), line.to_string()]
        } else {
            vec![line.to_string()]
        };
        let out = self.exec.run("nft", &a, self.timeout)?;
        let out = check(&self.exec.argv("nft", &a), out)?;
        if !want_json {
            return Ok(None);
        }
        let v = serde_json::from_str(out.stdout.trim()).map_err(|e| Error::NftSession {
            place: self.exec.place(),
            reason: format!("unreadable JSON from `nft -j {line}`: {e}"),
        })?;
        Ok(Some(v))
    }

    fn place(&self) -> String {
        self.exec.place()
    }
}

/// A long-lived `nft -j -i` process. Each command line is followed by `list tables`,
/// whose one-line JSON answer marks the end of the command's output; anything else on
/// the (merged) output before it is nft's error text. The answer is read on the calling
/// thread (poll with a deadline), so a change costs two process wake-ups.
#[derive(Debug)]
pub struct NftSession {
    place: String,
    child: Child,
    stdin: Option<ChildStdin>,
    output: std::fs::File,
    pending: Vec<u8>,
    timeout: Duration,
}

impl NftSession {
    /// Starts `nft -j -i` through `exec` (for example inside a namespace).
    pub fn start(exec: &dyn CommandExecutor) -> Result<Self> {
        let argv = exec.argv("nft", &["-j".to_string(), "-i".to_string()]);
        let (program, rest) = argv.split_first().ok_or_else(|| Error::InvalidConfig {
            reason: "empty nft command line".to_string(),
        })?;
        let (reader, writer) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::CommandSpawn {
                program: program.clone(),
                source: std::io::Error::from(e),
            })?;
        let reader = std::fs::File::from(reader);
        let writer2 = writer.try_clone().map_err(|source| Error::CommandSpawn {
            program: program.clone(),
            source,
        })?;
        let mut child = Command::new(program)
            .args(rest)
            .stdin(Stdio::piped())
            .stdout(writer)
            .stderr(writer2)
            .spawn()
            .map_err(|source| Error::CommandSpawn {
                program: program.clone(),
                source,
            })?;
        let stdin = child.stdin.take();
        Ok(Self {
            place: exec.place(),
            child,
            stdin,
            output: reader,
            pending: Vec::new(),
            timeout: DEFAULT_COMMAND_TIMEOUT,
        })
    }

    /// Bounds the wait for each answer (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The session's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads one line of the session's output, waiting at most until `deadline`.
    /// `Ok(None)` when nft exited.
    fn read_line(&mut self, deadline: std::time::Instant) -> Result<Option<String>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::io::Read;
        use std::os::fd::AsFd;
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(self.broken(format!("no answer within {:?}", self.timeout)));
            }
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            let ready = {
                let mut fds = [PollFd::new(self.output.as_fd(), PollFlags::POLLIN)];
                poll(
                    &mut fds,
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                )
            };
            match ready {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.broken(format!("waiting for nft failed: {e}"))),
            }
            let mut buf = [0u8; 16 * 1024];
            match self.output.read(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.broken(format!("reading nft's answer failed: {e}"))),
            }
        }
    }

    fn broken(&self, reason: impl Into<String>) -> Error {
        Error::NftSession {
            place: self.place.clone(),
            reason: reason.into(),
        }
    }
}

impl NftRunner for NftSession {
    fn exec(&mut self, line: &str, want_json: bool) -> Result<Option<serde_json::Value>> {
        if line.contains('\n') {
            return Err(self.broken("command line contains a newline"));
        }
        // Output of an earlier command that timed out is stale: drop it.
        self.pending.clear();
        let stdin = match self.stdin.as_mut() {
            Some(s) => s,
            None => return Err(self.broken("session is closed")),
        };
        let msg = format!("{line}\nlist tables\n");
        if let Err(e) = stdin.write_all(msg.as_bytes()).and_then(|()| stdin.flush()) {
            return Err(self.broken(format!("nft stopped accepting commands ({e})")));
        }
        let expected = if want_json { 2 } else { 1 };
        let mut jsons: Vec<String> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let Some(l) = self.read_line(deadline)? else {
                return Err(self.broken(format!("nft exited while running `{line}`")));
            };
            if l.starts_with('{') {
                jsons.push(l);
                if jsons.len() == expected || !errors.is_empty() {
                    break;
                }
            } else if !l.trim().is_empty() {
                errors.push(l);
            }
        }
        if !errors.is_empty() {
            return Err(Error::CommandFailed {
                command: format!("nft {line} ({})", self.place),
                code: None,
                stderr: errors.join("\n"),
            });
        }
        if !want_json {
            return Ok(None);
        }
        let v = serde_json::from_str(&jsons[0])
            .map_err(|e| self.broken(format!("unreadable JSON answer to `{line}`: {e}")))?;
        Ok(Some(v))
    }

    fn place(&self) -> String {
        self.place.clone()
    }

    fn is_fast(&self) -> bool {
        true
    }
}

impl Drop for NftSession {
    fn drop(&mut self) {
        // Closing stdin ends `nft -i`; kill it if it lingers.
        drop(self.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rule generation for nftables, run by an [`NftRunner`].
///
/// ```
/// use std::sync::Arc;
/// use unacloud_snapshot::colour::exec::NetnsExec;
/// use unacloud_snapshot::colour::nft::{Nft, NftOneShot};
/// use unacloud_snapshot::colour::{Colour, DscpConfig};
///
/// // Commands for the namespace `lab-3` (nothing runs until a backend call).
/// let nft = Nft::new(NftOneShot::new(Arc::new(NetnsExec::new("lab-3"))), DscpConfig::default());
/// assert_eq!(
///     nft.colour_line(Some(Colour::Post)),
///     "flush chain inet unacloud colour_out; add rule inet unacloud colour_out ip dscp set 0x12; \
///      add rule inet unacloud colour_out ip6 dscp set 0x12"
/// );
/// ```
#[derive(Debug)]
pub struct Nft<R: NftRunner> {
    runner: R,
    dscp: DscpConfig,
    table: String,
    scope: Scope,
    outgoing: Option<Colour>,
    dropping: bool,
}

/// The default name of our table (`inet unacloud`).
pub const DEFAULT_TABLE: &str = "unacloud";

impl<R: NftRunner> Nft<R> {
    /// Runs `what` (a `list …` command with `{}` for our table's name) and returns its
    /// JSON, or `None` when our table does not exist (nothing of ours is left).
    fn list_own(&mut self, what: &str) -> Result<Option<serde_json::Value>> {
        let tables = self.runner.exec("list tables", true)?;
        if !tables.as_ref().is_some_and(|d| has_table(d, &self.table)) {
            return Ok(None);
        }
        self.runner.exec(&what.replace("{}", &self.table), true)
    }

    /// A backend with table `inet unacloud`.
    pub fn new(runner: R, dscp: DscpConfig) -> Self {
        Self {
            runner,
            dscp,
            table: DEFAULT_TABLE.to_string(),
            scope: Scope::Host,
            outgoing: None,
            dropping: false,
        }
    }

    /// Colours and filters the datagrams of `scope` (default [`Scope::Host`]); the table
    /// becomes the scope's own ([`Scope::nft_table`]) unless [`Nft::table`] is called
    /// afterwards.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use unacloud_snapshot::colour::exec::NetnsExec;
    /// use unacloud_snapshot::colour::nft::{Nft, NftOneShot};
    /// use unacloud_snapshot::colour::{Colour, DscpConfig, Scope};
    ///
    /// let nft = Nft::new(NftOneShot::new(Arc::new(NetnsExec::new("pc-1"))), DscpConfig::default())
    ///     .scope(Scope::interface("tap1").unwrap());
    /// assert_eq!(
    ///     nft.colour_line(Some(Colour::Pre)),
    ///     "flush chain inet unacloud_tap1 colour_out; \
    ///      add rule inet unacloud_tap1 colour_out iifname \"tap1\" ip dscp set 0x10; \
    ///      add rule inet unacloud_tap1 colour_out iifname \"tap1\" ip6 dscp set 0x10"
    /// );
    /// ```
    pub fn scope(mut self, scope: Scope) -> Self {
        self.table = scope.nft_table();
        self.scope = scope;
        self
    }

    /// `(output hook, input hook, marking match, filtering match)` of the scope.
    fn hooks(&self) -> (&'static str, &'static str, String, String) {
        match &self.scope {
            Scope::Host => ("output", "input", String::new(), String::new()),
            Scope::Interface(n) => (
                "forward",
                "forward",
                format!("iifname \"{n}\" "),
                format!("oifname \"{n}\" "),
            ),
        }
    }

    /// Uses table `inet <name>` (letters, digits, `_`; at most 32 characters).
    pub fn table(mut self, name: &str) -> Result<Self> {
        check_table_name(name)?;
        self.table = name.to_string();
        Ok(self)
    }

    /// The runner (for example to read the session's pid).
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// The line that (re)creates the empty table, counter and chains in one transaction
    /// (a leftover table of a crashed run is replaced).
    pub fn install_line(&self) -> String {
        let t = &self.table;
        let (out_hook, in_hook, _, _) = self.hooks();
        format!(
            "add table inet {t}; delete table inet {t}; add table inet {t}; add counter inet {t} post_drop; \
             add chain inet {t} colour_out {{ type filter hook {out_hook} priority mangle; policy accept; }}; \
             add chain inet {t} filter_in {{ type filter hook {in_hook} priority filter; policy accept; }}"
        )
    }

    /// The line that marks outgoing datagrams with `colour` (or stops: `None`).
    pub fn colour_line(&self, colour: Option<Colour>) -> String {
        let t = &self.table;
        match colour {
            None => format!("flush chain inet {t} colour_out"),
            Some(c) => {
                let v = format!("{:#04x}", self.dscp.value(c));
                let (_, _, m, _) = self.hooks();
                format!(
                    "flush chain inet {t} colour_out; add rule inet {t} colour_out {m}ip dscp set {v}; \
                     add rule inet {t} colour_out {m}ip6 dscp set {v}"
                )
            }
        }
    }

    /// The line that drops (or accepts) incoming POSTSNAPSHOT datagrams.
    pub fn drop_line(&self, drop: bool) -> String {
        let t = &self.table;
        if drop {
            let v = format!("{:#04x}", self.dscp.post());
            let (_, _, _, m) = self.hooks();
            format!(
                "flush chain inet {t} filter_in; \
                 add rule inet {t} filter_in {m}ip dscp {v} counter name post_drop drop; \
                 add rule inet {t} filter_in {m}ip6 dscp {v} counter name post_drop drop"
            )
        } else {
            format!("flush chain inet {t} filter_in")
        }
    }

    /// The line that removes everything (idempotent).
    pub fn remove_line(&self) -> String {
        let t = &self.table;
        format!("add table inet {t}; delete table inet {t}")
    }
}

/// Checks a table name for `inet <name>`: letters, digits, `_`, at most 32 characters,
/// not starting with a digit.
pub(crate) fn check_table_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 32
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(Error::InvalidConfig {
            reason: format!(
                "nft table name {name:?} must be 1-32 characters of a-z, A-Z, 0-9, '_' and start with a letter"
            ),
        });
    }
    Ok(())
}

/// Reads the `packets` of the named counter from `nft -j list counter …` output.
pub fn parse_counter_packets(doc: &serde_json::Value) -> Option<u64> {
    doc.get("nftables")?
        .as_array()?
        .iter()
        .find_map(|o| o.get("counter")?.get("packets")?.as_u64())
}

/// Counts the objects (table, chains, rules, counters) in `nft -j list table …` output.
pub fn count_objects(doc: &serde_json::Value) -> usize {
    doc.get("nftables")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter(|o| {
                    ["table", "chain", "rule", "counter"]
                        .iter()
                        .any(|k| o.get(*k).is_some())
                })
                .count()
        })
        .unwrap_or(0)
}

/// Counts the rules in `nft -j list table …` output.
pub fn count_rules(doc: &serde_json::Value) -> usize {
    doc.get("nftables")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter(|o| o.get("rule").is_some()).count())
        .unwrap_or(0)
}

/// Whether `nft -j list tables` output names `inet <table>`.
pub fn has_table(doc: &serde_json::Value, table: &str) -> bool {
    doc.get("nftables")
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter().any(|o| {
                o.get("table").is_some_and(|t| {
                    t.get("family").and_then(|f| f.as_str()) == Some("inet")
                        && t.get("name").and_then(|n| n.as_str()) == Some(table)
                })
            })
        })
}

impl<R: NftRunner> ColourBackend for Nft<R> {
    fn install(&mut self) -> Result<()> {
        let line = self.install_line();
        self.runner.exec(&line, false)?;
        self.outgoing = None;
        self.dropping = false;
        Ok(())
    }

    fn set_outgoing(&mut self, colour: Option<Colour>) -> Result<()> {
        if self.outgoing == colour {
            return Ok(());
        }
        let line = self.colour_line(colour);
        self.runner.exec(&line, false)?;
        self.outgoing = colour;
        Ok(())
    }

    fn set_drop_post(&mut self, drop: bool) -> Result<()> {
        if self.dropping == drop {
            return Ok(());
        }
        let line = self.drop_line(drop);
        self.runner.exec(&line, false)?;
        self.dropping = drop;
        Ok(())
    }

    fn post_packets_dropped(&mut self) -> Result<u64> {
        let line = format!("list counter inet {} post_drop", self.table);
        let doc = self.runner.exec(&line, true)?;
        Ok(doc.as_ref().and_then(parse_counter_packets).unwrap_or(0))
    }

    fn leftovers(&mut self) -> Result<usize> {
        let doc = self.list_own("list table inet {}")?;
        Ok(doc.as_ref().map(count_objects).unwrap_or(0))
    }

    fn active_rules(&mut self) -> Result<usize> {
        let doc = self.list_own("list table inet {}")?;
        Ok(doc.as_ref().map(count_rules).unwrap_or(0))
    }

    fn colouring_rules(&mut self) -> Result<usize> {
        let doc = self.list_own("list chain inet {} colour_out")?;
        Ok(doc.as_ref().map(count_rules).unwrap_or(0))
    }

    fn remove(&mut self) -> Result<()> {
        let line = self.remove_line();
        self.runner.exec(&line, false)?;
        self.outgoing = None;
        self.dropping = false;
        Ok(())
    }

    fn place(&self) -> String {
        self.runner.place()
    }

    fn is_fast(&self) -> bool {
        self.runner.is_fast()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::colour::exec::LocalHost;

    fn b() -> Nft<NftOneShot> {
        Nft::new(NftOneShot::new(Arc::new(LocalHost)), DscpConfig::default())
    }

    #[test]
    fn lines_are_exact() {
        let n = b().table("uc_run7").unwrap();
        assert_eq!(
            n.colour_line(Some(Colour::Pre)),
            "flush chain inet uc_run7 colour_out; add rule inet uc_run7 colour_out ip dscp set 0x10; add rule inet uc_run7 colour_out ip6 dscp set 0x10"
        );
        assert_eq!(n.colour_line(None), "flush chain inet uc_run7 colour_out");
        assert_eq!(
            n.drop_line(true),
            "flush chain inet uc_run7 filter_in; add rule inet uc_run7 filter_in ip dscp 0x12 counter name post_drop drop; add rule inet uc_run7 filter_in ip6 dscp 0x12 counter name post_drop drop"
        );
        assert_eq!(
            n.remove_line(),
            "add table inet uc_run7; delete table inet uc_run7"
        );
        assert!(n
            .install_line()
            .starts_with("add table inet uc_run7; delete table inet uc_run7; add table inet uc_run7; add counter inet uc_run7 post_drop;"));
    }

    #[test]
    fn interface_scope_hooks_forward_and_matches_the_tap() {
        let n = b().scope(Scope::interface("uct-3").unwrap());
        let install = n.install_line();
        assert!(
            install.contains("add table inet unacloud_uct_3;"),
            "{install}"
        );
        assert!(install.contains("colour_out { type filter hook forward priority mangle;"));
        assert!(install.contains("filter_in { type filter hook forward priority filter;"));
        assert_eq!(
            n.drop_line(true),
            "flush chain inet unacloud_uct_3 filter_in; add rule inet unacloud_uct_3 filter_in oifname \"uct-3\" ip dscp 0x12 counter name post_drop drop; add rule inet unacloud_uct_3 filter_in oifname \"uct-3\" ip6 dscp 0x12 counter name post_drop drop"
        );
        // An explicit table after the scope wins.
        let n = b()
            .scope(Scope::interface("t").unwrap())
            .table("mine")
            .unwrap();
        assert!(n.colour_line(None).contains("inet mine colour_out"));
    }

    #[test]
    fn bad_table_names_are_refused() {
        for bad in ["", "has space", "semi;colon", "9lives", &"x".repeat(33)] {
            assert!(b().table(bad).is_err(), "{bad:?}");
        }
    }

    // Outputs of nft 1.0.6 (`nft -j -i`) captured on a Linux 6.x host.
    const COUNTER: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "post_drop", "table": "T", "handle": 1, "packets": 5, "bytes": 300}}]}"#;
    const TABLES: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "T", "handle": 1}}]}"#;
    const TABLE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "T", "handle": 1}}, {"counter": {"family": "inet", "name": "post_drop", "table": "T", "handle": 1, "packets": 0, "bytes": 0}}, {"chain": {"family": "inet", "table": "T", "name": "colour_out", "handle": 2, "type": "filter", "hook": "output", "prio": -150, "policy": "accept"}}, {"chain": {"family": "inet", "table": "T", "name": "filter_in", "handle": 3, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "T", "chain": "colour_out", "handle": 4, "expr": [{"mangle": {"key": {"payload": {"protocol": "ip", "field": "dscp"}}, "value": "cs2"}}]}}]}"#;

    #[test]
    fn parses_real_json() {
        let c: serde_json::Value = serde_json::from_str(COUNTER).unwrap();
        assert_eq!(parse_counter_packets(&c), Some(5));
        let t: serde_json::Value = serde_json::from_str(TABLES).unwrap();
        assert!(has_table(&t, "T"));
        assert!(!has_table(&t, "unacloud"));
        let full: serde_json::Value = serde_json::from_str(TABLE).unwrap();
        assert_eq!(count_objects(&full), 5);
        assert_eq!(count_rules(&full), 1);
        assert_eq!(parse_counter_packets(&t), None);
    }
}
