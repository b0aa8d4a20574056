//! Packet colouring for real: DSCP marks and POSTSNAPSHOT filters with the Linux kernel's
//! netfilter (SPEC §5, Fig 5.13).
//!
//! A [`ColourBackend`] performs the packet-related host actions of the protocol:
//!
//! | protocol action              | backend call                          |
//! |------------------------------|---------------------------------------|
//! | set outgoing colour PRE/POST | [`ColourBackend::set_outgoing`]`(Some(c))` |
//! | drop incoming POST           | [`ColourBackend::set_drop_post`]`(true)`   |
//! | accept incoming POST         | [`ColourBackend::set_drop_post`]`(false)`  |
//! | clear colour                 | [`ColourBackend::set_outgoing`]`(None)`    |
//! | clear all (abort, deadline)  | [`ColourBackend::remove`]                  |
//!
//! Two rule languages are generated:
//!
//! * [`iptables::Iptables`] — `mangle` chain `UNACLOUD-OUT` (jumped to from `OUTPUT`,
//!   `-j DSCP --set-dscp`) and `filter` chain `UNACLOUD-IN` (jumped to from `INPUT`,
//!   `-m dscp --dscp … -j DROP`), one process per command. IPv4 only, like the thesis.
//! * [`nft::Nft`] — a table `inet unacloud` of its own with an output chain at mangle
//!   priority, an input chain at filter priority and a named counter `post_drop`; IPv4 and
//!   IPv6. It runs either one `nft` process per change ([`nft::NftOneShot`]) or through a
//!   long-lived `nft -j -i` session ([`nft::NftSession`]) that applies a change in well
//!   under a millisecond instead of the 6–16 ms of spawning a process.
//! * [`netlink::NftNetlink`] — the same table, built from nf_tables netlink messages that
//!   the calling process sends itself (no `nft` process at all; the socket is opened inside
//!   the target network namespace).
//!
//! **Where the rules apply** is a [`Scope`]. [`Scope::Host`] is the thesis's layout: the
//! rules sit where the participant runs (output and input hooks), for a process standing
//! in for a VM, or inside a guest. [`Scope::Interface`] colours one VM *at its host*, on
//! the VM's own network interface (its tap), so neither the guest, nor the application,
//! nor the hypervisor changes: datagrams forwarded *from* the interface are marked, and
//! POST-marked datagrams forwarded *to* it are dropped (forward hook, interface-scoped
//! rules; each interface has a table or chain pair of its own, so the VMs of one host
//! switch colour independently).
//!
//! Rules live only in chains/tables of our own, so a user's rules are never touched.
//! Every call is idempotent; switching colours replaces the marking rule atomically (a
//! packet is never sent uncoloured between PRE and POST, which would let a message from
//! the future in). [`ColourGuard`] removes everything when dropped, so completion, abort,
//! timeout, error and unwinding all end with no rule left.
//!
//! Where commands run (for the command-based backends) is a [`exec::CommandExecutor`]: the
//! local host or a network namespace (`ip netns exec`).
//!
//! The calls are blocking (each is a short command or a round trip to a session); async
//! drivers call them from `tokio::task::spawn_blocking`.

pub mod exec;
pub mod iptables;
pub mod netlink;
pub mod nft;

use std::fmt;

use crate::net::{Error, Result};
pub use crate::protocol::{Colour, DscpConfig};

/// Which datagrams a backend colours and filters.
///
/// ```
/// use unacloud_snapshot::colour::Scope;
///
/// let tap = Scope::interface("uct-pc-1").unwrap();
/// assert_eq!(tap.nft_table(), "unacloud_uct_pc_1");
/// assert_eq!(Scope::Host.nft_table(), "unacloud");
/// assert!(Scope::interface("no/slash").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// The traffic of the machine (or namespace) the rules live in: outgoing datagrams
    /// (output hook) are marked, incoming ones (input hook) are filtered.
    #[default]
    Host,
    /// The traffic of the VM behind one network interface of the host, seen on the
    /// forward path: datagrams arriving from the interface are marked, datagrams leaving
    /// through it are filtered. Build it with [`Scope::interface`].
    Interface(String),
}

impl Scope {
    /// An interface scope. The name follows the kernel's rules for interface names:
    /// 1 to 15 bytes of ASCII letters, digits, `-`, `_` and `.`, not `.` or `..`.
    pub fn interface(name: &str) -> Result<Self> {
        let ok = !name.is_empty()
            && name.len() <= 15
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "interface name {name:?} must be 1-15 characters of a-z, A-Z, 0-9, '-', '_', '.'"
                ),
            });
        }
        Ok(Scope::Interface(name.to_string()))
    }

    /// The interface, for [`Scope::Interface`].
    pub fn interface_name(&self) -> Option<&str> {
        match self {
            Scope::Host => None,
            Scope::Interface(n) => Some(n),
        }
    }

    /// The default nf_tables table of this scope: `unacloud`, or `unacloud_<ifname>`
    /// with every character other than a letter or a digit written as `_` (two interface
    /// names that differ only there share a table: give one of them its own with
    /// `table()`).
    pub fn nft_table(&self) -> String {
        match self {
            Scope::Host => nft::DEFAULT_TABLE.to_string(),
            Scope::Interface(n) => format!("{}_{}", nft::DEFAULT_TABLE, sanitize(n)),
        }
    }

    /// The default iptables chain prefix of this scope: `UNACLOUD`, or `UC-<ifname>`
    /// (`.` written as `_`).
    pub fn iptables_prefix(&self) -> String {
        match self {
            Scope::Host => "UNACLOUD".to_string(),
            Scope::Interface(n) => format!("UC-{}", n.replace('.', "_")),
        }
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Host => f.write_str("host"),
            Scope::Interface(n) => write!(f, "interface {n}"),
        }
    }
}

/// A packet-colouring backend for one host (or namespace, or guest).
pub trait ColourBackend: Send + fmt::Debug {
    /// Creates our own chains/table (empty) if missing and empties them if present, so the
    /// host is in the idle state (no colour, no filter). Idempotent.
    fn install(&mut self) -> Result<()>;

    /// Marks outgoing IPv4 datagrams with `colour`'s DSCP value, or stops marking
    /// (`None`). Switching between colours is atomic. Idempotent.
    fn set_outgoing(&mut self, colour: Option<Colour>) -> Result<()>;

    /// Drops (`true`) or accepts (`false`) incoming datagrams marked POSTSNAPSHOT.
    /// Idempotent.
    fn set_drop_post(&mut self, drop: bool) -> Result<()>;

    /// Packets the POST filter dropped since [`ColourBackend::install`], read from the
    /// kernel's rule counters.
    fn post_packets_dropped(&mut self) -> Result<u64>;

    /// How many of our objects (tables, chains, jump rules, rules, counters) exist in the
    /// kernel now; 0 after [`ColourBackend::remove`].
    fn leftovers(&mut self) -> Result<usize>;

    /// How many marking or filtering rules are active now (0 when idle: no colour and no
    /// POST filter, whether or not our empty chains/table exist).
    fn active_rules(&mut self) -> Result<usize>;

    /// How many of the active rules mark outgoing datagrams (0 when the host does not
    /// colour its traffic).
    fn colouring_rules(&mut self) -> Result<usize>;

    /// Removes every object we created. Idempotent: removing twice, or removing what was
    /// never installed, succeeds.
    fn remove(&mut self) -> Result<()>;

    /// Where the rules live (`host`, `netns x`, `VM y`), for messages.
    fn place(&self) -> String;

    /// Whether a call returns in well under a millisecond (a long-lived session), so that
    /// async drivers may call it inline instead of on a blocking thread.
    fn is_fast(&self) -> bool {
        false
    }
}

impl<B: ColourBackend + ?Sized> ColourBackend for Box<B> {
    fn install(&mut self) -> Result<()> {
        (**self).install()
    }
    fn set_outgoing(&mut self, colour: Option<Colour>) -> Result<()> {
        (**self).set_outgoing(colour)
    }
    fn set_drop_post(&mut self, drop: bool) -> Result<()> {
        (**self).set_drop_post(drop)
    }
    fn post_packets_dropped(&mut self) -> Result<u64> {
        (**self).post_packets_dropped()
    }
    fn leftovers(&mut self) -> Result<usize> {
        (**self).leftovers()
    }
    fn active_rules(&mut self) -> Result<usize> {
        (**self).active_rules()
    }
    fn colouring_rules(&mut self) -> Result<usize> {
        (**self).colouring_rules()
    }
    fn remove(&mut self) -> Result<()> {
        (**self).remove()
    }
    fn place(&self) -> String {
        (**self).place()
    }
    fn is_fast(&self) -> bool {
        (**self).is_fast()
    }
}

/// Owns a backend and removes its rules when dropped (completion, abort, timeout, error,
/// panic unwinding). Call [`ColourGuard::remove`] to remove early and see the result.
#[derive(Debug)]
pub struct ColourGuard<B: ColourBackend> {
    backend: B,
    removed: bool,
}

impl<B: ColourBackend> ColourGuard<B> {
    /// Installs the backend's chains/table and guards them.
    pub fn install(backend: B) -> Result<Self> {
        let mut guard = Self {
            backend,
            removed: false,
        };
        // If install fails half-way the guard's drop removes what was created.
        guard.backend.install()?;
        Ok(guard)
    }

    /// The guarded backend.
    pub fn backend(&mut self) -> &mut B {
        self.removed = false;
        &mut self.backend
    }

    /// Removes the rules now and reports the outcome.
    pub fn remove(&mut self) -> Result<()> {
        self.backend.remove()?;
        self.removed = true;
        Ok(())
    }
}

impl<B: ColourBackend> Drop for ColourGuard<B> {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = self.backend.remove() {
                tracing::error!(place = %self.backend.place(), error = %e, "could not remove packet-colouring rules");
            }
        }
    }
}
