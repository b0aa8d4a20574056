//! The `iptables` backend: one process per command, for hosts where only the command is
//! available.
//!
//! Objects (all ours; the built-in chains only receive one jump rule each):
//!
//! ```text
//! -t mangle -N UNACLOUD-OUT ; -t mangle -I OUTPUT 1 -j UNACLOUD-OUT
//! -t mangle -A UNACLOUD-OUT -j DSCP --set-dscp 0x10          (colour PRE)
//! -t filter -N UNACLOUD-IN  ; -t filter -I INPUT 1 -j UNACLOUD-IN
//! -t filter -A UNACLOUD-IN -m dscp --dscp 0x12 -j DROP       (drop POST)
//! ```
//!
//! With [`super::Scope::Interface`] (a VM's tap at its host) the chains are
//! `UC-<tap>-OUT`/`UC-<tap>-IN`, both jumped to from `FORWARD`, and the rules match
//! `-i <tap>` (marking) and `-o <tap>` (dropping).
//!
//! Switching colour uses `-R UNACLOUD-OUT 1` (replace in place), so no datagram leaves
//! uncoloured between PRE and POST. Accepting POST again lists-and-zeroes the drop rule's
//! counter (`-L -v -n -x -Z`) before flushing, so the drop count survives.

use std::sync::Arc;
use std::time::Duration;

use super::exec::{check, CommandExecutor, CommandOutput, DEFAULT_COMMAND_TIMEOUT};
use super::{Colour, ColourBackend, DscpConfig, Scope};
use crate::net::{Error, Result};

/// Rule generation and execution for `iptables`.
#[derive(Debug)]
pub struct Iptables {
    exec: Arc<dyn CommandExecutor>,
    dscp: DscpConfig,
    out_chain: String,
    in_chain: String,
    scope: Scope,
    program: String,
    timeout: Duration,
    outgoing: Option<Colour>,
    dropping: bool,
    dropped_before: u64,
}

/// One argv (without the program) of the rule set.
pub type Args = Vec<String>;

fn args(v: &[&str]) -> Args {
    v.iter().map(|s| s.to_string()).collect()
}

impl Iptables {
    /// A backend running `iptables` through `exec`, with chains `<prefix>-OUT` and
    /// `<prefix>-IN` (prefix `UNACLOUD` by default; at most 24 characters).
    pub fn new(exec: Arc<dyn CommandExecutor>, dscp: DscpConfig) -> Self {
        Self {
            exec,
            dscp,
            out_chain: "UNACLOUD-OUT".to_string(),
            in_chain: "UNACLOUD-IN".to_string(),
            scope: Scope::Host,
            program: "iptables".to_string(),
            timeout: DEFAULT_COMMAND_TIMEOUT,
            outgoing: None,
            dropping: false,
            dropped_before: 0,
        }
    }

    /// Uses chains `<prefix>-OUT`/`<prefix>-IN` (for several independent users of one host).
    pub fn chain_prefix(mut self, prefix: &str) -> Result<Self> {
        if prefix.is_empty()
            || prefix.len() > 24
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "iptables chain prefix {prefix:?} must be 1-24 characters of A-Z, a-z, 0-9, '-' or '_'"
                ),
            });
        }
        self.out_chain = format!("{prefix}-OUT");
        self.in_chain = format!("{prefix}-IN");
        Ok(self)
    }

    /// Colours and filters the datagrams of `scope` (default [`Scope::Host`]); the chain
    /// prefix becomes the scope's own ([`Scope::iptables_prefix`]) unless
    /// [`Iptables::chain_prefix`] is called afterwards.
    pub fn scope(mut self, scope: Scope) -> Self {
        let prefix = scope.iptables_prefix();
        self.out_chain = format!("{prefix}-OUT");
        self.in_chain = format!("{prefix}-IN");
        self.scope = scope;
        self
    }

    /// `-i <tap>` or `-o <tap>` for an interface scope.
    fn interface_match(&self, flag: &str) -> Args {
        match &self.scope {
            Scope::Host => Vec::new(),
            Scope::Interface(n) => args(&[flag, n]),
        }
    }

    /// Bounds each command's run time (default 10 s).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The argv that marks outgoing datagrams with `colour`, replacing rule 1 (`replace`)
    /// or appending the first rule.
    pub fn colour_rule(&self, colour: Colour, replace: bool) -> Args {
        let value = format!("{:#04x}", self.dscp.value(colour));
        let mut a = args(&["-w", "5", "-t", "mangle"]);
        if replace {
            a.extend(args(&["-R", &self.out_chain, "1"]));
        } else {
            a.extend(args(&["-A", &self.out_chain]));
        }
        a.extend(self.interface_match("-i"));
        a.extend(args(&["-j", "DSCP", "--set-dscp", &value]));
        a
    }

    /// The argv that drops incoming POSTSNAPSHOT datagrams.
    pub fn drop_rule(&self) -> Args {
        let value = format!("{:#04x}", self.dscp.post());
        let mut a = args(&["-w", "5", "-t", "filter", "-A", &self.in_chain]);
        a.extend(self.interface_match("-o"));
        a.extend(args(&["-m", "dscp", "--dscp", &value, "-j", "DROP"]));
        a
    }

    /// `(table, our chain, built-in chain)` pairs.
    fn chains(&self) -> [(&'static str, String, &'static str); 2] {
        let (out, inp) = match self.scope {
            Scope::Host => ("OUTPUT", "INPUT"),
            Scope::Interface(_) => ("FORWARD", "FORWARD"),
        };
        [
            ("mangle", self.out_chain.clone(), out),
            ("filter", self.in_chain.clone(), inp),
        ]
    }

    fn raw(&self, a: &Args) -> Result<CommandOutput> {
        self.exec.run(&self.program, a, self.timeout)
    }

    fn must(&self, a: &Args) -> Result<CommandOutput> {
        let out = self.raw(a)?;
        check(&self.exec.argv(&self.program, a), out)
    }

    fn chain_exists(&self, table: &str, chain: &str) -> Result<bool> {
        Ok(self
            .raw(&args(&["-w", "5", "-t", table, "-S", chain]))?
            .success())
    }

    fn jump_exists(&self, table: &str, builtin: &str, chain: &str) -> Result<bool> {
        Ok(self
            .raw(&args(&["-w", "5", "-t", table, "-C", builtin, "-j", chain]))?
            .success())
    }

    fn rules_in(&self, table: &str, chain: &str) -> Result<usize> {
        let out = self.raw(&args(&["-w", "5", "-t", table, "-S", chain]))?;
        if !out.success() {
            return Ok(0);
        }
        Ok(out.stdout.lines().filter(|l| l.starts_with("-A ")).count())
    }

    fn drop_counter(&self, zero: bool) -> Result<u64> {
        let mut a = args(&[
            "-w",
            "5",
            "-t",
            "filter",
            "-L",
            &self.in_chain,
            "-v",
            "-n",
            "-x",
        ]);
        if zero {
            a.push("-Z".to_string());
        }
        let out = self.raw(&a)?;
        if !out.success() {
            return Ok(0);
        }
        Ok(parse_listing_packets(&out.stdout))
    }
}

/// Sums the packet counters (first column) of the rules in an `iptables -L -v -n -x`
/// listing of one chain.
pub fn parse_listing_packets(listing: &str) -> u64 {
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|tok| tok.parse::<u64>().ok())
        .sum()
}

impl ColourBackend for Iptables {
    fn install(&mut self) -> Result<()> {
        for (table, chain, builtin) in self.chains() {
            if self.chain_exists(table, &chain)? {
                self.must(&args(&["-w", "5", "-t", table, "-F", &chain]))?;
            } else {
                self.must(&args(&["-w", "5", "-t", table, "-N", &chain]))?;
            }
            if !self.jump_exists(table, builtin, &chain)? {
                self.must(&args(&[
                    "-w", "5", "-t", table, "-I", builtin, "1", "-j", &chain,
                ]))?;
            }
        }
        self.outgoing = None;
        self.dropping = false;
        self.dropped_before = 0;
        Ok(())
    }

    fn set_outgoing(&mut self, colour: Option<Colour>) -> Result<()> {
        if self.outgoing == colour {
            return Ok(());
        }
        match colour {
            Some(c) => {
                let replace = self.outgoing.is_some();
                self.must(&self.colour_rule(c, replace))?;
            }
            None => {
                self.must(&args(&["-w", "5", "-t", "mangle", "-F", &self.out_chain]))?;
            }
        }
        self.outgoing = colour;
        Ok(())
    }

    fn set_drop_post(&mut self, drop: bool) -> Result<()> {
        if self.dropping == drop {
            return Ok(());
        }
        if drop {
            self.must(&self.drop_rule())?;
        } else {
            self.dropped_before += self.drop_counter(true)?;
            self.must(&args(&["-w", "5", "-t", "filter", "-F", &self.in_chain]))?;
        }
        self.dropping = drop;
        Ok(())
    }

    fn post_packets_dropped(&mut self) -> Result<u64> {
        let now = if self.dropping {
            self.drop_counter(false)?
        } else {
            0
        };
        Ok(self.dropped_before + now)
    }

    fn leftovers(&mut self) -> Result<usize> {
        let mut n = 0;
        for (table, chain, builtin) in self.chains() {
            if self.chain_exists(table, &chain)? {
                n += 1 + self.rules_in(table, &chain)?;
            }
            if self.jump_exists(table, builtin, &chain)? {
                n += 1;
            }
        }
        Ok(n)
    }

    fn active_rules(&mut self) -> Result<usize> {
        let mut n = 0;
        for (table, chain, _) in self.chains() {
            n += self.rules_in(table, &chain)?;
        }
        Ok(n)
    }

    fn colouring_rules(&mut self) -> Result<usize> {
        self.rules_in("mangle", &self.out_chain.clone())
    }

    fn remove(&mut self) -> Result<()> {
        if self.dropping {
            // Keep the count of what the filter dropped.
            self.dropped_before += self.drop_counter(true).unwrap_or(0);
        }
        for (table, chain, builtin) in self.chains() {
            // A jump may have been inserted more than once by someone else's retry.
            for _ in 0..16 {
                if !self.jump_exists(table, builtin, &chain)? {
                    break;
                }
                self.must(&args(&[
                    "-w", "5", "-t", table, "-D", builtin, "-j", &chain,
                ]))?;
            }
            if self.chain_exists(table, &chain)? {
                self.must(&args(&["-w", "5", "-t", table, "-F", &chain]))?;
                self.must(&args(&["-w", "5", "-t", table, "-X", &chain]))?;
            }
        }
        self.outgoing = None;
        self.dropping = false;
        Ok(())
    }

    fn place(&self) -> String {
        self.exec.place()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::colour::exec::LocalHost;

    fn backend() -> Iptables {
        Iptables::new(Arc::new(LocalHost), DscpConfig::default())
    }

    #[test]
    fn colour_rules_are_exact() {
        let b = backend();
        assert_eq!(
            b.colour_rule(Colour::Pre, false),
            args(&[
                "-w",
                "5",
                "-t",
                "mangle",
                "-A",
                "UNACLOUD-OUT",
                "-j",
                "DSCP",
                "--set-dscp",
                "0x10"
            ])
        );
        assert_eq!(
            b.colour_rule(Colour::Post, true),
            args(&[
                "-w",
                "5",
                "-t",
                "mangle",
                "-R",
                "UNACLOUD-OUT",
                "1",
                "-j",
                "DSCP",
                "--set-dscp",
                "0x12"
            ])
        );
    }

    #[test]
    fn drop_rule_is_exact() {
        let b = Iptables::new(Arc::new(LocalHost), DscpConfig::new(0x08, 0x2e).unwrap())
            .chain_prefix("UC-7")
            .unwrap();
        assert_eq!(
            b.drop_rule(),
            args(&[
                "-w", "5", "-t", "filter", "-A", "UC-7-IN", "-m", "dscp", "--dscp", "0x2e", "-j",
                "DROP"
            ])
        );
    }

    #[test]
    fn interface_scope_matches_the_tap_on_forward() {
        let b = backend().scope(Scope::interface("uct-2").unwrap());
        assert_eq!(
            b.colour_rule(Colour::Pre, false),
            args(&[
                "-w",
                "5",
                "-t",
                "mangle",
                "-A",
                "UC-uct-2-OUT",
                "-i",
                "uct-2",
                "-j",
                "DSCP",
                "--set-dscp",
                "0x10"
            ])
        );
        assert_eq!(
            b.drop_rule(),
            args(&[
                "-w",
                "5",
                "-t",
                "filter",
                "-A",
                "UC-uct-2-IN",
                "-o",
                "uct-2",
                "-m",
                "dscp",
                "--dscp",
                "0x12",
                "-j",
                "DROP"
            ])
        );
        assert!(b
            .chains()
            .iter()
            .all(|(_, _, builtin)| *builtin == "FORWARD"));
    }

    #[test]
    fn bad_prefix_is_refused() {
        assert!(backend().chain_prefix("has space").is_err());
        assert!(backend().chain_prefix("").is_err());
        assert!(backend().chain_prefix(&"X".repeat(25)).is_err());
    }

    #[test]
    fn parses_real_listing() {
        // `iptables -t filter -L UNACLOUD-IN -v -n -x` from iptables v1.8.9 (nf_tables).
        let listing = "Chain UNACLOUD-IN (1 references)\n    pkts      bytes target     prot opt in     out     source               destination         \n      17     1020 DROP       0    --  *      *       0.0.0.0/0            0.0.0.0/0            DSCP match 0x12\n";
        assert_eq!(parse_listing_packets(listing), 17);
        assert_eq!(parse_listing_packets(""), 0);
    }
}
