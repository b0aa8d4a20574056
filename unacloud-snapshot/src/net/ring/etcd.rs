//! The ring lab with the control plane on etcd (`--control etcd`).
//!
//! The lab starts its own etcd cluster (its members' data directories inside the run
//! directory), one launcher per namespace that registers its VM in etcd, and one
//! coordinator candidate per namespace (a process of its own, so that killing the
//! coordinator leaves the host's VM and participant running). Triggers go to etcd; the
//! elected candidate takes them. `kill_coordinator_after` SIGKILLs the candidate holding
//! the role after that many completed global snapshots (another takes over within the
//! lease TTL), `kill_etcd_leader_after` SIGKILLs the etcd Raft leader.

use super::*;
use crate::control::catalog::{self, Trigger};
use crate::control::cluster::{EtcdCluster, EtcdClusterConfig};
use crate::control::election;
use crate::control::{Etcd, EtcdConfig};

fn free_loopback_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    for _ in 0..n {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| {
            Error::Network {
                peer: "127.0.0.1:0".to_string(),
                action: "listen",
                source,
            }
        })?;
        held.push(l);
    }
    Ok(held
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect())
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

pub(super) async fn run(cfg: RingNetnsConfig, e: EtcdLabConfig) -> Result<RingNetnsReport> {
    if !(1..=9).contains(&e.nodes) {
        return Err(Error::InvalidConfig {
            reason: format!("--etcd-nodes {}: use 1 to 9", e.nodes),
        });
    }
    if e.kill_etcd_leader_after.is_some() && e.nodes < 3 {
        return Err(Error::InvalidConfig {
            reason: "--kill-etcd-leader-after needs --etcd-nodes 3 or more (a quorum must survive)"
                .to_string(),
        });
    }
    let started = Instant::now();
    let deadline = started + cfg.deadline;
    let left = || deadline.saturating_duration_since(Instant::now());
    let peers = cfg.peers as usize;
    let lab = blocking(move || NetnsLab::create(peers)).await??;
    let mut lab = scopeguard(lab);
    let dir = RunDir::create()?;
    let _reaper = spawn_reaper(&cfg.program, &cfg.program_args, dir.path(), lab.0.prefix())?;

    let key_bytes: [u8; 32] = rand::random();
    let key_hex = crate::net::frame::hex_encode(&key_bytes);
    let key_file = dir.write_secret("cluster.key", key_hex.as_bytes())?;
    let cluster = ClusterId(u64::from(rand::random::<u32>()));

    // 1. The etcd cluster, inside the run directory.
    let etcd_dir = dir.path().join("etcd");
    let mut ec = EtcdClusterConfig::loopback(e.nodes);
    ec.dir = Some(etcd_dir.clone());
    let etcd_cluster = EtcdCluster::start(ec).await?;
    let endpoints = etcd_cluster.endpoints_arg();
    let etcd = Etcd::connect(&EtcdConfig::new(etcd_cluster.endpoints(), cluster)).await?;
    let mut etcd_pids: Vec<u32> = Vec::new();

    let mut procs = Procs::default();
    let tm_addr = SocketAddr::from((HUB_ADDR, TM_PORT));
    let deadline_s = (cfg.deadline.as_secs() + 5).to_string();
    let peer_pids = start_ring_peers(&cfg, &lab.0, dir.path(), &mut procs, tm_addr, &deadline_s)?;

    let ttl_ms = e.lease_ttl.as_millis().to_string();
    let common = |v: &mut Vec<String>| {
        v.extend([
            "--cluster".into(),
            cluster.0.to_string(),
            "--key-file".into(),
            key_file.display().to_string(),
            "--lease-ttl-ms".into(),
            ttl_ms.clone(),
            "--snapshot-timeout-ms".into(),
            cfg.snapshot_timeout.as_millis().to_string(),
            "--precheck-timeout-ms".into(),
            cfg.snapshot_timeout.as_millis().to_string(),
            "--events-json".into(),
        ]);
    };

    // 2. Launchers (events 0..P) and candidates (events P..2P).
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(usize, serde_json::Value)>();
    let mut launcher_idx = Vec::new();
    let mut readers = Vec::new();
    for (i, p) in lab.0.peers().iter().enumerate() {
        let mut args: Vec<String> = vec![
            "--control".into(),
            "etcd".into(),
            "--etcd".into(),
            endpoints.clone(),
            "--run-dir".into(),
            dir.path().display().to_string(),
        ];
        args.extend(host_args(&cfg, i, &p.name, peer_pids[i]));
        common(&mut args);
        let mut c = command(&cfg, None, "launcher", &args);
        c.stdout(Stdio::piped())
            .stderr(stderr_file(dir.path(), &format!("launcher{i}"))?);
        let mut child = c.spawn().map_err(spawn_err("launcher"))?;
        if let Some(out) = child.stdout.take() {
            readers.push(read_events(out, i, ev_tx.clone()));
        }
        procs.push(format!("launcher{i}"), child);
        launcher_idx.push(procs.list.len() - 1);
    }
    let mut ready = 0;
    while ready < peers {
        let i = ready;
        wait_event(&mut ev_rx, Duration::from_secs(30).min(left()), |_, v| {
            v["event"] == "ready"
        })
        .await
        .map_err(|e| with_log(e, dir.path(), &format!("launcher{i}")))?;
        ready += 1;
    }
    let ports = free_loopback_ports(peers)?;
    let mut candidate_idx = Vec::new();
    let mut candidate_pids = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut args: Vec<String> = vec![
            "--etcd".into(),
            endpoints.clone(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--name".into(),
            format!("host{i}"),
        ];
        common(&mut args);
        let mut c = command(&cfg, None, "candidate", &args);
        c.stdout(Stdio::piped())
            .stderr(stderr_file(dir.path(), &format!("candidate{i}"))?);
        let mut child = c.spawn().map_err(spawn_err("candidate"))?;
        if let Some(out) = child.stdout.take() {
            readers.push(read_events(out, peers + i, ev_tx.clone()));
        }
        candidate_pids.push(procs.push(format!("candidate{i}"), child));
        candidate_idx.push(procs.list.len() - 1);
    }
    drop(ev_tx);
    wait_event(&mut ev_rx, Duration::from_secs(30).min(left()), |i, v| {
        i >= peers && v["event"] == "elected"
    })
    .await
    .map_err(|e| with_log(e, dir.path(), "candidate0"))?;

    // 3. The ring starts.
    let tm_reader = start_manager(&cfg, &lab.0, dir.path(), &mut procs, tm_addr, &deadline_s)?;

    // 4. Global snapshots through etcd, with the kills.
    let mut report = RingNetnsReport {
        peers: cfg.peers,
        tokens_expected: cfg.tokens,
        ..RingNetnsReport::default()
    };
    let mut er = EtcdLabReport {
        etcd_nodes: e.nodes,
        ..EtcdLabReport::default()
    };
    let mut killed_at: Option<Instant> = None;
    let mut dead_candidates: Vec<usize> = Vec::new();
    // Each snapshot may need a few attempts (participants reconnecting after a failover).
    let mut attempts_left = cfg.snapshots * 4 + 8;
    while report.global_snapshots_completed < cfg.snapshots
        && attempts_left > 0
        && !left().is_zero()
    {
        attempts_left -= 1;
        // etcd may be electing a new leader of its own: retry, bounded.
        let mut put = catalog::put_trigger(&etcd, &Trigger::GlobalSnapshot).await;
        let until = Instant::now() + Duration::from_secs(10).min(left());
        while put.is_err() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            put = catalog::put_trigger(&etcd, &Trigger::GlobalSnapshot).await;
        }
        put?;
        let wait = (cfg.snapshot_timeout * 2 + Duration::from_secs(5) + e.lease_ttl).min(left());
        let got = wait_event(&mut ev_rx, wait, |i, v| {
            i >= peers
                && (v["event"] == "gs_completed"
                    || v["event"] == "gs_failed"
                    || v["event"] == "trigger_refused")
        })
        .await;
        let (_, ev) = match got {
            Ok(x) => x,
            // No coordinator took it (a failover in progress): the trigger stays queued.
            Err(Error::Timeout { .. }) => continue,
            Err(e) => return Err(e),
        };
        match ev["event"].as_str() {
            Some("gs_completed") => {
                report.record_completed(&ev);
                er.completed_ids.push(ev["gs"].as_u64().unwrap_or(0));
                if let Some(t) = killed_at.take() {
                    er.failover_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Some("gs_failed") => {
                report.record_failed(&ev);
                tokio::time::sleep(cfg.gap).await;
                continue;
            }
            _ => {
                report.failures.push(format!(
                    "trigger refused: {}",
                    ev["reason"].as_str().unwrap_or("")
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let done = report.global_snapshots_completed;
        if e.kill_coordinator_after == Some(done) && done < cfg.snapshots {
            let leader = election::current_leader(&etcd).await?;
            let idx =
                leader.and_then(|l| candidate_pids.iter().position(|p| *p == Some(l.pid as i32)));
            if let Some(c) = idx {
                if let Some(pid) = candidate_pids[c] {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    killed_at = Some(Instant::now());
                    dead_candidates.push(c);
                    er.coordinator_failovers += 1;
                }
            } else {
                report
                    .failures
                    .push("no candidate process holds the coordinator role".to_string());
            }
        }
        if e.kill_etcd_leader_after == Some(done) && done < cfg.snapshots {
            match etcd_cluster.leader().await {
                Some(l) => {
                    if let Some(pid) = etcd_cluster.kill(l) {
                        etcd_pids.push(pid);
                        er.etcd_leader_kills += 1;
                    }
                }
                None => report.failures.push("no etcd leader to kill".to_string()),
            }
        }
        tokio::time::sleep(cfg.gap).await;
    }

    // 5. The ring's result; stop everybody; what etcd recorded.
    let (counted, duration) = ring_outcome(tm_reader, left(), cfg.deadline, dir.path()).await?;
    report.tokens_counted = counted;
    report.ring_duration_s = duration;
    er.catalog_in_etcd = catalog::recorded(&etcd)
        .await?
        .iter()
        .map(|r| r.snapshot.gs.0)
        .collect();
    let live_candidates: Vec<usize> = candidate_idx
        .iter()
        .enumerate()
        .filter(|(c, _)| !dead_candidates.contains(c))
        .map(|(_, &i)| i)
        .collect();
    terminate(&mut procs, &live_candidates).await;
    terminate(&mut procs, &launcher_idx).await;
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    collect_summaries(&mut report, &mut ev_rx, &lab.0, &peer_pids, cfg.backend).await?;

    // 6. Teardown, and what is left of etcd.
    drop(procs);
    drop(etcd);
    // The members' process ids, read before they go (the killed ones are recorded).
    for i in 0..e.nodes {
        if etcd_cluster.is_running(i) {
            if let Some(pid) = etcd_cluster.kill(i) {
                etcd_pids.push(pid);
            }
        }
    }
    drop(etcd_cluster);
    er.etcd_processes_left = etcd_pids.iter().filter(|p| pid_alive(**p)).count();
    er.etcd_dirs_removed = !etcd_dir.exists();
    report.etcd = Some(er);
    let mut lab_inner = lab.take();
    report.namespaces_left = blocking(move || {
        let _ = lab_inner.teardown();
        lab_inner.namespaces_left().unwrap_or(usize::MAX)
    })
    .await?;
    Ok(report)
}
