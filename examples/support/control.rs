//! The `--control` flags of the lab examples (`ring_netns`, `ring_vms`).

use std::time::Duration;

use unacloud::snapshot::net::ring::EtcdLabConfig;

/// Which control plane the lab runs, and what it does to it.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Control plane: `embedded` (a metadata server; the host of VM 0 coordinates, its
    /// catalog in a file) or `etcd` (registrations, coordinator election and catalog in
    /// an etcd cluster that the lab starts on loopback).
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "etcd"])]
    pub control: String,
    /// Members of the lab's etcd cluster (with --control etcd).
    #[arg(long, default_value_t = 3)]
    pub etcd_nodes: usize,
    /// Kill the coordinator after this many completed global snapshots (with --control
    /// etcd).
    #[arg(long)]
    pub kill_coordinator_after: Option<u32>,
    /// SIGKILL the etcd leader after this many completed global snapshots (with
    /// --control etcd).
    #[arg(long)]
    pub kill_etcd_leader_after: Option<u32>,
    /// Lease TTL of hosts and coordinator candidates, in ms (with --control etcd).
    #[arg(long, default_value_t = 2000)]
    pub lease_ttl_ms: u64,
}

impl ControlArgs {
    /// The lab's etcd configuration (`None` for the embedded control plane), or why the
    /// flags do not go together.
    pub fn etcd(&self) -> Result<Option<EtcdLabConfig>, String> {
        if self.control != "etcd" {
            if self.kill_coordinator_after.is_some() || self.kill_etcd_leader_after.is_some() {
                return Err(
                    "--kill-coordinator-after and --kill-etcd-leader-after need --control etcd"
                        .to_string(),
                );
            }
            return Ok(None);
        }
        let mut e = EtcdLabConfig::new(self.etcd_nodes);
        e.kill_coordinator_after = self.kill_coordinator_after;
        e.kill_etcd_leader_after = self.kill_etcd_leader_after;
        e.lease_ttl = Duration::from_millis(self.lease_ttl_ms);
        Ok(Some(e))
    }
}
