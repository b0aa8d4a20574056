//! Packet colouring against the real kernel, inside namespaces created for the test:
//! DSCP marks are set, POSTSNAPSHOT datagrams are dropped and counted, every call is
//! idempotent, and a user's own rules are never touched. Needs root; skips otherwise.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use unacloud_snapshot::colour::exec::{run_argv, CommandExecutor, NetnsExec};
use unacloud_snapshot::colour::iptables::Iptables;
use unacloud_snapshot::colour::netlink::NftNetlink;
use unacloud_snapshot::colour::nft::{parse_counter_packets, Nft, NftOneShot, NftSession};
use unacloud_snapshot::colour::{Colour, ColourBackend, ColourGuard, DscpConfig};
use unacloud_snapshot::netns::{self, NetnsLab};

fn lab() -> Option<NetnsLab> {
    if let Err(e) = netns::probe() {
        eprintln!("skipping: {e}");
        return None;
    }
    Some(NetnsLab::create(2).unwrap())
}

fn sh(ns: &str, script: &str) -> String {
    let argv: Vec<String> = ["ip", "netns", "exec", ns, "bash", "-c", script]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = run_argv(&argv, Duration::from_secs(10)).unwrap();
    assert!(out.success(), "{script}: {}", out.stderr);
    out.stdout
}

fn send_udp(from: &str, to: std::net::Ipv4Addr, n: usize) {
    sh(
        from,
        &format!("for i in $(seq {n}); do echo x > /dev/udp/{to}/9999; done"),
    );
    // Let the datagrams cross the bridge.
    std::thread::sleep(Duration::from_millis(50));
}

/// The user's own rules in the receiving namespace: a table counting PRE-marked
/// datagrams and an iptables accept rule.
fn add_user_rules(ns: &str) {
    sh(
        ns,
        "nft 'add table inet usertable; add counter inet usertable pre_seen; \
         add chain inet usertable watch { type filter hook input priority -300; policy accept; }; \
         add rule inet usertable watch ip dscp 0x10 counter name pre_seen'",
    );
    sh(ns, "iptables -w 5 -A INPUT -p udp --dport 9 -j ACCEPT");
}

fn user_rules_intact(ns: &str) -> u64 {
    sh(ns, "iptables -w 5 -C INPUT -p udp --dport 9 -j ACCEPT");
    let doc: serde_json::Value =
        serde_json::from_str(&sh(ns, "nft -j list counter inet usertable pre_seen")).unwrap();
    parse_counter_packets(&doc).unwrap()
}

fn exercise(
    make: &dyn Fn(&str) -> Box<dyn ColourBackend>,
    lab: &NetnsLab,
    rules_when_dropping: usize,
) {
    let (a_ns, b_ns) = (&lab.peers()[0], &lab.peers()[1]);
    add_user_rules(&b_ns.name);
    let mut a = ColourGuard::install(make(&a_ns.name)).unwrap();
    let mut b = ColourGuard::install(make(&b_ns.name)).unwrap();
    assert_eq!(b.backend().active_rules().unwrap(), 0);

    // Colour PRE: accepted, and seen as PRE by the user's counter.
    a.backend().set_outgoing(Some(Colour::Pre)).unwrap();
    b.backend().set_drop_post(true).unwrap();
    b.backend().set_drop_post(true).unwrap(); // idempotent
    assert_eq!(b.backend().active_rules().unwrap(), rules_when_dropping);
    send_udp(&a_ns.name, b_ns.addr, 2);
    assert_eq!(user_rules_intact(&b_ns.name), 2);
    assert_eq!(b.backend().post_packets_dropped().unwrap(), 0);

    // Switch to POST: dropped and counted by the kernel.
    a.backend().set_outgoing(Some(Colour::Post)).unwrap();
    a.backend().set_outgoing(Some(Colour::Post)).unwrap(); // idempotent
    send_udp(&a_ns.name, b_ns.addr, 3);
    assert_eq!(b.backend().post_packets_dropped().unwrap(), 3);

    // Accept POST again: nothing more dropped, the count survives.
    b.backend().set_drop_post(false).unwrap();
    send_udp(&a_ns.name, b_ns.addr, 2);
    assert_eq!(b.backend().post_packets_dropped().unwrap(), 3);
    a.backend().set_outgoing(None).unwrap();
    assert_eq!(a.backend().active_rules().unwrap(), 0);

    a.remove().unwrap();
    b.remove().unwrap();
    b.remove().unwrap(); // idempotent
    assert_eq!(a.backend().leftovers().unwrap(), 0);
    assert_eq!(b.backend().leftovers().unwrap(), 0);
    // The user's rules are untouched.
    assert_eq!(user_rules_intact(&b_ns.name), 2);
    sh(
        &b_ns.name,
        "nft delete table inet usertable; iptables -w 5 -D INPUT -p udp --dport 9 -j ACCEPT",
    );
}

#[test]
fn nft_session_marks_drops_counts_and_cleans_up() {
    let Some(lab) = lab() else { return };
    exercise(
        &|ns| {
            Box::new(Nft::new(
                NftSession::start(&NetnsExec::new(ns)).unwrap(),
                DscpConfig::default(),
            ))
        },
        &lab,
        2,
    );
}

#[test]
fn nft_commands_mark_drop_count_and_clean_up() {
    let Some(lab) = lab() else { return };
    exercise(
        &|ns| {
            Box::new(Nft::new(
                NftOneShot::new(Arc::new(NetnsExec::new(ns))),
                DscpConfig::default(),
            ))
        },
        &lab,
        2,
    );
}

#[test]
fn nft_netlink_marks_drops_counts_and_cleans_up() {
    let Some(lab) = lab() else { return };
    exercise(
        &|ns| Box::new(NftNetlink::open_in_netns(ns, DscpConfig::default()).unwrap()),
        &lab,
        2,
    );
}

/// The netlink backend builds the same table as the nft backend: `nft` itself reads the
/// rules back as the ones the nft backend writes.
#[test]
fn nft_netlink_rules_read_back_as_the_nft_backend_writes_them() {
    let Some(lab) = lab() else { return };
    let ns = lab.peers()[0].name.clone();
    let list = |ns: &str| sh(ns, "nft list table inet unacloud");
    let mut via_nft = Nft::new(
        NftOneShot::new(Arc::new(NetnsExec::new(&ns))),
        DscpConfig::default(),
    );
    via_nft.install().unwrap();
    via_nft.set_outgoing(Some(Colour::Post)).unwrap();
    via_nft.set_drop_post(true).unwrap();
    let expected = list(&ns);
    let expected_objects = via_nft.leftovers().unwrap();
    via_nft.remove().unwrap();

    let mut nl =
        ColourGuard::install(NftNetlink::open_in_netns(&ns, DscpConfig::default()).unwrap())
            .unwrap();
    nl.backend().set_outgoing(Some(Colour::Post)).unwrap();
    nl.backend().set_drop_post(true).unwrap();
    let got = list(&ns);
    assert_eq!(got, expected);
    assert!(got.contains("ip dscp set"), "{got}");
    assert!(got.contains("ip6 dscp set"), "{got}");
    assert_eq!(nl.backend().leftovers().unwrap(), expected_objects);
    assert_eq!(nl.backend().colouring_rules().unwrap(), 2);
    // Switching and clearing, idempotently.
    nl.backend().set_outgoing(Some(Colour::Pre)).unwrap();
    nl.backend().set_outgoing(Some(Colour::Pre)).unwrap();
    assert!(list(&ns).contains("ip dscp set cs2"), "{}", list(&ns));
    nl.backend().set_outgoing(None).unwrap();
    nl.backend().set_drop_post(false).unwrap();
    assert_eq!(nl.backend().active_rules().unwrap(), 0);
    // A leftover table of a crashed run is replaced by install.
    let mut again = NftNetlink::open_in_netns(&ns, DscpConfig::default()).unwrap();
    again.install().unwrap();
    assert_eq!(again.leftovers().unwrap(), 4);
    drop(nl);
    assert_eq!(via_nft.leftovers().unwrap(), 0);
    // Errors are typed and clear; the socket keeps working afterwards.
    let mut other = NftNetlink::open_in_netns(&ns, DscpConfig::default())
        .unwrap()
        .table("nosuch")
        .unwrap();
    assert_eq!(other.post_packets_dropped().unwrap(), 0);
    let e = other.set_drop_post(true).unwrap_err();
    assert!(e.to_string().contains("No such file or directory"), "{e}");
    assert_eq!(other.leftovers().unwrap(), 0);
    let e = NftNetlink::open_in_netns("unacloud-no-such-ns", DscpConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains("/run/netns/unacloud-no-such-ns"),
        "{e}"
    );
}

#[test]
fn iptables_marks_drops_counts_and_cleans_up() {
    let Some(lab) = lab() else { return };
    exercise(
        &|ns| {
            Box::new(Iptables::new(
                Arc::new(NetnsExec::new(ns)),
                DscpConfig::default(),
            ))
        },
        &lab,
        1,
    );
}

#[test]
fn guard_removes_rules_when_dropped_and_session_errors_are_reported() {
    let Some(lab) = lab() else { return };
    let ns = lab.peers()[0].name.clone();
    {
        let mut g = ColourGuard::install(Nft::new(
            NftSession::start(&NetnsExec::new(&ns)).unwrap(),
            DscpConfig::default(),
        ))
        .unwrap();
        g.backend().set_drop_post(true).unwrap();
        // An invalid command is a clear error and the session keeps working.
        let mut bad = Nft::new(
            NftSession::start(&NetnsExec::new(&ns)).unwrap(),
            DscpConfig::default(),
        )
        .table("nosuch")
        .unwrap();
        let e = bad.post_packets_dropped().unwrap_err();
        assert!(e.to_string().contains("No such file or directory"), "{e}");
        assert_eq!(bad.leftovers().unwrap(), 0);
        assert!(g.backend().leftovers().unwrap() > 0);
    }
    let mut check = Nft::new(
        NftOneShot::new(Arc::new(NetnsExec::new(&ns))),
        DscpConfig::default(),
    );
    assert_eq!(check.leftovers().unwrap(), 0);
}

#[test]
fn lab_cleans_leftovers_of_crashed_runs_only() {
    if let Err(e) = netns::probe() {
        eprintln!("skipping: {e}");
        return;
    }
    // A namespace of a "crashed" run (its pid does not exist) and one of a live run.
    let dead = format!("{}4194999-dead-p0", netns::FAMILY_PREFIX);
    let live = format!("{}{}-live-p0", netns::FAMILY_PREFIX, std::process::id());
    for n in [&dead, &live] {
        let argv: Vec<String> = ["ip", "netns", "add", n]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(run_argv(&argv, Duration::from_secs(5)).unwrap().success());
    }
    let deleted = netns::cleanup_stale().unwrap();
    let names = netns::list_namespaces().unwrap();
    assert!(deleted.contains(&dead), "{deleted:?}");
    assert!(!names.contains(&dead));
    assert!(names.contains(&live));
    let argv: Vec<String> = ["ip", "netns", "del", &live]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(run_argv(&argv, Duration::from_secs(5)).unwrap().success());
    // The lab deletes its namespaces when dropped.
    let lab = NetnsLab::create(2).unwrap();
    let prefix = lab.prefix().to_string();
    assert_eq!(lab.namespaces_left().unwrap(), 3);
    drop(lab);
    assert!(!netns::list_namespaces()
        .unwrap()
        .iter()
        .any(|n| n.starts_with(&prefix)));
    let _ = NetnsExec::new("x").place();
}
