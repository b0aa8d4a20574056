//! Executing deployments: plans from placement, per-VM outcomes, retries, time limits,
//! bounded host parallelism and cancellation with rollback.
#![allow(clippy::unwrap_used)]

mod provision_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use provision_support::{Fault, Faulty, Tracker};
use tokio_util::sync::CancellationToken;
use unacloud_core::hypervisor::{DiskRef, Hypervisor};
use unacloud_core::lifecycle::State;
use unacloud_core::memory::InMemoryHypervisor;
use unacloud_core::model::{HardwareProfile, Host, HostId};
use unacloud_core::placement::{place, Algorithm, VmRequest};
use unacloud_core::provision::deploy::{
    deploy, DeployOptions, DeploymentPlan, HostTarget, RetryPolicy, VmResult,
};
use unacloud_core::provision::multiattach::MultiattachManager;

const TEMPLATE: &str = "ubuntu@1";

struct Cluster {
    hosts: Vec<Host>,
    faulty: Vec<Arc<Faulty>>,
    targets: HashMap<HostId, HostTarget>,
}

async fn cluster(n: usize, tracker: Option<Arc<Tracker>>) -> Cluster {
    let mut hosts = Vec::new();
    let mut faulty = Vec::new();
    let mut targets = HashMap::new();
    for i in 0..n {
        let host = Host::new(format!("pc-{i:02}"), 8, 16384, 100 << 30);
        let mem: Arc<dyn Hypervisor> = Arc::new(InMemoryHypervisor::new());
        let t = MultiattachManager::new(mem.as_ref())
            .register_template("/templates/ubuntu-1.vdi".as_ref())
            .await
            .unwrap();
        let mut f = Faulty::new(mem);
        f.tracker = tracker.clone();
        let f = Arc::new(f);
        let mut target = HostTarget::new(f.clone());
        target
            .templates
            .insert(TEMPLATE.to_owned(), DiskRef::Uuid(t.uuid));
        targets.insert(host.id.clone(), target);
        hosts.push(host);
        faulty.push(f);
    }
    Cluster {
        hosts,
        faulty,
        targets,
    }
}

fn requests(n: usize) -> Vec<VmRequest> {
    (0..n)
        .map(|i| {
            VmRequest::new(format!("vm-{i:03}"), TEMPLATE, HardwareProfile::Small)
                .with_disk(300 << 20, 4 << 30)
        })
        .collect()
}

/// The plan for `requests(n)` placed on the cluster's hosts by `algorithm`.
fn plan_for(c: &Cluster, n: usize, algorithm: Algorithm) -> DeploymentPlan {
    let vms = requests(n);
    DeploymentPlan::from_placement(&place(&c.hosts, &vms, algorithm, None).unwrap(), &vms).unwrap()
}

fn fast_options() -> DeployOptions {
    DeployOptions {
        retry: RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_millis(1),
        },
        ..DeployOptions::default()
    }
}

async fn vm_count(c: &Cluster) -> usize {
    let mut n = 0;
    for f in &c.faulty {
        n += f.inner.list_vms().await.unwrap().len();
    }
    n
}

#[tokio::test]
async fn a_disk_aware_plan_is_deployed_host_by_host() {
    let c = cluster(3, None).await;
    let mut hosts = c.hosts.clone();
    for h in &mut hosts {
        h.preloaded_templates.push(TEMPLATE.to_owned());
    }
    let vms = requests(12);
    let placement = place(&hosts, &vms, Algorithm::DiskAware, None).unwrap();
    let plan = DeploymentPlan::from_placement(&placement, &vms).unwrap();
    assert_eq!(plan.len(), 12);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let report = deploy(
        &plan,
        &c.targets,
        &fast_options(),
        None,
        Some(Arc::new(move |o| s2.lock().unwrap().push(o.vm.clone()))),
    )
    .await;
    assert_eq!(report.created(), 12);
    assert_eq!(report.failed(), 0);
    assert!(!report.cancelled);
    assert_eq!(seen.lock().unwrap().len(), 12);
    assert_eq!(vm_count(&c).await, 12);
    for o in &report.outcomes {
        let states: Vec<State> = o.history.iter().map(|(s, _)| *s).collect();
        // Preloaded template: nothing transmitted; not started: waits in Deploying.
        assert_eq!(
            states,
            [State::Requested, State::Configuring, State::Deploying]
        );
        assert_eq!(o.result, VmResult::Created);
        assert_eq!(o.state, State::Deploying);
        assert_eq!(placement.host_of(&o.vm), Some(&o.host));
        let vm = c.targets[&o.host]
            .hypervisor
            .vm_info(&o.vm.as_str().into())
            .await
            .unwrap();
        assert_eq!(vm.disks.len(), 1);
    }
    // Outcomes are grouped by host, in each host's plan order.
    for hp in &plan.hosts {
        let got: Vec<&str> = report
            .outcomes
            .iter()
            .filter(|o| o.host == hp.host)
            .map(|o| o.vm.as_str())
            .collect();
        let want: Vec<&str> = hp.vms.iter().map(|v| v.spec.name.as_str()).collect();
        assert_eq!(got, want);
    }

    // The report records the template version of every VM in the catalog.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.vdi");
    std::fs::write(&img, b"u").unwrap();
    let mut cat =
        unacloud_core::provision::catalog::Catalog::open(dir.path().join("c.json")).unwrap();
    let v = cat
        .add_draft(unacloud_core::provision::catalog::NewTemplate::new(
            "ubuntu",
            "Linux",
            unacloud_core::model::DiskFormat::Vdi,
            &img,
        ))
        .unwrap();
    cat.publish("ubuntu", v).unwrap();
    report.record_in(&mut cat).unwrap();
    assert_eq!(cat.users("ubuntu", 1).len(), 12);
    assert!(cat.remove_version("ubuntu", 1).is_err());
}

#[tokio::test]
async fn transient_errors_are_retried_and_permanent_ones_reported() {
    let c = cluster(2, None).await;
    let plan = plan_for(&c, 4, Algorithm::RoundRobin);
    // Host 0: two time-outs, then success. Host 1: a permanent failure once.
    c.faulty[0].inject("attach_disk", 0, Fault::Timeout, 2);
    c.faulty[1].inject("attach_disk", 0, Fault::Fail, 1);
    let report = deploy(&plan, &c.targets, &fast_options(), None, None).await;
    let by_name: HashMap<&str, _> = report.outcomes.iter().map(|o| (o.vm.as_str(), o)).collect();
    let first0 = &by_name[plan.hosts[0].vms[0].spec.name.as_str()];
    assert_eq!(first0.result, VmResult::Created);
    assert_eq!(first0.attempts, 3);
    let first1 = &by_name[plan.hosts[1].vms[0].spec.name.as_str()];
    assert_eq!(first1.result, VmResult::Failed);
    assert_eq!(first1.state, State::Failed);
    assert_eq!(first1.attempts, 1);
    assert!(first1
        .error
        .as_deref()
        .unwrap()
        .contains("injected failure"));
    assert_eq!(report.created(), 3);
    assert_eq!(report.failed(), 1);
    // The failed attempts left nothing behind.
    assert_eq!(vm_count(&c).await, 3);
}

#[tokio::test]
async fn a_step_over_its_time_limit_fails_and_is_rolled_back() {
    let c = cluster(1, None).await;
    let plan = plan_for(&c, 2, Algorithm::FirstFit);
    c.faulty[0].inject("attach_disk", 0, Fault::Delay(Duration::from_secs(30)), 1);
    let mut options = fast_options();
    options.retry.max_attempts = 1;
    options.timeouts.configuring = Some(Duration::from_millis(100));
    let report = deploy(&plan, &c.targets, &options, None, None).await;
    assert_eq!(report.outcomes[0].result, VmResult::Failed);
    assert_eq!(report.outcomes[0].state, State::Failed);
    assert!(report.outcomes[0]
        .error
        .as_deref()
        .unwrap()
        .contains("timed out"));
    assert_eq!(report.outcomes[1].result, VmResult::Created);
    assert_eq!(vm_count(&c).await, 1, "the timed-out VM was removed");
}

#[tokio::test]
async fn missing_template_or_host_fails_those_vms_with_the_reason() {
    let mut c = cluster(2, None).await;
    let plan = plan_for(&c, 4, Algorithm::RoundRobin);
    c.targets.get_mut(&c.hosts[0].id).unwrap().templates.clear();
    c.targets.remove(&c.hosts[1].id);
    let report = deploy(&plan, &c.targets, &fast_options(), None, None).await;
    assert_eq!(report.failed(), 4);
    for o in &report.outcomes {
        let e = o.error.as_deref().unwrap();
        if o.host == c.hosts[0].id {
            assert!(e.contains("not preloaded"), "{e}");
        } else {
            assert!(e.contains("no hypervisor"), "{e}");
        }
    }
}

#[tokio::test]
async fn an_existing_vm_is_never_touched() {
    let c = cluster(1, None).await;
    let plan = plan_for(&c, 1, Algorithm::FirstFit);
    let first = deploy(&plan, &c.targets, &fast_options(), None, None).await;
    assert_eq!(first.created(), 1);
    let second = deploy(&plan, &c.targets, &fast_options(), None, None).await;
    assert_eq!(second.failed(), 1);
    assert!(second.outcomes[0]
        .error
        .as_deref()
        .unwrap()
        .contains("already exists"));
    assert_eq!(vm_count(&c).await, 1);
}

#[tokio::test]
async fn host_parallelism_is_bounded() {
    for limit in [1usize, 3] {
        let tracker = Arc::new(Tracker::default());
        let c = cluster(6, Some(tracker.clone())).await;
        for f in &c.faulty {
            f.inject("create_vm", 0, Fault::Delay(Duration::from_millis(40)), 2);
        }
        let plan = plan_for(&c, 12, Algorithm::RoundRobin);
        let mut options = fast_options();
        options.max_parallel_hosts = limit;
        let report = deploy(&plan, &c.targets, &options, None, None).await;
        assert_eq!(report.created(), 12);
        let max = tracker.max.load(std::sync::atomic::Ordering::SeqCst);
        // VMs of one host are sequential, so at most one create per host is in flight.
        assert!(max <= limit, "limit {limit}, saw {max}");
        assert!(max >= 1);
    }
}

#[tokio::test]
async fn cancellation_stops_new_work_and_rolls_back_unfinished_vms() {
    let c = cluster(2, None).await;
    for f in &c.faulty {
        f.inject(
            "attach_disk",
            0,
            Fault::Delay(Duration::from_millis(150)),
            100,
        );
    }
    let plan = plan_for(&c, 10, Algorithm::RoundRobin);
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.cancel();
    });
    let report = deploy(&plan, &c.targets, &fast_options(), Some(cancel), None).await;
    assert!(report.cancelled);
    assert_eq!(report.outcomes.len(), 10);
    let cancelled = report.cancelled_vms();
    assert!(cancelled >= 1);
    for o in report
        .outcomes
        .iter()
        .filter(|o| o.result == VmResult::Cancelled)
    {
        assert_eq!(o.state, State::Finished);
        assert!(o.history.iter().any(|(s, _)| *s == State::Finishing));
    }
    assert_eq!(report.created() + cancelled, 10);
    // Exactly the deployed VMs exist: the ones in progress were rolled back.
    assert_eq!(vm_count(&c).await, report.created());
}
