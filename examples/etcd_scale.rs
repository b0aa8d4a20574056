//! `etcd_scale`: the etcd control plane at campus scale, on a real 3-member etcd cluster
//! on this machine.
//!
//! ```text
//! cargo run --release --example etcd_scale -- [--hosts 1000] [--ttl-s 10] [--steady-s 10]
//!     [--participants 20] [--failovers 3] [--catalog-writes 200] [--json]
//! ```
//!
//! * `--hosts` lightweight hosts (one shared etcd connection, one lease and one liveness
//!   key each) register — ids from the transaction, 64 at a time — and then keep their
//!   leases alive for `--steady-s` seconds: registration time, lease renewals per second,
//!   this process's CPU and the etcd members' CPU, and etcd's write rate (revisions/s).
//! * Coordinator failover: `--participants` host agents (each a real participant over
//!   TCP) and two candidates; the coordinator is killed (its task aborted, its lease left
//!   to expire) `--failovers` times: time from the kill to the first global snapshot
//!   completed by the new coordinator (goal: at most the lease TTL + 1 s).
//! * Catalog write latency: `--catalog-writes` fenced create-only writes of a completed
//!   global snapshot.
//!
//! Needs the `etcd` program (`scripts/setup` installs Debian's etcd-server). The figures
//! are recorded in BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use unacloud::snapshot::control::agent::{
    self, CandidateConfig, CandidateEvent, HostAgent, HostAgentConfig, NoVmsHost,
};
use unacloud::snapshot::control::catalog::{self, EtcdCatalog, Trigger};
use unacloud::snapshot::control::cluster::{EtcdCluster, EtcdClusterConfig};
use unacloud::snapshot::control::election::{self, CoordinatorInfo};
use unacloud::snapshot::control::registry::{self, Lease};
use unacloud::snapshot::control::{Etcd, EtcdConfig};
use unacloud::snapshot::net::conn::TransportConfig;
use unacloud::snapshot::protocol::{
    Catalog, ClusterId, CompletedSnapshot, GlobalSnapshotId, LocalTime, ParticipantId, Timeouts,
};

#[derive(Debug, Parser)]
#[command(name = "etcd_scale", about = "The etcd control plane with many hosts")]
struct Cli {
    /// Lightweight hosts registering and keeping leases alive.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Their lease TTL, in seconds (renewed every third of it).
    #[arg(long, default_value_t = 10)]
    ttl_s: u64,
    /// How long to measure the steady state.
    #[arg(long, default_value_t = 10)]
    steady_s: u64,
    /// Host agents with real participants for the failover measurement.
    #[arg(long, default_value_t = 20)]
    participants: usize,
    /// Coordinator kills to time.
    #[arg(long, default_value_t = 3)]
    failovers: usize,
    /// Candidate lease TTL for the failover measurement, in ms.
    #[arg(long, default_value_t = 2000)]
    candidate_ttl_ms: u64,
    /// Catalog writes to time.
    #[arg(long, default_value_t = 200)]
    catalog_writes: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn cpu_of(pid: u32) -> f64 {
    // utime + stime, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn etcd_pids() -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let ppid_ok = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(str::to_string))
                .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
                .is_some_and(|p| p == std::process::id().to_string());
            if comm.trim() == "etcd" && ppid_ok {
                v.push(pid);
            }
        }
    }
    v
}

async fn revision(etcd: &Etcd) -> i64 {
    let mut c = etcd.client();
    c.get("/", None)
        .await
        .ok()
        .and_then(|r| r.header().map(|h| h.revision()))
        .unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let cluster = EtcdCluster::start(EtcdClusterConfig::loopback(3)).await?;
    let members = etcd_pids();
    let cfg = EtcdConfig::new(cluster.endpoints(), ClusterId(99));
    let etcd = Etcd::connect(&cfg).await?;

    // 1. Registration of many hosts, 64 in flight.
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..cli.hosts {
        let (etcd, sem) = (etcd.clone(), sem.clone());
        let ttl = Duration::from_secs(cli.ttl_s);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.ok()?;
            let addr = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
            let id = registry::register(&etcd, &addr, &[format!("vm-{i}")])
                .await
                .ok()?;
            Lease::start(
                &etcd,
                ttl,
                Some(&format!("alive/{}", id.0)),
                b"1".to_vec(),
                true,
            )
            .await
            .ok()
        }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        if let Ok(Some(l)) = t.await {
            leases.push(l);
        }
    }
    let registration_s = t0.elapsed().as_secs_f64();
    let registered = leases.len();

    // 2. Steady state: leases kept alive.
    let me = std::process::id();
    let (cpu0, ecpu0, rev0) = (
        cpu_of(me),
        members.iter().map(|p| cpu_of(*p)).sum::<f64>(),
        revision(&etcd).await,
    );
    tokio::time::sleep(Duration::from_secs(cli.steady_s)).await;
    let secs = cli.steady_s as f64;
    let client_cpu = (cpu_of(me) - cpu0) / secs;
    let etcd_cpu = (members.iter().map(|p| cpu_of(*p)).sum::<f64>() - ecpu0) / secs;
    let writes_per_s = (revision(&etcd).await - rev0) as f64 / secs;
    let alive = registry::alive(&etcd).await?.len();
    let renewals_per_s = registered as f64 / (cli.ttl_s as f64 / 3.0);

    // 3. Catalog write latency (fenced, create-only).
    let stop = CancellationToken::new();
    let lead = election::campaign(
        &etcd,
        CoordinatorInfo {
            candidate: "bench".into(),
            addr: "127.0.0.1:1".parse()?,
            pid: me,
        },
        Duration::from_secs(10),
        &stop,
    )
    .await?
    .ok_or("not elected")?;
    let mut cat = Catalog::new(ClusterId(99));
    let store = EtcdCatalog::new(etcd.clone(), &lead, &cat);
    let mut write_ms = Vec::new();
    for g in 1..=cli.catalog_writes as u64 {
        let gs = GlobalSnapshotId(g);
        cat.last_started = Some(gs);
        cat.completed.insert(
            gs,
            CompletedSnapshot {
                gs,
                participants: (0..4).map(ParticipantId).collect(),
                local_times: (0..4)
                    .map(|p| LocalTime {
                        participant: ParticipantId(p),
                        local_time: Duration::from_millis(20),
                    })
                    .collect(),
                global_time: Duration::from_millis(25),
            },
        );
        let t = Instant::now();
        store.save(&cat).await?;
        write_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lead.resign(&etcd).await;
    for l in leases {
        l.abandon();
    }

    // 4. Coordinator failover with real participants (a fresh cluster id).
    let fcfg = EtcdConfig::new(cluster.endpoints(), ClusterId(100));
    let fetcd = Etcd::connect(&fcfg).await?;
    let t = Timeouts {
        precheck: Duration::from_secs(3),
        snapshot: Duration::from_secs(3),
        ..Timeouts::default()
    };
    let transport = TransportConfig::new(ClusterId(100), None);
    let mut hosts = Vec::new();
    for i in 0..cli.participants {
        let hc = HostAgentConfig {
            etcd: fcfg.clone(),
            addr: format!("host-{i}"),
            vms: vec![format!("vm-{i}")],
            lease_ttl: Duration::from_secs(2),
            timeouts: t,
        };
        hosts.push(HostAgent::start(hc, transport.clone(), Arc::new(NoVmsHost)).await?);
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, CandidateEvent)>();
    let mut cands: Vec<(tokio::task::JoinHandle<_>, CancellationToken)> = Vec::new();
    let spawn_candidate = |i: usize, tx: mpsc::UnboundedSender<(usize, CandidateEvent)>| {
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let cc = CandidateConfig {
            etcd: fcfg.clone(),
            name: format!("candidate-{i}"),
            listen,
            lease_ttl: Duration::from_millis(cli.candidate_ttl_ms),
            timeouts: t,
        };
        let (etx, mut erx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(e) = erx.recv().await {
                let _ = tx.send((i, e));
            }
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent::run_candidate(
            cc,
            transport.clone(),
            stop.clone(),
            etx,
        ));
        (task, stop)
    };
    for i in 0..=cli.failovers {
        cands.push(spawn_candidate(i, tx.clone()));
    }
    // Completed by `who` (any when None), triggering until then.
    async fn complete(
        etcd: &Etcd,
        rx: &mut mpsc::UnboundedReceiver<(usize, CandidateEvent)>,
        not: Option<usize>,
    ) -> Option<usize> {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            catalog::put_trigger(etcd, &Trigger::GlobalSnapshot)
                .await
                .ok()?;
            let wait = tokio::time::Instant::now() + Duration::from_secs(8);
            while let Ok(Some((i, e))) = tokio::time::timeout_at(wait, rx.recv()).await {
                if agent::completed_gs(&e).is_some() && Some(i) != not {
                    return Some(i);
                }
                if matches!(&e, CandidateEvent::Node(n) if format!("{n:?}").contains("GlobalSnapshotFailed"))
                {
                    break;
                }
            }
        }
        None
    }
    let mut failover_ms = Vec::new();
    let mut current = complete(&fetcd, &mut rx, None)
        .await
        .ok_or("no first snapshot")?;
    for _ in 0..cli.failovers {
        cands[current].0.abort();
        let t = Instant::now();
        let next = complete(&fetcd, &mut rx, Some(current))
            .await
            .ok_or("no snapshot after the failover")?;
        failover_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        current = next;
    }
    for (task, stop) in cands {
        stop.cancel();
        task.abort();
    }
    for h in hosts {
        h.stop().await;
    }

    let mut w = write_ms.clone();
    let report = serde_json::json!({
        "hosts": cli.hosts,
        "hosts_registered": registered,
        "hosts_alive": alive,
        "registration_s": registration_s,
        "registrations_per_s": registered as f64 / registration_s,
        "lease_ttl_s": cli.ttl_s,
        "lease_renewals_per_s": renewals_per_s,
        "client_cpu_cores": client_cpu,
        "etcd_cpu_cores": etcd_cpu,
        "etcd_writes_per_s": writes_per_s,
        "catalog_writes": cli.catalog_writes,
        "catalog_write_ms_p50": pct(&mut w, 50.0),
        "catalog_write_ms_p99": pct(&mut w, 99.0),
        "participants": cli.participants,
        "candidate_lease_ttl_ms": cli.candidate_ttl_ms,
        "failover_ms": failover_ms,
    });
    if cli.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
