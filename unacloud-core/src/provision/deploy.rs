//! Executing a deployment from a placement plan.
//!
//! [`DeploymentPlan::from_placement`] groups a [`Placement`]'s VMs by host;
//! [`deploy`] then provisions hosts in parallel (at most
//! [`DeployOptions::max_parallel_hosts`] at a time) and the VMs of one host one after
//! another, as the thesis measured (Table 4.1). Each VM is driven through the thesis's
//! deployment life cycle ([`crate::lifecycle`]): Requested → Configuring (templates are
//! preloaded, so nothing is transmitted) → Deploying → Deployed when VMs are started, or
//! Failed; each state is bounded by its life-cycle time limit. Transient errors
//! (time-outs, interrupted I/O) are retried with back-off within that limit; each attempt
//! is all-or-nothing, so a failed attempt leaves no VM behind. Cancellation stops new
//! work at once and rolls back the VMs that were in progress (Finishing → Finished); VMs
//! already created stay.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::collections::HashMap;
//! use std::sync::Arc;
//! use unacloud_core::hypervisor::{DiskRef, Hypervisor};
//! use unacloud_core::memory::InMemoryHypervisor;
//! use unacloud_core::model::{HardwareProfile, Host};
//! use unacloud_core::placement::{place, Algorithm, VmRequest};
//! use unacloud_core::provision::deploy::{deploy, DeployOptions, DeploymentPlan, HostTarget};
//! use unacloud_core::provision::multiattach::MultiattachManager;
//!
//! let hosts = vec![Host::new("pc-1", 4, 8192, 1 << 40), Host::new("pc-2", 4, 8192, 1 << 40)];
//! let vms: Vec<VmRequest> = (0..4)
//!     .map(|i| VmRequest::new(format!("vm-{i}"), "ubuntu@1", HardwareProfile::Small))
//!     .collect();
//! let placement = place(&hosts, &vms, Algorithm::RoundRobin, None).unwrap();
//! let plan = DeploymentPlan::from_placement(&placement, &vms).unwrap();
//!
//! let mut targets = HashMap::new();
//! for h in &hosts {
//!     let hv: Arc<dyn Hypervisor> = Arc::new(InMemoryHypervisor::new());
//!     let t = MultiattachManager::new(hv.as_ref()).register_template("/t/ubuntu-1.vdi".as_ref()).await.unwrap();
//!     let mut target = HostTarget::new(hv);
//!     target.templates.insert("ubuntu@1".into(), DiskRef::Uuid(t.uuid));
//!     targets.insert(h.id.clone(), target);
//! }
//! let report = deploy(&plan, &targets, &DeployOptions::default(), None, None).await;
//! assert_eq!(report.created(), 4);
//! # });
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
pub use tokio_util::sync::CancellationToken;

use super::catalog::Catalog;
use super::multiattach::{remove_vm_quietly, MultiattachManager};
use crate::error::{Error, Result};
use crate::hypervisor::{bounded, DiskRef, Hypervisor, StartMode};
use crate::lifecycle::{Event, Lifecycle, LifecycleTimeouts, State};
use crate::model::{DiskType, HostId, VmId, VmSpec};
use crate::placement::{Placement, VmRequest};

/// One VM to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedVm {
    /// Name, hardware profile, folder.
    pub spec: VmSpec,
    /// The template id (`name@version` for templates from the catalog).
    pub template: String,
}

/// The VMs of one host, in creation order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlan {
    /// The host.
    pub host: HostId,
    /// Its VMs.
    pub vms: Vec<PlannedVm>,
}

/// A deployment grouped by host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeploymentPlan {
    /// Hosts in the order their first VM was placed.
    pub hosts: Vec<HostPlan>,
}

impl DeploymentPlan {
    /// Groups a placement's assignments by host, keeping request order within a host.
    /// `requests` are the requests the placement was computed from.
    pub fn from_placement(placement: &Placement, requests: &[VmRequest]) -> Result<Self> {
        let by_name: HashMap<&str, &VmRequest> =
            requests.iter().map(|r| (r.name.as_str(), r)).collect();
        let mut index: HashMap<&HostId, usize> = HashMap::new();
        let mut plan = DeploymentPlan::default();
        for a in &placement.assignments {
            let req = by_name.get(a.vm.as_str()).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "the placement assigns VM {} that is not among the requests",
                    a.vm
                ))
            })?;
            let i = *index.entry(&a.host).or_insert_with(|| {
                plan.hosts.push(HostPlan {
                    host: a.host.clone(),
                    vms: Vec::new(),
                });
                plan.hosts.len() - 1
            });
            plan.hosts[i].vms.push(PlannedVm {
                spec: VmSpec::new(req.name.clone(), req.profile),
                template: req.template.clone(),
            });
        }
        Ok(plan)
    }

    /// Number of VMs in the plan.
    pub fn len(&self) -> usize {
        self.hosts.iter().map(|h| h.vms.len()).sum()
    }

    /// Whether the plan has no VM.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A host the deployment provisions on.
#[derive(Debug, Clone)]
pub struct HostTarget {
    /// Its hypervisor.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Template id → the preloaded multiattach disk on this host.
    pub templates: HashMap<String, DiskRef>,
    /// Folder for the VMs (the backend's default when `None`).
    pub vm_folder: Option<PathBuf>,
}

impl HostTarget {
    /// A target with no templates and the default VM folder.
    pub fn new(hypervisor: Arc<dyn Hypervisor>) -> Self {
        HostTarget {
            hypervisor,
            templates: HashMap::new(),
            vm_folder: None,
        }
    }
}

/// How one VM's provisioning ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmResult {
    /// Created and started (life-cycle state Deployed).
    Deployed,
    /// Created, not started because [`DeployOptions::start`] is off (life-cycle state
    /// Deploying: the caller starts it).
    Created,
    /// Gave up; whatever was created was removed (life-cycle state Failed).
    Failed,
    /// Not attempted, or rolled back, because the deployment was cancelled (life-cycle
    /// state Finished, through Finishing).
    Cancelled,
}

/// When to try a VM again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts per VM, including the first (1: no retry).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled before each further one.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_millis(500),
        }
    }
}

/// Whether an error may go away if the same step is tried again: time-outs and
/// interrupted or resource-busy I/O.
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::Timeout { .. } => true,
        Error::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::Interrupted
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::ResourceBusy
        ),
        _ => false,
    }
}

/// How to run a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployOptions {
    /// Hosts provisioned at the same time.
    pub max_parallel_hosts: usize,
    /// Retries of transient failures (within the state's time limit).
    pub retry: RetryPolicy,
    /// Life-cycle time limits. Each bounds its whole state, retries included. The thesis
    /// gives no limit for Configuring; a state without a limit here is bounded by the
    /// Deploying limit instead, so no step can hang a deployment.
    pub timeouts: LifecycleTimeouts,
    /// Start each VM after creating it (Deploying → Deployed); off for backends that
    /// cannot run VMs here.
    pub start: bool,
    /// Finish an interrupted deployment of the same plan: a VM of the plan that
    /// already exists on its host is kept when it is complete (its one disk is its own
    /// differencing child of the template and every file of it is there,
    /// [`MultiattachManager::is_complete_from`]) and is otherwise removed with its own
    /// files and made again. Off: an existing VM of that name fails (it is never
    /// touched).
    pub resume: bool,
}

impl Default for DeployOptions {
    /// 16 hosts at a time, 3 attempts, the thesis's time limits, no start, no resume.
    fn default() -> Self {
        DeployOptions {
            max_parallel_hosts: 16,
            retry: RetryPolicy::default(),
            timeouts: LifecycleTimeouts::default(),
            start: false,
            resume: false,
        }
    }
}

/// What happened to one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmOutcome {
    /// The VM's name.
    pub vm: String,
    /// Its host.
    pub host: HostId,
    /// The template id.
    pub template: String,
    /// How it ended.
    pub result: VmResult,
    /// Its life-cycle state at the end.
    pub state: State,
    /// Life-cycle states entered, with the time since this VM's provisioning began
    /// (the first entry is Requested at zero).
    pub history: Vec<(State, Duration)>,
    /// Attempts made at creating it.
    pub attempts: u32,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Time from Requested to the end.
    pub elapsed: Duration,
}

/// The final report of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeploymentReport {
    /// Per-VM outcomes, grouped by host in plan order.
    pub outcomes: Vec<VmOutcome>,
    /// Wall-clock time of the whole deployment.
    pub elapsed: Duration,
    /// Whether the deployment was cancelled.
    pub cancelled: bool,
}

impl DeploymentReport {
    /// VMs created (started or not).
    pub fn created(&self) -> usize {
        self.count(VmResult::Deployed) + self.count(VmResult::Created)
    }

    /// VMs that failed.
    pub fn failed(&self) -> usize {
        self.count(VmResult::Failed)
    }

    /// VMs cancelled.
    pub fn cancelled_vms(&self) -> usize {
        self.count(VmResult::Cancelled)
    }

    fn count(&self, r: VmResult) -> usize {
        self.outcomes.iter().filter(|o| o.result == r).count()
    }

    /// Records every created VM whose template id is `name@version` in the catalog
    /// (so the version cannot be removed while they exist).
    pub fn record_in(&self, catalog: &mut Catalog) -> Result<()> {
        for o in self
            .outcomes
            .iter()
            .filter(|o| matches!(o.result, VmResult::Deployed | VmResult::Created))
        {
            if let Some((name, v)) = o.template.rsplit_once('@') {
                if let Ok(version) = v.parse::<u32>() {
                    catalog.record_use(name, version, &o.host.0, &o.vm)?;
                }
            }
        }
        Ok(())
    }
}

/// Called after each VM reaches its final state.
pub type OutcomeCallback = Arc<dyn Fn(&VmOutcome) + Send + Sync>;

/// Executes `plan` on `targets`. See the [module documentation](self).
///
/// Never fails as a whole: every VM gets an outcome (a host missing from `targets`, or a
/// template missing on a host, fails that host's VMs with the reason).
pub async fn deploy(
    plan: &DeploymentPlan,
    targets: &HashMap<HostId, HostTarget>,
    options: &DeployOptions,
    cancel: Option<CancellationToken>,
    on_outcome: Option<OutcomeCallback>,
) -> DeploymentReport {
    let start = Instant::now();
    let cancel = cancel.unwrap_or_default();
    let sem = Arc::new(tokio::sync::Semaphore::new(
        options.max_parallel_hosts.max(1),
    ));
    let mut set = tokio::task::JoinSet::new();
    for (i, hp) in plan.hosts.iter().enumerate() {
        let hp = hp.clone();
        let target = targets.get(&hp.host).cloned();
        let sem = sem.clone();
        let cancel = cancel.clone();
        let options = *options;
        let cb = on_outcome.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let out = run_host(&hp, target.as_ref(), &options, &cancel, cb.as_ref()).await;
            (i, out)
        });
    }
    let mut per_host: Vec<Vec<VmOutcome>> = vec![Vec::new(); plan.hosts.len()];
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, out)) => per_host[i] = out,
            Err(e) => tracing::error!("a host task failed: {e}"),
        }
    }
    DeploymentReport {
        outcomes: per_host.into_iter().flatten().collect(),
        elapsed: start.elapsed(),
        cancelled: cancel.is_cancelled(),
    }
}

async fn run_host(
    hp: &HostPlan,
    target: Option<&HostTarget>,
    options: &DeployOptions,
    cancel: &CancellationToken,
    cb: Option<&OutcomeCallback>,
) -> Vec<VmOutcome> {
    let mut out = Vec::with_capacity(hp.vms.len());
    for vm in &hp.vms {
        let o = run_vm(&hp.host, vm, target, options, cancel).await;
        if let Some(cb) = cb {
            cb(&o);
        }
        out.push(o);
    }
    out
}

/// Drives one VM's [`Lifecycle`] and keeps its outcome.
struct Tracked {
    lc: Lifecycle,
    t0: Instant,
    outcome: VmOutcome,
    limits: LifecycleTimeouts,
}

impl Tracked {
    fn event(&mut self, e: Event) {
        if let Err(err) = self.lc.handle_event(Instant::now(), e) {
            tracing::warn!("life cycle of {}: {err}", self.outcome.vm);
        }
    }

    /// Time left in the current state: its own limit, or the Deploying limit when the
    /// state has none.
    fn remaining(&self) -> Duration {
        let deadline = self.lc.poll_timeout().or_else(|| {
            self.limits
                .deploying
                .and_then(|d| self.lc.entered_at().checked_add(d))
        });
        match deadline {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        }
    }

    fn finish(mut self, result: VmResult, error: Option<String>) -> VmOutcome {
        self.lc.handle_timeout(Instant::now());
        let o = &mut self.outcome;
        o.result = result;
        o.state = self.lc.state();
        o.history = std::iter::once((State::Requested, Duration::ZERO))
            .chain(
                self.lc
                    .history()
                    .iter()
                    .map(|t| (t.to, t.at.saturating_duration_since(self.t0))),
            )
            .collect();
        o.error = error;
        o.elapsed = self.t0.elapsed();
        self.outcome
    }

    fn fail(mut self, reason: String) -> VmOutcome {
        self.lc.handle_timeout(Instant::now());
        if self.lc.state() != State::Failed {
            self.event(Event::FailureReported {
                reason: reason.clone(),
            });
        }
        self.finish(VmResult::Failed, Some(reason))
    }

    fn cancel(mut self, reason: &str) -> VmOutcome {
        self.event(Event::StopRequested);
        // Nothing of this VM runs any more (never created, or rolled back).
        self.event(Event::PoweredOff);
        self.finish(VmResult::Cancelled, Some(reason.to_owned()))
    }
}

async fn run_vm(
    host: &HostId,
    vm: &PlannedVm,
    target: Option<&HostTarget>,
    options: &DeployOptions,
    cancel: &CancellationToken,
) -> VmOutcome {
    let t0 = Instant::now();
    let mut limits = options.timeouts;
    if limits.configuring.is_none() {
        limits.configuring = limits.deploying;
    }
    let mut tr = Tracked {
        lc: Lifecycle::new(vm.spec.name.clone(), t0, limits),
        t0,
        limits,
        outcome: VmOutcome {
            vm: vm.spec.name.clone(),
            host: host.clone(),
            template: vm.template.clone(),
            result: VmResult::Failed,
            state: State::Requested,
            history: Vec::new(),
            attempts: 0,
            error: None,
            elapsed: Duration::ZERO,
        },
    };
    if cancel.is_cancelled() {
        return tr.cancel("deployment cancelled before this VM started");
    }
    let Some(target) = target else {
        return tr.fail(format!("no hypervisor for host {host}"));
    };
    let hv = target.hypervisor.as_ref();
    let mut spec = vm.spec.clone();
    if spec.base_folder.is_none() {
        spec.base_folder = target.vm_folder.clone();
    }
    let id = VmId::new(spec.name.clone());

    // The template must be preloaded: nothing is transmitted (Requested → Configuring).
    let Some(r) = target.templates.get(&vm.template) else {
        return tr.fail(format!(
            "template {} is not preloaded on host {host}",
            vm.template
        ));
    };
    let look = async {
        let disks = hv.list_disks().await?;
        disks
            .into_iter()
            .find(|d| match r {
                DiskRef::Uuid(u) => d.uuid == *u,
                DiskRef::Path(p) => d.location == *p,
            })
            .filter(|d| d.disk_type == DiskType::MultiAttach)
            .ok_or_else(|| Error::NotFound {
                kind: "multiattach template",
                id: format!("{r} on host {host}"),
            })
    };
    let template = match bounded("look up template", tr.remaining(), look).await {
        Ok(d) => d,
        Err(e) => return tr.fail(crate::error::chain(&e)),
    };
    // Never touch a VM this deployment did not create; when resuming the same plan,
    // keep a complete VM and make a half-made one again.
    let mut kept = false;
    if hv.vm_info(&id).await.is_ok() {
        if !options.resume {
            return tr.fail(format!(
                "a VM named {} already exists on host {host}",
                spec.name
            ));
        }
        let manager = MultiattachManager::new(hv);
        match manager.is_complete_from(&id, &template).await {
            Ok(true) => kept = true,
            Ok(false) => {
                tracing::info!(
                    "VM {} on {host} was left half-made by an interrupted run; making it again",
                    spec.name
                );
                if let Err(e) = hv.unregister_vm(&id, true).await {
                    return tr.fail(format!(
                        "the half-made VM {} could not be removed: {}",
                        spec.name,
                        crate::error::chain(&e)
                    ));
                }
            }
            Err(e) => return tr.fail(crate::error::chain(&e)),
        }
    }
    tr.event(Event::TransferCompleted);

    // Configuring: create the VM and its differencing disk, all-or-nothing, retried on
    // transient errors while the state's time limit lasts.
    let mut backoff = options.retry.backoff;
    loop {
        if kept {
            break;
        }
        tr.outcome.attempts += 1;
        let manager = MultiattachManager::new(hv);
        let attempt = bounded(
            "configure VM",
            tr.remaining(),
            manager.create_vm_from(&spec, &template),
        );
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            r = attempt => Some(r),
        };
        match result {
            Some(Ok(_)) => break,
            None => {
                remove_vm_quietly(hv, &id).await;
                return tr
                    .cancel("deployment cancelled while this VM was being created; rolled back");
            }
            Some(Err(e)) => {
                // A time-out drops the operation half-way: remove what it created.
                if !matches!(e, Error::AlreadyExists { .. }) {
                    remove_vm_quietly(hv, &id).await;
                }
                let wait = backoff;
                if is_transient(&e)
                    && tr.outcome.attempts < options.retry.max_attempts
                    && tr.remaining() > wait
                    && !cancel.is_cancelled()
                {
                    tracing::info!(
                        "retrying VM {} on {host} after transient error: {e}",
                        spec.name
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = backoff.saturating_mul(2);
                    continue;
                }
                return tr.fail(crate::error::chain(&e));
            }
        }
    }
    tr.event(Event::ConfigurationCompleted);
    if !options.start {
        return tr.finish(VmResult::Created, None);
    }

    // Deploying: start it.
    let start = bounded(
        "start VM",
        tr.remaining(),
        hv.start_vm(&id, StartMode::Headless),
    );
    let started = tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        r = start => Some(r),
    };
    match started {
        Some(Ok(())) => {
            tr.event(Event::Started);
            tr.finish(VmResult::Deployed, None)
        }
        None => {
            remove_vm_quietly(hv, &id).await;
            tr.cancel("deployment cancelled while this VM was starting; rolled back")
        }
        Some(Err(e)) => {
            remove_vm_quietly(hv, &id).await;
            tr.fail(crate::error::chain(&e))
        }
    }
}
