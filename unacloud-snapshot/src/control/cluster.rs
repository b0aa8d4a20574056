//! A real etcd cluster on this machine, for labs and tests.
//!
//! [`EtcdCluster::start`] runs `n` `etcd` processes (Debian's `etcd-server`), each with
//! its own data directory and client and peer ports, on loopback or on an address of a
//! network namespace, and waits — bounded — until every member answers and a leader is
//! elected. Dropping the cluster kills every member and removes the data directories,
//! also when start-up failed half-way. The members are started with a parent-death
//! signal (`setpriv --pdeathsig KILL`) from a thread that lives as long as the cluster,
//! so a lab that is SIGKILLed leaves no etcd behind either.
//!
//! Elections are tuned for a lab (50 ms heartbeats, 500 ms election timeout) so that the
//! loss of the leader is repaired within about a second.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use super::{ControlError, Result};

/// How to run the cluster.
#[derive(Debug, Clone)]
pub struct EtcdClusterConfig {
    /// Members (1 to 9; 3 survives the loss of one).
    pub members: usize,
    /// The address the members listen on.
    pub addr: Ipv4Addr,
    /// Run the members inside this network namespace (`ip netns exec`); ports then start
    /// at 2379 instead of being picked free on this machine.
    pub netns: Option<String>,
    /// The folder for the data directories (created; removed on drop). A new folder
    /// under the system's temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// The bound on start-up (every member healthy, a leader elected).
    pub startup_timeout: Duration,
}

impl EtcdClusterConfig {
    /// `members` members on 127.0.0.1 with a 30 s start-up bound.
    pub fn loopback(members: usize) -> Self {
        Self {
            members,
            addr: Ipv4Addr::LOCALHOST,
            netns: None,
            dir: None,
            startup_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    client_url: String,
    data_dir: PathBuf,
}

enum Cmd {
    Spawn(usize, std_mpsc::Sender<std::io::Result<u32>>),
    Kill(usize, std_mpsc::Sender<Option<u32>>),
    Running(usize, std_mpsc::Sender<bool>),
    Shutdown,
}

/// A running etcd cluster; killed and removed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    keeper: Option<(std_mpsc::Sender<Cmd>, std::thread::JoinHandle<()>)>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlError {
    let what = what.into();
    move |source| ControlError::Cluster {
        what,
        source: Some(source),
    }
}

fn free_port(addr: Ipv4Addr) -> Result<u16> {
    let l = TcpListener::bind((addr, 0)).map_err(io_err(format!("find a free port on {addr}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(io_err("read a bound port"))
}

/// Whether `etcd` can be run here.
pub fn etcd_available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a start-up failure is a member that could not bind its port: what etcd
/// logs when another process took a port between picking it and etcd binding it.
fn lost_port_race(e: &ControlError) -> bool {
    matches!(e, ControlError::Cluster { what, .. }
        if what.contains("exited during start-up") && what.contains("address already in use"))
}

impl EtcdCluster {
    /// Starts the cluster and waits until it is healthy.
    pub async fn start(config: EtcdClusterConfig) -> Result<Self> {
        if !(1..=9).contains(&config.members) {
            return Err(ControlError::InvalidConfig {
                reason: format!("{} etcd members (1 to 9)", config.members),
            });
        }
        if !etcd_available() {
            return Err(ControlError::Cluster {
                what: "the etcd program is not installed (Debian: etcd-server; scripts/setup installs it)".to_string(),
                source: None,
            });
        }
        // Loopback ports are picked free and released before etcd binds them, so another
        // process (any outgoing connection takes an ephemeral port) can take one in
        // between: a member that exits with "address already in use" is a lost race,
        // and the cluster is started again on other ports, at most three times.
        let mut attempt = 1;
        loop {
            match Self::start_once(&config).await {
                Err(e) if attempt < 3 && config.netns.is_none() && lost_port_race(&e) => {
                    tracing::debug!(attempt, "etcd lost a race for a port; starting again: {e}");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(config: &EtcdClusterConfig) -> Result<Self> {
        let dir = match &config.dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!(
                "unacloud-etcd-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            )),
        };
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let mut ports = Vec::new();
        for i in 0..config.members {
            ports.push(if config.netns.is_some() {
                (2379 + 2 * i as u16, 2380 + 2 * i as u16)
            } else {
                (free_port(config.addr)?, free_port(config.addr)?)
            });
        }
        let a = config.addr;
        let token = format!("unacloud-{:08x}", rand::random::<u32>());
        let initial: Vec<String> = (0..config.members)
            .map(|i| format!("m{i}=http://{a}:{}", ports[i].1))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        let mut argvs = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let data_dir = dir.join(&name);
            let client_url = format!("http://{a}:{cp}");
            let peer_url = format!("http://{a}:{pp}");
            let mut argv: Vec<String> = Vec::new();
            if let Some(ns) = &config.netns {
                argv.extend(["ip", "netns", "exec", ns].map(String::from));
            }
            argv.extend(["setpriv", "--pdeathsig", "KILL", "--", "etcd"].map(String::from));
            argv.extend([
                format!("--name={name}"),
                format!("--data-dir={}", data_dir.display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={initial}"),
                "--initial-cluster-state=new".to_string(),
                format!("--initial-cluster-token={token}"),
                "--heartbeat-interval=50".to_string(),
                "--election-timeout=500".to_string(),
                "--log-level=warn".to_string(),
            ]);
            argvs.push((argv, dir.join(format!("{name}.log"))));
            members.push(Member {
                name,
                client_url,
                data_dir,
            });
        }
        let (tx, rx) = std_mpsc::channel::<Cmd>();
        let thread = std::thread::Builder::new()
            .name("etcd-keeper".to_string())
            .spawn(move || keeper(argvs, rx))
            .map_err(io_err("start the etcd keeper thread"))?;
        let cluster = Self {
            members,
            dir,
            keeper: Some((tx, thread)),
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(config.startup_timeout).await?;
        Ok(cluster)
    }

    fn send<T>(&self, make: impl FnOnce(std_mpsc::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = std_mpsc::channel();
        self.keeper.as_ref()?.0.send(make(tx)).ok()?;
        rx.recv().ok()
    }

    fn spawn(&self, i: usize) -> Result<u32> {
        match self.send(|tx| Cmd::Spawn(i, tx)) {
            Some(r) => r.map_err(io_err(format!(
                "start etcd member {}",
                self.members[i].name
            ))),
            None => Err(ControlError::Cluster {
                what: "the etcd keeper thread is gone".to_string(),
                source: None,
            }),
        }
    }

    /// The client endpoints of every member (also the dead ones).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The endpoints as one comma-separated list (for `--etcd`).
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// The folder holding the data directories and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether member `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.send(|tx| Cmd::Running(i, tx)).unwrap_or(false)
    }

    /// SIGKILLs member `i`; returns its process id, or `None` if it was not running.
    pub fn kill(&self, i: usize) -> Option<u32> {
        self.send(|tx| Cmd::Kill(i, tx)).flatten()
    }

    /// Starts member `i` again on its data directory (after [`EtcdCluster::kill`]).
    pub fn restart(&self, i: usize) -> Result<u32> {
        self.spawn(i)
    }

    /// The index of the member that is the Raft leader now, asking the running members;
    /// `None` when none answers with a leader.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            let Some(st) = member_status(&m.client_url).await else {
                continue;
            };
            if st.1 == 0 {
                continue;
            }
            for (j, n) in self.members.iter().enumerate() {
                if !self.is_running(j) {
                    continue;
                }
                if let Some((id, _)) = member_status(&n.client_url).await {
                    if id == st.1 {
                        return Some(j);
                    }
                }
            }
        }
        None
    }

    async fn wait_healthy(&self, bound: Duration) -> Result<()> {
        let until = Instant::now() + bound;
        loop {
            let mut ok = 0;
            let mut leader = false;
            for (i, m) in self.members.iter().enumerate() {
                if !self.is_running(i) {
                    let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    return Err(ControlError::Cluster {
                        what: format!(
                            "etcd member {} exited during start-up: {}",
                            m.name,
                            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                        ),
                        source: None,
                    });
                }
                if let Some((_, l)) = member_status(&m.client_url).await {
                    ok += 1;
                    leader |= l != 0;
                }
            }
            if ok == self.members.len() && leader {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(ControlError::Cluster {
                    what: format!(
                        "{ok} of {} etcd members healthy after {bound:?}{}",
                        self.members.len(),
                        if leader { "" } else { ", no leader" }
                    ),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// (member id, leader id) of the member at `url`, or `None` if it does not answer within
/// 500 ms.
async fn member_status(url: &str) -> Option<(u64, u64)> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(300))
        .with_timeout(Duration::from_millis(500));
    let fut = async {
        let mut c = etcd_client::Client::connect([url], Some(opts)).await.ok()?;
        let st = c.status().await.ok()?;
        Some((st.header()?.member_id(), st.leader()))
    };
    tokio::time::timeout(Duration::from_millis(800), fut)
        .await
        .ok()
        .flatten()
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if let Some((tx, thread)) = self.keeper.take() {
            let _ = tx.send(Cmd::Shutdown);
            let _ = thread.join();
        }
        for m in &self.members {
            let _ = std::fs::remove_dir_all(&m.data_dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn keeper(argvs: Vec<(Vec<String>, PathBuf)>, rx: std_mpsc::Receiver<Cmd>) {
    let mut children: Vec<Option<Child>> = (0..argvs.len()).map(|_| None).collect();
    let running = |c: &mut Option<Child>| match c {
        Some(ch) => match ch.try_wait() {
            Ok(None) => true,
            _ => {
                *c = None;
                false
            }
        },
        None => false,
    };
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Spawn(i, reply) => {
                let Some((argv, log)) = argvs.get(i) else {
                    let _ = reply.send(Err(std::io::Error::other("no such member")));
                    continue;
                };
                let r = (|| {
                    let log = std::fs::File::create(log)?;
                    let child = Command::new(&argv[0])
                        .args(&argv[1..])
                        .stdin(Stdio::null())
                        .stdout(log.try_clone()?)
                        .stderr(log)
                        .spawn()?;
                    Ok(child)
                })();
                let _ = reply.send(r.map(|c: Child| {
                    let pid = c.id();
                    children[i] = Some(c);
                    pid
                }));
            }
            Cmd::Kill(i, reply) => {
                let alive = children.get_mut(i).is_some_and(running);
                let pid = match children.get_mut(i) {
                    Some(Some(ch)) if alive => {
                        let _ = ch.kill();
                        let _ = ch.wait();
                        Some(ch.id())
                    }
                    _ => None,
                };
                if let Some(c) = children.get_mut(i) {
                    *c = None;
                }
                let _ = reply.send(pid);
            }
            Cmd::Running(i, reply) => {
                let r = children.get_mut(i).is_some_and(running);
                let _ = reply.send(r);
            }
            Cmd::Shutdown => break,
        }
    }
    for ch in children.iter_mut().flatten() {
        let _ = ch.kill();
        let _ = ch.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(log: &str) -> ControlError {
        ControlError::Cluster {
            what: format!("etcd member m2 exited during start-up: {log}"),
            source: None,
        }
    }

    #[test]
    fn only_a_member_that_lost_its_port_counts_as_a_lost_race() {
        // The line etcd logged when the race was lost.
        let lost = "2026-12-03 09:29:14.734851 C | etcdmain: listen tcp 127.0.0.1:41723: bind: address already in use";
        assert!(lost_port_race(&exited(lost)));
        // Other start-up failures are not retried.
        assert!(!lost_port_race(&exited(
            "etcdmain: cannot access data directory: permission denied"
        )));
        assert!(!lost_port_race(&ControlError::Cluster {
            what: "2 of 3 etcd members healthy after 10s, no leader".to_string(),
            source: None,
        }));
        assert!(!lost_port_race(&ControlError::InvalidConfig {
            reason: "address already in use".to_string(),
        }));
    }
}
