//! # unacloud-snapshot
//!
//! Consistent global snapshots — and a consistent resume from them — of a distributed
//! system whose processes run in virtual machines on many hosts, **without changing the
//! applications or the hypervisor**. After a resume, the distributed application continues
//! with no lost and no duplicated messages.
//!
//! Each host colours the IPv4 datagrams its VMs send (the DSCP field: PRESNAPSHOT before
//! its local snapshot, POSTSNAPSHOT after) and, until its own local snapshot is taken, drops
//! datagrams already coloured POSTSNAPSHOT — "messages from the future". TCP retransmits
//! what was dropped; UDP applications already tolerate the loss. A coordinator runs a
//! pre-check (are all VMs running?), then has every host run the thesis's six steps, and
//! completes when its own steps are done and every participant answered DONE.
//!
//! ## Where this protocol deviates from the thesis
//!
//! The deterministic simulator ([`sim`]) found the thesis's literal step order
//! inconsistent whenever local snapshot times differ between hosts (the thesis measured
//! 1.9–2.4 s): a host that clears its colour (step 6) right after its own snapshot sends
//! uncoloured datagrams that a slower host, not yet at its snapshot point, accepts —
//! orphan messages, and TCP ACKs "from the future" that make messages unrecoverable after
//! a restore. Two changes, both in the protocol core and on by default, make every global
//! snapshot consistent for any timing (see `PROTOCOL.md` §6.4):
//!
//! * **RELEASE.** A host keeps colouring POST after step 5 and sends DONE; the coordinator,
//!   once every host has taken its local snapshot (completion), sends RELEASE to everyone,
//!   and only then does each host perform step 6. ABORT, or the host's own deadline if the
//!   coordinator vanished, removes every rule instead. Cost: N−1 more messages, no extra
//!   round trip before completion.
//! * **Idle drop rule.** A host drops incoming POST datagrams whenever it is not between
//!   steps 5 and 6: its state machine arms the rule first and again after every
//!   ClearColour or ClearAll. So POST traffic of a fast host cannot reach a host whose
//!   TAKE_SNAPSHOT is still on its way.
//!
//! [`protocol::ClearColourPolicy::AfterOwnSnapshot`] restores the thesis's order as a
//! negative control.
//!
//! ## Example: one global snapshot, driven by hand
//!
//! The protocol core does no I/O: you feed it received messages and completed host actions
//! and drain what it wants done. Here two state machines talk through a queue and every
//! host action succeeds at once.
//!
//! ```
//! use std::collections::VecDeque;
//! use std::time::{Duration, Instant};
//! use unacloud_snapshot::protocol::*;
//!
//! let cluster = ClusterId(1);
//! let now = Instant::now();
//! let mut coordinator = Coordinator::new(
//!     CoordinatorConfig::new(cluster, vec![ParticipantId(1)], vec!["vm-a".into()]),
//!     Catalog::new(cluster), // or CatalogStore::load_or_new after a restart
//! )?;
//! let mut participant =
//!     Participant::new(ParticipantConfig::new(cluster, ParticipantId(1), vec!["vm-b".into()]))?;
//!
//! // What a host driver would do; a real one calls the hypervisor and the packet filter.
//! fn perform(action: &HostAction) -> ActionOutcome {
//!     match action {
//!         HostAction::CheckVmsRunning { .. } => ActionOutcome::VmsRunning(true),
//!         HostAction::TakeLocalSnapshots { .. } => {
//!             ActionOutcome::SnapshotTaken { local_time: Duration::from_millis(1900) }
//!         }
//!         _ => ActionOutcome::Done,
//!     }
//! }
//!
//! let gs = coordinator.start_global_snapshot(now)?;
//! let mut wire: VecDeque<Vec<u8>> = VecDeque::new();
//! let mut events = Vec::new();
//! loop {
//!     while let Some(out) = coordinator.poll_output() {
//!         match out {
//!             Output::Transmit(env) => wire.push_back(encode_frame(&env)?),
//!             Output::Action { id, action } => {
//!                 coordinator.handle_action_complete(now, id, perform(&action))?
//!             }
//!             Output::Event(e) => events.push(e),
//!         }
//!     }
//!     while let Some(out) = participant.poll_output() {
//!         match out {
//!             Output::Transmit(env) => wire.push_back(encode_frame(&env)?),
//!             Output::Action { id, action } => {
//!                 participant.handle_action_complete(now, id, perform(&action))?
//!             }
//!             Output::Event(_) => {}
//!         }
//!     }
//!     let Some(frame) = wire.pop_front() else { break };
//!     let env = decode_frame(&frame)?;
//!     if env.to.is_coordinator() {
//!         coordinator.handle_message(now, env)?;
//!     } else {
//!         participant.handle_message(now, env)?;
//!     }
//! }
//! assert!(events.iter().any(|e| matches!(e,
//!     ProtocolEvent::GlobalSnapshotCompleted { gs: g, .. } if *g == gs)));
//! assert!(coordinator.catalog().is_restorable(gs));
//!
//! // A second global snapshot while none runs is fine; while one runs it is refused.
//! coordinator.start_global_snapshot(now)?;
//! assert!(coordinator.start_global_snapshot(now).is_err());
//! # Ok::<(), unacloud_snapshot::protocol::Error>(())
//! ```
//!
//! ## Design
//!
//! * [`protocol`] — the sans-IO core, shaped like quinn-proto: [`protocol::Coordinator`],
//!   [`protocol::Participant`] and [`protocol::MetadataServer`] take `handle_message`,
//!   `handle_action_complete` and `handle_timeout` calls with the current `Instant`, and
//!   give back [`protocol::Output`]s (transmit an envelope, perform a
//!   [`protocol::HostAction`], note a [`protocol::ProtocolEvent`]) and the next deadline
//!   (`poll_timeout`). No sockets, threads or clock reads inside; the simulator and the
//!   tokio transport are two drivers of the same core. The wire format (length-delimited,
//!   versioned JSON frames) and every state transition are specified in `PROTOCOL.md`, so
//!   other projects can implement the protocol in another language.
//! * [`catalog_store`] — the coordinator's catalog of completed global snapshots, persisted
//!   atomically (temporary file + rename) so a restarted coordinator never reuses an epoch
//!   and only offers completed global snapshots for restore.
//! * Errors: one type per layer, each describing only what its layer did, the outer
//!   ones wrapping the inner ones as their `source`. [`protocol::Error`] (wire format,
//!   state machines, their configuration; no I/O), [`catalog_store::Error`] (the catalog
//!   file), [`sim::Error`] (the simulator: its configuration, the step budget) and, with
//!   the `tokio` feature, `net::Error` (transport, daemons, packet colouring, namespaces,
//!   the RCPBT ring, the etcd control plane), which carries the protocol's and the
//!   catalog file's errors unchanged in `net::Error::Protocol` and `net::Error::Catalog`.
//! * Without default features (no `sim`, no `tokio`) the crate is the sans-IO protocol
//!   alone: no tokio, no rand.
//! * [`sim`] (feature `sim`, on by default) — a deterministic simulator (virtual
//!   clock, seeded network, crash injection, TCP-like and UDP-like transports, the
//!   RCPBT ring workload) with a consistency checker.
//! * With the `tokio` feature: the TCP transport, host drivers and packet-colouring
//!   backends (iptables / nftables).
//! * With the `hypervisor` feature (which depends on `unacloud-core`):
//!   `net::LocalSnapshot::Hypervisor`, whose host performs the protocol's local snapshots,
//!   restores and starts through an `Arc<dyn Hypervisor>` and checks in phase 1 that
//!   each VM runs and has room for its snapshot. Without it the crate needs none of the
//!   hypervisor layer.
//! * With the `etcd` feature: the `control` module, the control plane on an etcd
//!   cluster — host registration under leases, coordinator election whose leader key
//!   fences every catalog write, the catalog and the triggers in etcd, and a loopback
//!   etcd cluster for labs and tests — so that no single PC's power switch stops global
//!   snapshots (`PROTOCOL.md` §10.1).
//! * With the `cli` feature: the `unacloud-gs` command line (`net::cli`).
//!
//! Faults the original design left open are handled explicitly: a participant silent past a
//! deadline fails that global snapshot (never offered for restore, ABORT tells the others to
//! clean up); a participant whose steps do not finish in time, or that hears neither
//! RELEASE nor ABORT in time, removes its colour and filter rules by itself; global
//! snapshot ids are epochs, so late and duplicated messages of earlier attempts are
//! ignored.
#![deny(missing_docs)]

pub mod catalog_store;
pub mod protocol;
#[cfg(feature = "sim")]
pub mod sim;

#[cfg(feature = "tokio")]
pub mod colour;
#[cfg(feature = "etcd")]
pub mod control;
#[cfg(feature = "tokio")]
pub mod net;
#[cfg(feature = "tokio")]
pub mod netns;
#[cfg(feature = "tokio")]
pub mod rcpbt;
