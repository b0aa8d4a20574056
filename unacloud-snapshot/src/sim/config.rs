//! Configuration of a simulated ring run.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::net::LinkConfig;
use super::transport::{TcpParams, TransportKind};
use crate::protocol::{ClearColourPolicy, Timeouts};
use crate::sim::error::{Error, Result};

/// Which completed global snapshot the resume protocol restores after a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreFrom {
    /// The latest completed global snapshot (the coordinator's default).
    #[default]
    Latest,
    /// This global snapshot id; it must have completed before the crash.
    Id(u64),
}

impl FromStr for RestoreFrom {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("latest") {
            return Ok(Self::Latest);
        }
        s.parse::<u64>()
            .map(Self::Id)
            .map_err(|_| Error::InvalidConfig {
                reason: format!(
                    "restore-from {s:?} is neither `latest` nor a global snapshot id (an integer)"
                ),
            })
    }
}

/// A ring run: the RCPBT ring of SPEC §6 on `nodes` simulated hosts (one VM each), with
/// global snapshots taken by the protocol core, optional crash and resume.
///
/// The defaults run the protocol core as it is — the POST colour held until the
/// coordinator's RELEASE, POST dropped whenever a host is idle — with local snapshot times
/// of 1–3 ms that differ between hosts; the checker finds every global snapshot
/// consistent. `clear_colour: ClearColourPolicy::AfterOwnSnapshot` runs the thesis's literal
/// order instead, which the checker shows inconsistent (see the
/// [module documentation](super)).
///
/// Local snapshots are durable at their point by default (`durability_max` = 0); a
/// durability delay makes them live snapshots with two moments (point, then on disk), and
/// `done_before_durable` is the negative control that sends DONE at the point.
///
/// Times are virtual: the ring's 0.2 ms LAN hops and the snapshot durations cost no wall
/// clock. Local snapshots are scaled down from the thesis's seconds to milliseconds so
/// that a ring of a few hundred tokens interleaves with several global snapshots; what
/// matters for consistency is their order relative to the traffic, not their length.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RingConfig {
    /// Peers in the ring (2..=1024), one VM per host; host 0 runs the coordinator.
    pub nodes: usize,
    /// Tokens to pass (`Hello 0` … `Hello tokens-1`, then `Exit tokens`).
    pub tokens: u64,
    /// Trigger a global snapshot whenever the ring reaches a token that is a multiple of
    /// this (0 = never). A trigger while one runs is refused by the coordinator.
    pub snapshot_every: u64,
    /// Power off a host when the ring delivers this token.
    pub crash_at: Option<u64>,
    /// Power off a host at this virtual instant (from the start), instead of at a token.
    #[serde(with = "super::serde_us::opt_micros", rename = "crash_at_time_us")]
    pub crash_at_time: Option<Duration>,
    /// The host that crashes (default: drawn from the seed).
    pub crash_host: Option<usize>,
    /// How long a crashed host stays off before it powers on again.
    #[serde(with = "super::serde_us::micros", rename = "reboot_after_us")]
    pub reboot_after: Duration,
    /// How long after the crash the operator asks the coordinator to resume (POLL is
    /// repeated until the crashed host answers).
    #[serde(with = "super::serde_us::micros", rename = "resume_after_us")]
    pub resume_after: Duration,
    /// What to resume from after the crash.
    pub restore_from: RestoreFrom,
    /// The application's transport.
    pub transport: TransportKind,
    /// Seed of every random choice (latencies, losses, durations, crash host).
    pub seed: u64,
    /// Whether hosts really install the POST drop filter (`false` = negative control).
    pub filter: bool,
    /// Links of the LAN.
    pub link: LinkConfig,
    /// Shortest local snapshot (step 3), drawn uniformly per host and snapshot.
    #[serde(with = "super::serde_us::micros", rename = "local_snapshot_min_us")]
    pub local_snapshot_min: Duration,
    /// Longest local snapshot (step 3).
    #[serde(with = "super::serde_us::micros", rename = "local_snapshot_max_us")]
    pub local_snapshot_max: Duration,
    /// Shortest time from a local snapshot's point (the VM's state is fixed, the guest runs
    /// on) until its state is on the host's disk (durable), drawn uniformly per host and
    /// snapshot — e.g. the time to write the VM's memory. With `durability_max` = 0 (the
    /// default) point and durability coincide: hosts answer step 3 with `SnapshotTaken`.
    /// Otherwise they answer `SnapshotPoint`, the protocol waits for durability
    /// (`AwaitDurable`) before DONE, and a host powered off before durability loses that
    /// local snapshot.
    #[serde(with = "super::serde_us::micros", rename = "durability_min_us")]
    pub durability_min: Duration,
    /// Longest time from a local snapshot's point until it is durable.
    #[serde(with = "super::serde_us::micros", rename = "durability_max_us")]
    pub durability_max: Duration,
    /// Negative control: hosts answer step 3 with `SnapshotTaken` at the snapshot point
    /// although the state is still being written (durability `durability_min..max` later),
    /// so DONE is sent before durability. A host powered off in that window leaves a
    /// global snapshot recorded complete that cannot be restored. Needs
    /// `durability_max` > 0.
    pub done_before_durable: bool,
    /// Time a host takes for every other action (colour, filter, VM check, start): the
    /// hand-off between the protocol and the host's firewall or hypervisor.
    #[serde(with = "super::serde_us::micros", rename = "action_latency_us")]
    pub action_latency: Duration,
    /// Time a host takes to restore its VM from a local snapshot.
    #[serde(with = "super::serde_us::micros", rename = "restore_time_us")]
    pub restore_time: Duration,
    /// Time the application thinks before forwarding a token.
    #[serde(with = "super::serde_us::micros", rename = "think_us")]
    pub think: Duration,
    /// Retransmission parameters of the TCP-like transport.
    pub tcp: TcpParams,
    /// Protocol deadlines (scaled to the simulated durations).
    pub timeouts: Timeouts,
    /// Step budget before the run is declared a livelock (default: derived from the size).
    pub max_steps: Option<u64>,
    /// When the hosts stop colouring POST (step 6), passed to every state machine. The
    /// default, [`ClearColourPolicy::OnRelease`], waits for the coordinator's RELEASE;
    /// [`ClearColourPolicy::AfterOwnSnapshot`] is the thesis's literal order, a negative
    /// control: a host that finished early sends uncoloured datagrams while slower hosts
    /// have not taken their local snapshot yet.
    pub clear_colour: ClearColourPolicy,
    /// Negative control, for tests: hosts ignore the idle drop rule (`DropIncoming(Post)`
    /// issued while they colour nothing), so POST datagrams are dropped only between
    /// steps 2 and 5, as in the thesis. Reopens the window in which a host's POST
    /// datagrams reach a host whose TAKE_SNAPSHOT is still on its way.
    #[doc(hidden)]
    pub ignore_idle_drop: bool,
    /// Negative control, for tests: hosts colour POST already at step 1, i.e. before the
    /// local snapshot (the six steps reordered).
    ///
    /// Measured to be harmless: colouring early only makes receivers drop datagrams that
    /// TCP retransmits (or UDP loses), so it is no negative control for consistency.
    #[doc(hidden)]
    pub colour_post_before_snapshot: bool,
    /// Negative control, for tests: hosts stop dropping POST datagrams when the local
    /// snapshot starts instead of after it (step 5 moved before step 3).
    #[doc(hidden)]
    pub accept_post_before_snapshot: bool,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            nodes: 4,
            tokens: 1000,
            snapshot_every: 100,
            crash_at: None,
            crash_at_time: None,
            crash_host: None,
            reboot_after: Duration::from_millis(20),
            resume_after: Duration::from_millis(1),
            restore_from: RestoreFrom::Latest,
            transport: TransportKind::Tcp,
            seed: 0,
            filter: true,
            link: LinkConfig::default(),
            local_snapshot_min: Duration::from_millis(1),
            local_snapshot_max: Duration::from_millis(3),
            durability_min: Duration::ZERO,
            durability_max: Duration::ZERO,
            done_before_durable: false,
            action_latency: Duration::from_micros(50),
            restore_time: Duration::from_millis(2),
            think: Duration::ZERO,
            tcp: TcpParams::default(),
            timeouts: Timeouts {
                precheck: Duration::from_millis(50),
                snapshot: Duration::from_millis(500),
                poll_interval: Duration::from_millis(10),
                poll_give_up: None,
                resume_phase: Duration::from_secs(1),
            },
            max_steps: None,
            clear_colour: ClearColourPolicy::OnRelease,
            ignore_idle_drop: false,
            colour_post_before_snapshot: false,
            accept_post_before_snapshot: false,
        }
    }
}

impl RingConfig {
    /// Checks the configuration; every problem is an [`Error::InvalidConfig`] that names
    /// the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if !(2..=1024).contains(&self.nodes) {
            return bad(format!(
                "nodes = {}: a ring needs 2 to 1024 peers",
                self.nodes
            ));
        }
        if self.tokens == 0 {
            return bad("tokens = 0: pass at least one token".into());
        }
        if self.tokens > 100_000_000 {
            return bad(format!(
                "tokens = {}: at most 100000000 tokens per simulated run",
                self.tokens
            ));
        }
        if let Some(h) = self.crash_host {
            if h >= self.nodes {
                return bad(format!(
                    "crash host {h} does not exist in a ring of {} hosts (0..{})",
                    self.nodes, self.nodes
                ));
            }
        }
        if let Some(t) = self.crash_at {
            if t >= self.tokens {
                return bad(format!(
                    "crash-at token {t} is never reached: the ring passes tokens 0..{}",
                    self.tokens
                ));
            }
        }
        if self.crash_at.is_some() && self.crash_at_time.is_some() {
            return bad("give either crash-at (a token) or crash-at-time, not both".into());
        }
        if self.local_snapshot_min > self.local_snapshot_max {
            return bad(format!(
                "local snapshot duration range {:?}..{:?} is empty",
                self.local_snapshot_min, self.local_snapshot_max
            ));
        }
        if self.durability_min > self.durability_max {
            return bad(format!(
                "durability delay range {:?}..{:?} is empty",
                self.durability_min, self.durability_max
            ));
        }
        if self.done_before_durable && self.durability_max.is_zero() {
            return bad(
                "done_before_durable needs a durability delay (durability_max > 0): without one the snapshot point and durability coincide"
                    .into(),
            );
        }
        if self.tcp.rto.is_zero() {
            return bad("tcp.rto is 0: the retransmission timer would spin".into());
        }
        if self.timeouts.poll_interval.is_zero() {
            return bad("timeouts.poll_interval is 0: POLL would be repeated forever".into());
        }
        self.link.validate().or_else(bad)?;
        Ok(())
    }

    /// The step budget of this run: [`RingConfig::max_steps`], or by default enough
    /// steps for every token and global snapshot with a wide margin. A run that uses it
    /// up without finishing is declared a livelock. Drivers that run the simulation in
    /// slices (to report progress or honour Ctrl-C) give it the same budget.
    pub fn step_budget(&self) -> u64 {
        self.max_steps.unwrap_or_else(|| {
            let snapshots = match self.snapshot_every {
                0 => 2,
                k => self.tokens / k + 2,
            };
            let per_snapshot = 200 * self.nodes as u64;
            10_000 + 40 * self.tokens + 2 * snapshots * per_snapshot
        })
    }
}
