//! Placement invariants (property tests against a naive reference) and each algorithm's
//! distinctive behaviour (examples).
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use unacloud_core::model::{HardwareProfile, Host};
use unacloud_core::placement::{place, place_best_effort, Algorithm, Placement, VmRequest};
use unacloud_core::Error;

const TEMPLATES: [&str; 3] = ["ubuntu", "centos", "debian"];

fn host(id: &str, cores: u32, mem_gb: u64, disk: u64) -> Host {
    Host::new(id, cores, mem_gb * 1024, disk)
}

fn vm(name: &str, profile: HardwareProfile) -> VmRequest {
    VmRequest::new(name, "ubuntu", profile)
}

fn names(p: &Placement) -> Vec<(String, String)> {
    p.assignments
        .iter()
        .map(|a| (a.vm.clone(), a.host.to_string()))
        .collect()
}

/// `n` VMs of one profile, named `v0`, `v1`, ….
fn numbered_vms(n: usize, profile: HardwareProfile) -> Vec<VmRequest> {
    (0..n).map(|i| vm(&format!("v{i}"), profile)).collect()
}

/// The host of each assignment, in assignment order.
fn hosts_in_order(p: &Placement) -> Vec<String> {
    names(p).into_iter().map(|(_, h)| h).collect()
}

fn on(p: &Placement, vm: &str) -> String {
    p.host_of(vm).unwrap().to_string()
}

// ---------- generators ----------

fn arb_host(i: usize) -> impl Strategy<Value = Host> {
    (
        0u32..9,
        0u64..17,
        0u64..120,
        any::<bool>(),
        proptest::sample::subsequence(TEMPLATES.to_vec(), 0..=2),
    )
        .prop_map(move |(c, m, d, user, pre)| {
            let mut h = Host::new(format!("h{i}"), c, m * 512, d);
            h.user_logged_in = user;
            h.preloaded_templates = pre.into_iter().map(String::from).collect();
            h
        })
}

fn arb_hosts() -> impl Strategy<Value = Vec<Host>> {
    (1usize..10).prop_flat_map(|n| (0..n).map(arb_host).collect::<Vec<_>>())
}

fn arb_vms() -> impl Strategy<Value = Vec<VmRequest>> {
    (
        [0u64..60, 0u64..60, 0u64..60],
        proptest::collection::vec((0usize..4, 0usize..3, 0u64..30), 0..30),
    )
        .prop_map(|(sizes, specs)| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (p, t, d))| {
                    VmRequest::new(format!("vm{i}"), TEMPLATES[t], HardwareProfile::ALL[p])
                        .with_disk(d, sizes[t])
                })
                .collect()
        })
}

// ---------- naive reference (O(VMs × hosts)), written from the documented rules ----------

fn need(v: &VmRequest) -> (u32, u64, u64) {
    (v.profile.cores(), v.profile.memory_mb(), v.disk_bytes)
}

fn reference(hosts: &[Host], vms: &[VmRequest], alg: Algorithm) -> Vec<Option<usize>> {
    let n = hosts.len();
    let mut c: Vec<u32> = hosts.iter().map(|h| h.free_cores).collect();
    let mut m: Vec<u64> = hosts.iter().map(|h| h.free_memory_mb).collect();
    let mut d: Vec<u64> = hosts.iter().map(|h| h.free_disk_bytes).collect();
    let mut count = vec![0usize; n];
    let mut present: Vec<HashSet<String>> = hosts
        .iter()
        .map(|h| h.preloaded_templates.iter().cloned().collect())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    if alg == Algorithm::FirstFitDecreasing {
        order.sort_by_key(|&h| std::cmp::Reverse((c[h], m[h], d[h])));
    }
    let mut cursor = 0;
    let mut out = Vec::new();
    for v in vms {
        let (vc, vm_, vd) = need(v);
        let fits = |h: usize, disk: u64, c: &[u32], m: &[u64], d: &[u64]| {
            c[h] >= vc && m[h] >= vm_ && d[h] >= disk
        };
        let key = |h: usize, c: &[u32], m: &[u64], d: &[u64]| (c[h], m[h], d[h], h);
        let mut disk = vd;
        let pick = match alg {
            Algorithm::FirstFit | Algorithm::FirstFitDecreasing => {
                order.iter().copied().find(|&h| fits(h, vd, &c, &m, &d))
            }
            Algorithm::Singleton => (0..n).find(|&h| count[h] == 0 && fits(h, vd, &c, &m, &d)),
            Algorithm::RoundRobin => (cursor..n)
                .chain(0..cursor)
                .find(|&h| fits(h, vd, &c, &m, &d)),
            Algorithm::BestFit => (0..n)
                .filter(|&h| fits(h, vd, &c, &m, &d))
                .min_by_key(|&h| key(h, &c, &m, &d)),
            Algorithm::Sorting => (0..n)
                .filter(|&h| fits(h, vd, &c, &m, &d))
                .min_by_key(|&h| (!hosts[h].user_logged_in, key(h, &c, &m, &d))),
            Algorithm::DiskAware => {
                let with = (0..n)
                    .filter(|&h| present[h].contains(&v.template) && fits(h, vd, &c, &m, &d))
                    .min_by_key(|&h| key(h, &c, &m, &d));
                with.or_else(|| {
                    disk = vd + v.template_bytes;
                    (0..n)
                        .filter(|&h| fits(h, disk, &c, &m, &d))
                        .min_by_key(|&h| key(h, &c, &m, &d))
                })
            }
            Algorithm::Random => unreachable!("random has no reference"),
            _ => unreachable!("new algorithm"),
        };
        if let Some(h) = pick {
            c[h] -= vc;
            m[h] -= vm_;
            d[h] -= disk;
            count[h] += 1;
            present[h].insert(v.template.clone());
            cursor = (h + 1) % n;
        }
        out.push(pick);
    }
    out
}

/// Checks the invariants every plan must hold; returns a message on violation.
fn check_invariants(
    hosts: &[Host],
    vms: &[VmRequest],
    alg: Algorithm,
    p: &Placement,
) -> Result<(), TestCaseError> {
    let index: HashMap<&str, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.id.0.as_str(), i))
        .collect();
    // Every VM placed xor reported, in request order.
    let placed: Vec<&str> = p.assignments.iter().map(|a| a.vm.as_str()).collect();
    let unplaced: Vec<&str> = p.unplaced.iter().map(|u| u.vm.as_str()).collect();
    let mut seen: Vec<&str> = Vec::new();
    for v in vms {
        let a = placed.contains(&v.name.as_str());
        let u = unplaced.contains(&v.name.as_str());
        prop_assert!(a ^ u, "{} placed={a} unplaced={u}", v.name);
        if a {
            seen.push(v.name.as_str());
        }
    }
    prop_assert_eq!(&seen, &placed, "assignments not in request order");
    prop_assert_eq!(placed.len() + unplaced.len(), vms.len());
    prop_assert!(p.unplaced.iter().all(|u| !u.reason.is_empty()));

    // Usage per host never exceeds what was free, and `remaining` is exactly the rest.
    let by_name: HashMap<&str, &VmRequest> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let mut used = vec![(0u32, 0u64, 0u64, 0usize); hosts.len()];
    let mut templates_on: Vec<HashSet<&str>> = vec![HashSet::new(); hosts.len()];
    for a in &p.assignments {
        let h = index[a.host.0.as_str()];
        let v = by_name[a.vm.as_str()];
        used[h].0 += v.profile.cores();
        used[h].1 += v.profile.memory_mb();
        used[h].2 += v.disk_bytes;
        used[h].3 += 1;
        if !hosts[h].preloaded_templates.contains(&v.template)
            && templates_on[h].insert(v.template.as_str())
            && alg == Algorithm::DiskAware
        {
            used[h].2 += v.template_bytes;
        }
    }
    for (h, host) in hosts.iter().enumerate() {
        let (c, m, d, k) = used[h];
        prop_assert!(c <= host.free_cores, "{}: cores over-committed", host.id);
        prop_assert!(
            m <= host.free_memory_mb,
            "{}: memory over-committed",
            host.id
        );
        prop_assert!(
            d <= host.free_disk_bytes,
            "{}: disk over-committed",
            host.id
        );
        let r = &p.remaining[h];
        prop_assert_eq!(&r.id, &host.id);
        prop_assert_eq!(r.free_cores, host.free_cores - c);
        prop_assert_eq!(r.free_memory_mb, host.free_memory_mb - m);
        prop_assert_eq!(r.free_disk_bytes, host.free_disk_bytes - d);
        if alg == Algorithm::Singleton {
            prop_assert!(k <= 1, "singleton put {k} VMs on {}", host.id);
        }
        for t in &templates_on[h] {
            prop_assert!(r.preloaded_templates.iter().any(|x| x == t));
            prop_assert!(p
                .template_copies
                .iter()
                .any(|c| c.host == host.id && c.template == *t));
        }
    }
    prop_assert_eq!(
        p.template_copies.len(),
        templates_on.iter().map(HashSet::len).sum::<usize>()
    );

    // Greedy completeness: a VM is left out only if no host could take it at the end.
    for u in &p.unplaced {
        let v = by_name[u.vm.as_str()];
        for (h, r) in p.remaining.iter().enumerate() {
            let disk =
                if alg == Algorithm::DiskAware && !r.preloaded_templates.contains(&v.template) {
                    v.disk_bytes + v.template_bytes
                } else {
                    v.disk_bytes
                };
            let fits = r.free_cores >= v.profile.cores()
                && r.free_memory_mb >= v.profile.memory_mb()
                && r.free_disk_bytes >= disk
                && !(alg == Algorithm::Singleton && used[h].3 > 0);
            prop_assert!(!fits, "{} left out although {} fits it", v.name, r.id);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn every_algorithm_keeps_the_invariants(hosts in arb_hosts(), vms in arb_vms(), seed in any::<u64>()) {
        for alg in Algorithm::ALL {
            let p = place_best_effort(&hosts, &vms, alg, Some(seed)).unwrap();
            check_invariants(&hosts, &vms, alg, &p)?;
            // `place` fails exactly when something is unplaced, naming exactly those VMs.
            match place(&hosts, &vms, alg, Some(seed)) {
                Ok(full) => {
                    prop_assert!(p.unplaced.is_empty());
                    prop_assert_eq!(full, p);
                }
                Err(Error::Unplaceable { unplaced }) => prop_assert_eq!(unplaced, p.unplaced),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    #[test]
    fn deterministic_algorithms_match_the_naive_reference(hosts in arb_hosts(), vms in arb_vms()) {
        for alg in Algorithm::ALL.into_iter().filter(|a| *a != Algorithm::Random) {
            let p = place_best_effort(&hosts, &vms, alg, None).unwrap();
            let want = reference(&hosts, &vms, alg);
            let got: Vec<Option<usize>> = vms
                .iter()
                .map(|v| p.host_of(&v.name).map(|h| hosts.iter().position(|x| &x.id == h).unwrap()))
                .collect();
            prop_assert_eq!(got, want, "{}", alg);
            prop_assert_eq!(p.seed, None);
        }
    }

    #[test]
    fn same_seed_same_plan(hosts in arb_hosts(), vms in arb_vms(), seed in any::<u64>()) {
        for alg in Algorithm::ALL {
            let a = place_best_effort(&hosts, &vms, alg, Some(seed)).unwrap();
            let b = place_best_effort(&hosts, &vms, alg, Some(seed)).unwrap();
            prop_assert_eq!(a, b);
        }
        // Without a seed, Random reports the one it drew, and that seed replays the plan.
        let a = place_best_effort(&hosts, &vms, Algorithm::Random, None).unwrap();
        let replay = place_best_effort(&hosts, &vms, Algorithm::Random, a.seed).unwrap();
        prop_assert_eq!(a, replay);
    }
}

// ---------- examples: what distinguishes each algorithm ----------

fn three_hosts() -> Vec<Host> {
    vec![
        host("small", 2, 2, 100),
        host("big", 8, 16, 100),
        host("mid", 4, 8, 100),
    ]
}

#[test]
fn first_fit_fills_hosts_in_the_order_given() {
    let vms = numbered_vms(4, HardwareProfile::Small);
    let p = place(&three_hosts(), &vms, Algorithm::FirstFit, None).unwrap();
    let hosts = hosts_in_order(&p);
    assert_eq!(hosts, ["small", "small", "big", "big"]);
}

#[test]
fn first_fit_decreasing_starts_with_the_host_with_most_free() {
    let vms = numbered_vms(3, HardwareProfile::Medium);
    let p = place(&three_hosts(), &vms, Algorithm::FirstFitDecreasing, None).unwrap();
    // Sorted once (big 8, mid 4, small 2) and then first fit: big takes all three.
    assert!(names(&p).iter().all(|(_, h)| h == "big"));
    // The hosts are sorted once, not after every VM: big now has 2 cores left and mid 4,
    // yet the next VM still goes to big.
    let mut vms = vms;
    vms.push(vm("v3", HardwareProfile::Small));
    let p = place(&three_hosts(), &vms, Algorithm::FirstFitDecreasing, None).unwrap();
    assert_eq!(on(&p, "v3"), "big");
    // A fifth Medium VM no longer fits big and goes to the next host in that order.
    vms.push(vm("v4", HardwareProfile::Medium));
    let p = place(&three_hosts(), &vms, Algorithm::FirstFitDecreasing, None).unwrap();
    assert_eq!(on(&p, "v4"), "mid");
}

#[test]
fn best_fit_picks_the_tightest_host_and_re_sorts() {
    let vms = vec![
        vm("a", HardwareProfile::Medium), // small (2 cores) fits exactly
        vm("b", HardwareProfile::Medium), // small is full now: mid is the tightest
        vm("c", HardwareProfile::Large),  // mid has 2 left: big
        vm("d", HardwareProfile::Small),  // mid (2 cores left) is tighter than big (5)
    ];
    let p = place(&three_hosts(), &vms, Algorithm::BestFit, None).unwrap();
    assert_eq!(on(&p, "a"), "small");
    assert_eq!(on(&p, "b"), "mid");
    assert_eq!(on(&p, "c"), "big");
    assert_eq!(on(&p, "d"), "mid");
}

#[test]
fn sorting_prefers_hosts_with_a_user_logged_in() {
    let mut hosts = three_hosts();
    hosts[1].user_logged_in = true; // big
    let vms = vec![
        vm("a", HardwareProfile::Small),
        vm("b", HardwareProfile::ExtraLarge),
        vm("c", HardwareProfile::Large),
    ];
    let best = place(&hosts, &vms, Algorithm::BestFit, None).unwrap();
    assert_eq!(on(&best, "a"), "small");
    let sorting = place(&hosts, &vms, Algorithm::Sorting, None).unwrap();
    assert_eq!(on(&sorting, "a"), "big");
    assert_eq!(on(&sorting, "b"), "big");
    // big has 3 cores and 7 GiB left; "c" (3 cores, 4 GiB) still prefers it over mid.
    assert_eq!(on(&sorting, "c"), "big");
}

#[test]
fn singleton_puts_at_most_one_vm_per_host() {
    let vms = numbered_vms(4, HardwareProfile::Small);
    let p = place_best_effort(&three_hosts(), &vms, Algorithm::Singleton, None).unwrap();
    let hosts = hosts_in_order(&p);
    assert_eq!(hosts, ["small", "big", "mid"]);
    assert_eq!(p.unplaced.len(), 1);
    assert_eq!(p.unplaced[0].vm, "v3");
    assert!(
        p.unplaced[0].reason.contains("singleton"),
        "{}",
        p.unplaced[0].reason
    );
}

#[test]
fn round_robin_deals_vms_in_turn_and_wraps() {
    let vms = numbered_vms(5, HardwareProfile::Small);
    let p = place(&three_hosts(), &vms, Algorithm::RoundRobin, None).unwrap();
    let hosts = hosts_in_order(&p);
    assert_eq!(hosts, ["small", "big", "mid", "small", "big"]);
    // Hosts that are full are skipped, and the turn continues after the chosen one.
    let vms = numbered_vms(4, HardwareProfile::Large);
    let p = place_best_effort(&three_hosts(), &vms, Algorithm::RoundRobin, None).unwrap();
    let hosts = hosts_in_order(&p);
    assert_eq!(hosts, ["big", "mid", "big"]);
    assert_eq!(p.unplaced[0].vm, "v3");
}

#[test]
fn random_is_reproducible_and_seed_dependent() {
    let hosts: Vec<_> = (0..50)
        .map(|i| host(&format!("h{i}"), 8, 16, 100))
        .collect();
    let vms = numbered_vms(40, HardwareProfile::Small);
    let plans: Vec<_> = (0..5)
        .map(|s| place(&hosts, &vms, Algorithm::Random, Some(s)).unwrap())
        .collect();
    assert_eq!(
        plans[0],
        place(&hosts, &vms, Algorithm::Random, Some(0)).unwrap()
    );
    assert_eq!(plans[0].seed, Some(0));
    let distinct: HashSet<_> = plans.iter().map(names).collect();
    assert!(distinct.len() > 1, "five seeds gave the same plan");
    // Spreads: 40 VMs over 50 equal hosts do not all land on the first few.
    let used: HashSet<_> = plans[0].assignments.iter().map(|a| &a.host).collect();
    assert!(used.len() > 10, "{} hosts used", used.len());
}

#[test]
fn random_only_picks_hosts_that_fit() {
    // One host of 100 can take an ExtraLarge VM; rejection sampling misses it, the
    // fallback must still find it.
    let mut hosts: Vec<_> = (0..100)
        .map(|i| host(&format!("h{i}"), 1, 1, 100))
        .collect();
    hosts[77] = host("h77", 4, 8, 100);
    let vms = vec![vm("xl", HardwareProfile::ExtraLarge)];
    for seed in 0..20 {
        let p = place(&hosts, &vms, Algorithm::Random, Some(seed)).unwrap();
        assert_eq!(on(&p, "xl"), "h77");
    }
}

#[test]
fn disk_aware_counts_the_template_once_and_prefers_preloaded_hosts() {
    const GB: u64 = 1_000_000_000;
    let mut hosts = vec![
        host("no-room", 8, 16, 3 * GB), // cannot hold the 3.51 GB template
        host("empty", 8, 16, 5 * GB),   // can hold the template and ~5 diffs
        host("preloaded", 2, 4, GB),    // has the template
    ];
    hosts[2].preloaded_templates.push("ubuntu".into());
    let tpl = 3_510_000_000;
    let vms: Vec<_> = (0..6)
        .map(|i| vm(&format!("v{i}"), HardwareProfile::Small).with_disk(290_000_000, tpl))
        .collect();
    let p = place(&hosts, &vms, Algorithm::DiskAware, None).unwrap();
    // Two Small VMs fill the preloaded host's cores and need no copy.
    assert_eq!(on(&p, "v0"), "preloaded");
    assert_eq!(on(&p, "v1"), "preloaded");
    // The rest go where the template fits, copied once.
    for v in ["v2", "v3", "v4", "v5"] {
        assert_eq!(on(&p, v), "empty");
    }
    assert_eq!(p.template_copies.len(), 1);
    assert_eq!(p.template_copies[0].host.to_string(), "empty");
    assert_eq!(p.template_copies[0].bytes, tpl);
    assert_eq!(
        p.remaining[1].free_disk_bytes,
        5 * GB - tpl - 4 * 290_000_000
    );
    assert!(p.remaining[1]
        .preloaded_templates
        .contains(&"ubuntu".to_string()));

    // First Fit decides on cores and RAM (and the VM's own disk) only: it puts v0 on the
    // host that has no room for the template.
    let ff = place(&hosts, &vms, Algorithm::FirstFit, None).unwrap();
    assert_eq!(on(&ff, "v0"), "no-room");

    // The template-size reason shows up when nothing fits.
    let big: Vec<_> = vec![vm("big", HardwareProfile::Small).with_disk(GB, 6 * GB)];
    let err = place(&hosts[..2], &big, Algorithm::DiskAware, None).unwrap_err();
    let Error::Unplaceable { unplaced } = err else {
        panic!("wrong error")
    };
    assert!(
        unplaced[0].reason.contains("template"),
        "{}",
        unplaced[0].reason
    );
}

#[test]
fn bad_input_is_a_typed_error() {
    let vms = vec![vm("a", HardwareProfile::Small)];
    for alg in Algorithm::ALL {
        let e = place(&[], &vms, alg, None).unwrap_err();
        assert!(
            matches!(e, Error::InvalidInput(ref m) if m.contains("empty")),
            "{e}"
        );
    }
    let hosts = three_hosts();
    let cases: Vec<(Vec<Host>, Vec<VmRequest>, &str)> = vec![
        (
            hosts.clone(),
            vec![vm("", HardwareProfile::Small)],
            "empty name",
        ),
        (
            hosts.clone(),
            vec![
                vm("a", HardwareProfile::Small),
                vm("a", HardwareProfile::Small),
            ],
            "more than once",
        ),
        (vec![host("", 1, 1, 1)], vms.clone(), "empty id"),
        (
            vec![host("x", 1, 1, 1), host("x", 1, 1, 1)],
            vms.clone(),
            "more than once",
        ),
        (
            hosts.clone(),
            vec![VmRequest::new("a", "", HardwareProfile::Small)],
            "empty template",
        ),
        (
            hosts.clone(),
            vec![
                vm("a", HardwareProfile::Small).with_disk(0, 10),
                vm("b", HardwareProfile::Small).with_disk(0, 11),
            ],
            "same size",
        ),
        (
            hosts.clone(),
            vec![vm("a", HardwareProfile::Small).with_disk(u64::MAX, 1)],
            "2^64",
        ),
    ];
    for (h, v, want) in cases {
        let e = place(&h, &v, Algorithm::BestFit, None).unwrap_err();
        assert!(
            matches!(e, Error::InvalidInput(ref m) if m.contains(want)),
            "{e} !~ {want}"
        );
    }
    // No VMs is a valid, empty plan.
    let p = place(&hosts, &[], Algorithm::FirstFit, None).unwrap();
    assert!(p.assignments.is_empty());
    assert_eq!(p.remaining, hosts);
}

#[test]
fn unplaceable_lists_every_vm_with_a_reason() {
    let hosts = vec![host("pc", 2, 2, 100)];
    let vms = vec![
        vm("fits", HardwareProfile::Medium),
        vm("too-late", HardwareProfile::Small),
        vm("never", HardwareProfile::ExtraLarge),
    ];
    let e = place(&hosts, &vms, Algorithm::FirstFit, None).unwrap_err();
    let Error::Unplaceable { unplaced } = &e else {
        panic!("{e}")
    };
    let who: Vec<_> = unplaced.iter().map(|u| u.vm.as_str()).collect();
    assert_eq!(who, ["too-late", "never"]);
    assert!(
        unplaced[0].reason.contains("filled by earlier VMs"),
        "{}",
        unplaced[0].reason
    );
    assert!(
        unplaced[1].reason.contains("even before placement"),
        "{}",
        unplaced[1].reason
    );
    assert!(e
        .to_string()
        .starts_with("2 of the requested VMs could not be placed"));
}

#[test]
fn placement_serialises_for_other_languages() {
    let p = place(
        &three_hosts(),
        &[vm("a", HardwareProfile::Small)],
        Algorithm::BestFit,
        None,
    )
    .unwrap();
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["algorithm"], "best-fit");
    assert_eq!(json["assignments"][0]["vm"], "a");
    assert_eq!(json["assignments"][0]["host"], "small");
    let back: Placement = serde_json::from_value(json).unwrap();
    assert_eq!(back, p);
}
