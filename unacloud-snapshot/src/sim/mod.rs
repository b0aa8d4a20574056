//! A deterministic simulator that proves the protocol: the RCPBT ring of SPEC §6 running
//! on simulated hosts, global snapshots taken by the real [`crate::protocol`] state
//! machines, crashes, resumes, and a checker that inspects every captured global snapshot.
//!
//! * Virtual clock: a base [`std::time::Instant`] plus virtual offsets; nothing sleeps.
//! * Seeded randomness ([`rand_chacha`]): a seed replays the same schedule.
//! * Links with latency, jitter, reordering and loss ([`LinkConfig`]).
//! * Application datagrams carry the DSCP colour their host's actions set, and arriving
//!   POST datagrams are dropped while the receiving host's filter is up — exactly as the
//!   protocol's host actions drive them (the idle drop rule included). Protocol traffic rides its own reliable
//!   connection, uncoloured and unfiltered.
//! * Two application transports per message: TCP-like (sequence numbers, cumulative ACKs,
//!   retransmission timer, duplicate discard) and UDP-like.
//! * A local snapshot captures a VM's whole state (application, transport buffers, timers);
//!   a restore replaces it. A crash powers a host off at any instant.
//! * [`check_global_snapshot`] verifies SPEC Eq. 5.2 and 5.3 on every completed global
//!   snapshot; [`check_durability`] that every host's local snapshot of it is on disk.
//!
//! The harness ([`Cluster`]) follows quinn-proto's test `Pair`: [`Cluster::step`] and
//! [`Cluster::drive_bounded`], which fails loudly on livelock.
//!
//! # What the simulation shows
//!
//! * **The thesis's step order needs close consistency points.** With the thesis's order
//!   a host stops colouring (step 6) right after its own local snapshot. When local
//!   snapshot times differ between hosts — the thesis measured 1.9–2.4 s — a host that
//!   finished early sends uncoloured datagrams (data and TCP ACKs) that a slower host
//!   accepts before its own snapshot: orphan messages (Eq. 5.3), and ACKs "from the future"
//!   that make a message unrecoverable (Eq. 5.2); after a crash and a restore the ring's own
//!   count can be wrong. With equal local snapshot times the order is consistent. The
//!   protocol core therefore keeps the POST colour until the coordinator's RELEASE
//!   ([`crate::protocol::ClearColourPolicy::OnRelease`], the default); the thesis's order
//!   remains available as a negative control
//!   ([`crate::protocol::ClearColourPolicy::AfterOwnSnapshot`], `ring_sim --thesis-order`).
//! * **The drop rule must be up before any POST datagram can arrive.** In the thesis a
//!   host installs it at step 2, after TAKE_SNAPSHOT reached it; a host whose local
//!   snapshot is shorter than the spread of TAKE_SNAPSHOT arrivals then sends POST
//!   datagrams to hosts that have no rule yet. The protocol core makes the drop rule the
//!   idle state of a host (armed first, lifted by step 5 only until step 6, re-armed after
//!   every ClearColour or ClearAll), which removes the timing assumption;
//!   `RingConfig::ignore_idle_drop` is the negative control. With both, the property
//!   tests find every global snapshot consistent for any timing.
//! * **A host driver must not let the VM send between the snapshot's consistency point and
//!   step 4.** The simulated host keeps the VM paused in that window; otherwise datagrams
//!   sent after the snapshot leave with the PRE colour.
//! * **DONE must wait for durability.** A live local snapshot has two moments: its point
//!   (the VM's state is fixed, the guest runs on) and durability (the state is on disk).
//!   Steps 4 and 5 may follow the point; DONE may not. With a durability delay
//!   (`RingConfig::durability_min..durability_max`) the protocol core waits for
//!   `AwaitDurable` before DONE, so a host that powers off between point and durability
//!   fails that global snapshot and the previous one stays restorable.
//!   `RingConfig::done_before_durable` (`ring_sim --done-before-durable`) is the negative
//!   control: DONE at the point, and the same power failure leaves a global snapshot
//!   recorded complete that cannot be restored ([`check_durability`],
//!   `RingReport::unrestorable_snapshots`).
//! * **Colouring POST early is conservative, not wrong**: receivers drop more datagrams,
//!   which TCP retransmits; it is therefore no negative control. Disabling the filter, or
//!   accepting POST before the snapshot, are (see the `sim_controls` tests).
//! * Over UDP the ring stops at the first token a filter drops or a restore leaves in a
//!   channel: RCPBT has no application-level retry, and UDP applications accept losses.
//! * The coordination overhead (global minus slowest local snapshot) is two round trips
//!   plus the host-action hand-offs of the pre-check and steps 1–5, independent of the
//!   number of hosts (`benches/snapshot_overhead.rs`); RELEASE and step 6 follow the
//!   completion.
//!
//! ```
//! use unacloud_snapshot::sim::{simulate_ring, RingConfig};
//!
//! let report = simulate_ring(RingConfig {
//!     nodes: 4,
//!     tokens: 200,
//!     snapshot_every: 50,
//!     ..RingConfig::default()
//! })
//! .unwrap();
//! assert_eq!(report.tokens_final, 200);
//! assert_eq!((report.lost, report.duplicated), (0, 0));
//! assert!(report.global_snapshots_completed >= 1);
//! ```

mod checker;
mod config;
mod error;
mod harness;
mod idset;
mod net;
mod report;
mod ring;
mod serde_us;
mod transport;
mod vm;

pub use checker::{
    check_durability, check_global_snapshot, ChannelVerdict, DurabilityVerdict, SnapshotVerdict,
};
pub use config::{RestoreFrom, RingConfig};
pub use error::{Error, Result};
pub use harness::{vm_name, Cluster, GsRecord, Host, LocalSnapshot, Stats};
pub use idset::IdSet;
pub use net::LinkConfig;
pub use report::{Overhead, RingReport, SnapshotReport};
pub use ring::{AppMsg, RingApp, RingMsg};
pub use transport::{Segment, TcpParams, TcpReceiver, TcpSender, TransportKind};
pub use vm::{Vm, VmOutput};

/// Runs the ring described by `config` to its end and reports what happened.
///
/// Errors: [`Error::InvalidConfig`] for a bad configuration, [`Error::Livelock`] if the
/// run does not settle within its step budget, [`crate::protocol::Error::SnapshotNotRestorable`]
/// (in [`Error::Protocol`]) if `restore_from` names a global snapshot that had not
/// completed when the crash happened.
pub fn simulate_ring(config: RingConfig) -> Result<RingReport> {
    let budget = config.step_budget();
    let mut cluster = Cluster::new(config)?;
    cluster.drive_bounded(budget)?;
    Ok(RingReport::from_cluster(&cluster))
}
