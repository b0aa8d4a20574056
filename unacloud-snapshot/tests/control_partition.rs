//! A host cut off from the network: its lease expires, the monitor reports it
//! Reconnecting, then Failed; the host that stays reachable stays Deployed. The cut-off
//! host is a real launcher process (`unacloud-gs launcher --control etcd`) in a network
//! namespace of its own, reaching etcd over a veth pair; the partition is an iptables
//! rule in its namespace that drops its traffic to etcd. Needs root and etcd; says so and
//! returns otherwise. The namespace, the veth pair and the processes are removed also
//! when the test fails.
#![cfg(all(feature = "etcd", feature = "cli"))]
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use unacloud_core::lifecycle::State;
use unacloud_snapshot::control::agent::{HostAgent, HostAgentConfig, NoVmsHost};
use unacloud_snapshot::control::cluster::{etcd_available, EtcdCluster, EtcdClusterConfig};
use unacloud_snapshot::control::monitor::{HostMonitor, LivenessTimeouts};
use unacloud_snapshot::control::registry;
use unacloud_snapshot::control::{Etcd, EtcdConfig};
use unacloud_snapshot::net::conn::TransportConfig;
use unacloud_snapshot::protocol::{ClusterId, ParticipantId, Timeouts};

const BIN: &str = env!("CARGO_BIN_EXE_unacloud-gs");
const CLUSTER: ClusterId = ClusterId(12);

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A namespace joined to this one by a veth pair; removed on drop.
struct Island {
    ns: String,
    veth: String,
    outside: String,
    inside: String,
    launcher: Option<Child>,
}

impl Island {
    fn create() -> Option<Self> {
        let tag = std::process::id() % 10_000;
        let octet = 1 + std::process::id() % 250;
        let i = Island {
            ns: format!("ucpart-{tag}"),
            veth: format!("ucpa{tag}"),
            outside: format!("10.215.{octet}.1"),
            inside: format!("10.215.{octet}.2"),
            launcher: None,
        };
        let peer = format!("ucpb{tag}");
        let ok = ip(&["netns", "add", &i.ns])
            && ip(&[
                "link", "add", &i.veth, "type", "veth", "peer", "name", &peer,
            ])
            && ip(&["link", "set", &peer, "netns", &i.ns])
            && ip(&["addr", "add", &format!("{}/30", i.outside), "dev", &i.veth])
            && ip(&["link", "set", &i.veth, "up"])
            && ip(&[
                "-n",
                &i.ns,
                "addr",
                "add",
                &format!("{}/30", i.inside),
                "dev",
                &peer,
            ])
            && ip(&["-n", &i.ns, "link", "set", &peer, "up"])
            && ip(&["-n", &i.ns, "link", "set", "lo", "up"]);
        ok.then_some(i)
    }

    fn iptables(&self, op: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "iptables",
                op,
                "OUTPUT",
                "-d",
                &self.outside,
                "-j",
                "DROP",
            ])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Island {
    fn drop(&mut self) {
        if let Some(c) = &mut self.launcher {
            let _ = c.kill();
            let _ = c.wait();
        }
        ip(&["link", "del", &self.veth]);
        ip(&["netns", "del", &self.ns]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_host_is_reconnecting_then_failed() {
    if !nix::unistd::geteuid().is_root() {
        skip::skipped("needs root (network namespaces, iptables)");
        return;
    }
    if !etcd_available() {
        skip::skipped("the etcd program is not installed (scripts/setup installs etcd-server)");
        return;
    }
    let mut island = Island::create().expect("a namespace with a veth pair");
    let mut ec = EtcdClusterConfig::loopback(3);
    ec.addr = island.outside.parse().unwrap();
    let cluster = EtcdCluster::start(ec).await.unwrap();
    let cfg = EtcdConfig::new(cluster.endpoints(), CLUSTER);
    let etcd = Etcd::connect(&cfg).await.unwrap();

    // The host that stays reachable, in this process.
    let steady = HostAgent::start(
        HostAgentConfig {
            etcd: cfg.clone(),
            addr: "steady".into(),
            vms: vec!["steady-vm".into()],
            lease_ttl: Duration::from_secs(1),
            timeouts: Timeouts::default(),
        },
        TransportConfig::new(CLUSTER, None),
        Arc::new(NoVmsHost),
    )
    .await
    .unwrap();

    // The host that will be cut off: a launcher in the namespace.
    let run_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &island.ns,
            BIN,
            "launcher",
            "--control",
            "etcd",
        ])
        .args(["--etcd", &cluster.endpoints_arg(), "--lease-ttl-ms", "1000"])
        .args([
            "--cluster",
            &CLUSTER.0.to_string(),
            "--advertise",
            &island.inside,
        ])
        .args([
            "--cluster-size",
            "2",
            "--vm",
            "island-vm",
            "--lab-sleep-ms",
            "1",
        ])
        .args([
            "--run-dir",
            &run_dir.path().display().to_string(),
            "--events-json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = tokio::process::ChildStdout::from_std(child.stdout.take().unwrap()).unwrap();
    island.launcher = Some(child);
    let mut lines = BufReader::new(out).lines();
    let id = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(l)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            if v["event"] == "registered" {
                return ParticipantId(v["id"].as_u64().unwrap() as u32);
            }
        }
        panic!("the launcher exited before registering");
    })
    .await
    .expect("the launcher registers");

    let mut monitor = HostMonitor::new(LivenessTimeouts {
        silence: Duration::from_millis(600),
        failed_after: Duration::from_secs(2),
    });
    let registered: Vec<ParticipantId> = registry::hosts(&etcd)
        .await
        .unwrap()
        .iter()
        .map(|h| ParticipantId(h.id))
        .collect();
    assert_eq!(registered.len(), 2);
    let observe = |m: &mut HostMonitor, alive: &[ParticipantId]| {
        m.observe(Instant::now(), &registered, alive)
    };
    let alive = registry::alive(&etcd).await.unwrap();
    observe(&mut monitor, &alive);
    assert_eq!(monitor.state(id), Some(State::Deployed));

    // The partition.
    assert!(island.iptables("-I"), "iptables in the namespace");
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until && monitor.state(id) != Some(State::Failed) {
        let alive = registry::alive(&etcd).await.unwrap();
        for ch in observe(&mut monitor, &alive) {
            assert_eq!(ch.host, id, "the reachable host changed state");
            seen.push(ch.state);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(seen, [State::Reconnecting, State::Failed]);
    assert_eq!(monitor.state(steady.id), Some(State::Deployed));

    // Healed: the launcher's lease had expired; it takes a new one and is alive again.
    assert!(island.iptables("-D"));
    let back = async {
        loop {
            if registry::alive(&etcd).await.unwrap().contains(&id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), back)
        .await
        .expect("the host is alive again once the partition heals");
    steady.stop().await;
    drop(island);
}
