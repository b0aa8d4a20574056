//! Packet colouring against the real kernel, inside namespaces created for the test:
//! DSCP marks are set, POSTSNAPSHOT datagrams are dropped and counted, every call is
//! idempotent, and a user's own rules are never touched; with an interface scope a VM's
//! tap is coloured and filtered on the forward path of a routing host, independently of
//! the host's other taps and of the host's own traffic. Needs root; skips otherwise.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::io::IoSliceMut;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use unacloud_snapshot::colour::exec::{run_argv, CommandExecutor, NetnsExec};
use unacloud_snapshot::colour::iptables::Iptables;
use unacloud_snapshot::colour::netlink::NftNetlink;
use unacloud_snapshot::colour::nft::{parse_counter_packets, Nft, NftOneShot, NftSession};
use unacloud_snapshot::colour::{Colour, ColourBackend, ColourGuard, DscpConfig, Scope};
use unacloud_snapshot::netns::{self, NetnsLab};

fn lab() -> Option<NetnsLab> {
    if let Err(e) = netns::probe() {
        skip::skipped(e);
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
        skip::skipped(e);
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
    // Other tests of this binary create labs (which clean up too) at the same time: the
    // dead run's namespace must be gone, whoever deleted it.
    let _ = netns::cleanup_stale().unwrap();
    let names = netns::list_namespaces().unwrap();
    assert!(!names.contains(&dead), "{names:?}");
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

// ---------------------------------------------------------------------------------------
// Interface scope: colouring a VM at its host, on the forward path of its tap.
//
// Topology (all namespaces of this run, deleted on drop):
//
//   vm7 (10.214.7.2) ── eth0 ═ uct7 (10.214.7.1) ┐
//                                                 PC (ip_forward=1) lab0 (10.214.0.1) ═ eth0 ── lab (10.214.0.2)
//   vm8 (10.214.8.2) ── eth0 ═ uct8 (10.214.8.1) ┘
//
// The backends run in PC, one per tap. DSCP is read at the receiver (IP_RECVTOS) and set
// by the sender (IP_TOS), on real UDP sockets created inside the namespaces.
// ---------------------------------------------------------------------------------------

/// `IP_TOS` and `IP_RECVTOS`, which nix only defines with its `net` feature.
mod ip_sockopt {
    use nix::{getsockopt_impl, libc, setsockopt_impl, sockopt_impl};
    sockopt_impl!(Tos, Both, libc::IPPROTO_IP, libc::IP_TOS, libc::c_int);
    sockopt_impl!(RecvTos, Both, libc::IPPROTO_IP, libc::IP_RECVTOS, bool);
}

const PORT: u16 = 9999;
/// Bound on waiting for a datagram that must arrive.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
const LAB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 2);
/// PC's own address on the lab side.
const PC_LAB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
/// PC's own address on tap `uct7`.
const PC_TAP7_ADDR: Ipv4Addr = Ipv4Addr::new(10, 214, 7, 1);
const VM7_ADDR: Ipv4Addr = Ipv4Addr::new(10, 214, 7, 2);
const VM8_ADDR: Ipv4Addr = Ipv4Addr::new(10, 214, 8, 2);
/// IP_TOS byte of a datagram whose DSCP is POST (0x12) / PRE (0x10).
const TOS_POST: i32 = 0x12 << 2;
const TOS_PRE: i32 = 0x10 << 2;

fn ip(args: &[&str]) {
    let argv: Vec<String> = std::iter::once("ip")
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect();
    let out = run_argv(&argv, Duration::from_secs(10)).unwrap();
    assert!(out.success(), "{}: {}", argv.join(" "), out.stderr);
}

/// Runs `f` on a thread that entered the namespace `ns` (sockets it creates stay there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// A host ("PC") routing between the taps of two VMs and a lab network.
#[derive(Debug)]
struct PcTopology {
    pc: String,
    vm7: String,
    vm8: String,
    lab: String,
    created: Vec<String>,
}

impl PcTopology {
    /// Builds the topology, or `None` (with a message) when namespaces cannot be made
    /// here. Under CI a root run that cannot make them fails instead of skipping.
    fn create() -> Option<Self> {
        if let Err(e) = netns::probe() {
            assert!(
                std::env::var_os("CI").is_none() || !nix::unistd::geteuid().is_root(),
                "CI runs as root but cannot create namespaces: {e}"
            );
            skip::skipped(e);
            return None;
        }
        netns::cleanup_stale().unwrap();
        let prefix = NetnsLab::fresh_prefix();
        let mut t = Self {
            pc: format!("{prefix}pc"),
            vm7: format!("{prefix}vm7"),
            vm8: format!("{prefix}vm8"),
            lab: format!("{prefix}lab"),
            created: Vec::new(),
        };
        // On a failure below, `t` is dropped and deletes what was created.
        for ns in [t.pc.clone(), t.vm7.clone(), t.vm8.clone(), t.lab.clone()] {
            ip(&["netns", "add", &ns]);
            t.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        sh(&t.pc, "sysctl -qw net.ipv4.ip_forward=1");
        let links = [
            (t.vm7.clone(), "uct7", "10.214.7"),
            (t.vm8.clone(), "uct8", "10.214.8"),
            (t.lab.clone(), "lab0", "10.214.0"),
        ];
        for (ns, pc_end, net) in &links {
            let pc = t.pc.as_str();
            ip(&[
                "-n", pc, "link", "add", pc_end, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ]);
            ip(&[
                "-n",
                pc,
                "addr",
                "add",
                &format!("{net}.1/24"),
                "dev",
                pc_end,
            ]);
            ip(&["-n", pc, "link", "set", pc_end, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &format!("{net}.1"),
            ]);
        }
        Some(t)
    }
}

impl Drop for PcTopology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            let argv: Vec<String> = ["ip", "netns", "del", &ns]
                .iter()
                .map(|s| s.to_string())
                .collect();
            match run_argv(&argv, Duration::from_secs(10)) {
                Ok(out) if out.success() => {}
                other => eprintln!("could not delete namespace {ns}: {other:?}"),
            }
        }
    }
}

/// A UDP socket on port [`PORT`] inside a namespace that reports each datagram's TOS.
#[derive(Debug)]
struct Receiver {
    ns: String,
    sock: UdpSocket,
}

impl Receiver {
    fn bind(ns: &str) -> Self {
        let sock = in_netns(ns, || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap();
            nix::sys::socket::setsockopt(&s, ip_sockopt::RecvTos, &true).unwrap();
            s.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
            s
        });
        Self {
            ns: ns.to_string(),
            sock,
        }
    }

    /// The next datagram (payload, DSCP), or `None` after [`RECV_TIMEOUT`].
    fn next(&self) -> Option<(String, u8)> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut buf = [0u8; 512];
        let mut cmsg = nix::cmsg_space!(nix::libc::c_int);
        let (n, tos) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return None,
                Err(e) => panic!("recvmsg in {}: {e}", self.ns),
            };
            let tos = msg.cmsgs().unwrap().find_map(|c| match c {
                ControlMessageOwned::Unknown(u)
                    if u.cmsg_header.cmsg_level == nix::libc::IPPROTO_IP
                        && u.cmsg_header.cmsg_type == nix::libc::IP_TOS =>
                {
                    u.data_bytes.first().copied()
                }
                _ => None,
            });
            (msg.bytes, tos)
        };
        let tos = tos.unwrap_or_else(|| panic!("no IP_TOS control message in {}", self.ns));
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), tos >> 2))
    }

    /// The DSCP of the next datagram, which must be `payload`.
    fn expect(&self, payload: &str) -> u8 {
        match self.next() {
            Some((p, dscp)) if p == payload => dscp,
            Some((p, _)) => panic!("{}: expected {payload:?}, got {p:?}", self.ns),
            None => panic!(
                "{}: {payload:?} did not arrive within {RECV_TIMEOUT:?}",
                self.ns
            ),
        }
    }

    /// Proves that `dropped` (sent just before `marker`, on the same path) never arrived:
    /// the next datagram is `marker`, and nothing follows it.
    fn expect_only_marker(&self, dropped: &str, marker: &str) {
        match self.next() {
            Some((p, _)) if p == marker => {}
            Some((p, _)) if p == dropped => panic!("{}: {dropped:?} was not dropped", self.ns),
            Some((p, _)) => panic!("{}: expected {marker:?}, got {p:?}", self.ns),
            None => panic!(
                "{}: {marker:?} did not arrive within {RECV_TIMEOUT:?}",
                self.ns
            ),
        }
    }
}

/// Sends one datagram from namespace `ns` with the given IP_TOS byte.
#[derive(Debug)]
struct Sender(UdpSocket);

impl Sender {
    fn new(ns: &str) -> Self {
        Self(in_netns(ns, || {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap()
        }))
    }

    fn send(&self, to: Ipv4Addr, tos: i32, payload: &str) {
        nix::sys::socket::setsockopt(&self.0, ip_sockopt::Tos, &tos).unwrap();
        self.0.send_to(payload.as_bytes(), (to, PORT)).unwrap();
    }
}

/// Proves the interface scope of one backend kind on the real kernel. `make(ns, scope)`
/// builds an uninstalled backend for namespace `ns`; `rules_per_colour` is how many rules
/// one colour (or one POST filter) takes.
fn exercise_interface_scope(
    make: &dyn Fn(&str, Scope) -> Box<dyn ColourBackend>,
    rules_per_colour: usize,
) {
    let Some(t) = PcTopology::create() else {
        return;
    };
    let (rx_lab, rx_pc, rx_vm7, rx_vm8) = (
        Receiver::bind(&t.lab),
        Receiver::bind(&t.pc),
        Receiver::bind(&t.vm7),
        Receiver::bind(&t.vm8),
    );
    let (from_lab, from_pc, from_vm7, from_vm8) = (
        Sender::new(&t.lab),
        Sender::new(&t.pc),
        Sender::new(&t.vm7),
        Sender::new(&t.vm8),
    );
    // The topology routes (and resolves its neighbours) before any rule exists.
    from_vm7.send(LAB_ADDR, 0, "warm vm7");
    assert_eq!(rx_lab.expect("warm vm7"), 0);
    from_vm8.send(LAB_ADDR, 0, "warm vm8");
    assert_eq!(rx_lab.expect("warm vm8"), 0);
    from_lab.send(VM7_ADDR, TOS_POST, "warm lab7");
    assert_eq!(rx_vm7.expect("warm lab7"), 0x12);
    from_lab.send(VM8_ADDR, TOS_POST, "warm lab8");
    assert_eq!(rx_vm8.expect("warm lab8"), 0x12);

    let scope7 = Scope::interface("uct7").unwrap();
    let scope8 = Scope::interface("uct8").unwrap();
    let mut b7 = ColourGuard::install(make(&t.pc, scope7)).unwrap();
    let mut b8 = ColourGuard::install(make(&t.pc, scope8)).unwrap();
    assert_eq!(b7.backend().active_rules().unwrap(), 0);
    assert_eq!(b8.backend().active_rules().unwrap(), 0);
    // Each tap has its own table or chains.
    let objects = b7.backend().leftovers().unwrap();
    assert!(objects > 0);
    assert_eq!(b8.backend().leftovers().unwrap(), objects);

    // 2. Datagrams forwarded from uct7 carry its colour; vm8's and PC's own do not.
    for (colour, want) in [
        (Some(Colour::Pre), 0x10),
        (Some(Colour::Post), 0x12),
        (None, 0),
    ] {
        b7.backend().set_outgoing(colour).unwrap();
        b7.backend().set_outgoing(colour).unwrap(); // idempotent
        let n = if colour.is_some() {
            rules_per_colour
        } else {
            0
        };
        assert_eq!(b7.backend().colouring_rules().unwrap(), n, "{colour:?}");
        let p = format!("vm7 {colour:?}");
        from_vm7.send(LAB_ADDR, 0, &p);
        assert_eq!(rx_lab.expect(&p), want, "{p}");
        let p = format!("vm8 while vm7 {colour:?}");
        from_vm8.send(LAB_ADDR, 0, &p);
        assert_eq!(rx_lab.expect(&p), 0, "{p}");
        let p = format!("pc while vm7 {colour:?}");
        from_pc.send(LAB_ADDR, 0, &p);
        assert_eq!(rx_lab.expect(&p), 0, "{p}");
        // PC's own datagram to the VM behind the tap is not coloured either.
        let p = format!("pc to vm7 while vm7 {colour:?}");
        from_pc.send(VM7_ADDR, 0, &p);
        assert_eq!(rx_vm7.expect(&p), 0, "{p}");
    }
    // A colour replaces whatever DSCP the guest set; no colour leaves it unchanged.
    from_vm7.send(LAB_ADDR, TOS_POST, "vm7 sets POST, uncoloured");
    assert_eq!(rx_lab.expect("vm7 sets POST, uncoloured"), 0x12);
    b7.backend().set_outgoing(Some(Colour::Pre)).unwrap();
    from_vm7.send(LAB_ADDR, TOS_POST, "vm7 sets POST, coloured PRE");
    assert_eq!(rx_lab.expect("vm7 sets POST, coloured PRE"), 0x10);

    // 4. The two taps switch colour independently.
    b8.backend().set_outgoing(Some(Colour::Post)).unwrap();
    from_vm7.send(LAB_ADDR, 0, "vm7 PRE, vm8 POST");
    assert_eq!(rx_lab.expect("vm7 PRE, vm8 POST"), 0x10);
    from_vm8.send(LAB_ADDR, 0, "vm8 POST, vm7 PRE");
    assert_eq!(rx_lab.expect("vm8 POST, vm7 PRE"), 0x12);
    assert_eq!(b7.backend().colouring_rules().unwrap(), rules_per_colour);
    assert_eq!(b8.backend().colouring_rules().unwrap(), rules_per_colour);

    // 3. POST datagrams forwarded to uct7 are dropped and counted; the rest pass.
    b7.backend().set_drop_post(true).unwrap();
    b7.backend().set_drop_post(true).unwrap(); // idempotent
    assert_eq!(b7.backend().active_rules().unwrap(), 2 * rules_per_colour);
    assert_eq!(b7.backend().post_packets_dropped().unwrap(), 0);
    from_lab.send(VM7_ADDR, TOS_POST, "lab POST to vm7");
    from_lab.send(VM7_ADDR, 0, "marker 1");
    rx_vm7.expect_only_marker("lab POST to vm7", "marker 1");
    assert_eq!(b7.backend().post_packets_dropped().unwrap(), 1);
    from_lab.send(VM7_ADDR, TOS_PRE, "lab PRE to vm7");
    assert_eq!(rx_vm7.expect("lab PRE to vm7"), 0x10);
    from_lab.send(VM7_ADDR, 0, "lab plain to vm7");
    assert_eq!(rx_vm7.expect("lab plain to vm7"), 0);
    // POST to PC's own addresses (input, not forwarded to the tap) passes.
    from_lab.send(PC_LAB_ADDR, TOS_POST, "lab POST to pc");
    assert_eq!(rx_pc.expect("lab POST to pc"), 0x12);
    from_lab.send(PC_TAP7_ADDR, TOS_POST, "lab POST to pc's tap address");
    assert_eq!(rx_pc.expect("lab POST to pc's tap address"), 0x12);
    // uct8 does not filter.
    from_lab.send(VM8_ADDR, TOS_POST, "lab POST to vm8");
    assert_eq!(rx_vm8.expect("lab POST to vm8"), 0x12);
    assert_eq!(b8.backend().post_packets_dropped().unwrap(), 0);
    // A POST-coloured VM of the same PC is filtered by the other tap too: vm8's datagram
    // is marked on entering from uct8 and dropped on leaving through uct7.
    from_vm8.send(VM7_ADDR, 0, "vm8 POST to vm7");
    from_lab.send(VM7_ADDR, 0, "marker 2");
    rx_vm7.expect_only_marker("vm8 POST to vm7", "marker 2");
    assert_eq!(b7.backend().post_packets_dropped().unwrap(), 2);
    // uct8 filters on its own, with its own counter.
    b8.backend().set_drop_post(true).unwrap();
    from_lab.send(VM8_ADDR, TOS_POST, "lab POST to vm8, dropping");
    from_lab.send(VM8_ADDR, 0, "marker 3");
    rx_vm8.expect_only_marker("lab POST to vm8, dropping", "marker 3");
    assert_eq!(b8.backend().post_packets_dropped().unwrap(), 1);
    assert_eq!(b7.backend().post_packets_dropped().unwrap(), 2);
    // Accepting POST again on uct7: it passes, the count survives.
    b7.backend().set_drop_post(false).unwrap();
    from_lab.send(VM7_ADDR, TOS_POST, "lab POST to vm7, accepting");
    assert_eq!(rx_vm7.expect("lab POST to vm7, accepting"), 0x12);
    assert_eq!(b7.backend().post_packets_dropped().unwrap(), 2);

    // 4/5. Removing uct7's rules leaves uct8's whole.
    b7.remove().unwrap();
    assert_eq!(b7.backend().leftovers().unwrap(), 0);
    assert_eq!(
        b8.backend().leftovers().unwrap(),
        objects + 2 * rules_per_colour
    );
    assert_eq!(b8.backend().active_rules().unwrap(), 2 * rules_per_colour);
    from_vm7.send(LAB_ADDR, 0, "vm7 after remove");
    assert_eq!(rx_lab.expect("vm7 after remove"), 0);
    from_vm8.send(LAB_ADDR, 0, "vm8 after vm7's remove");
    assert_eq!(rx_lab.expect("vm8 after vm7's remove"), 0x12);
    from_lab.send(VM8_ADDR, TOS_POST, "lab POST to vm8 after vm7's remove");
    from_lab.send(VM8_ADDR, 0, "marker 4");
    rx_vm8.expect_only_marker("lab POST to vm8 after vm7's remove", "marker 4");
    assert_eq!(b8.backend().post_packets_dropped().unwrap(), 2);
    b7.remove().unwrap(); // idempotent
    assert_eq!(b7.backend().leftovers().unwrap(), 0);

    // 5. Removing uct8's too leaves nothing of ours in PC, idempotently.
    b8.remove().unwrap();
    b8.remove().unwrap();
    assert_eq!(b8.backend().leftovers().unwrap(), 0);
    assert_eq!(b7.backend().leftovers().unwrap(), 0);
    let ruleset = sh(&t.pc, "nft list ruleset");
    assert!(
        !ruleset.contains("unacloud") && !ruleset.contains("UC-"),
        "{ruleset}"
    );
    from_lab.send(VM8_ADDR, TOS_POST, "lab POST to vm8 after removal");
    assert_eq!(rx_vm8.expect("lab POST to vm8 after removal"), 0x12);
    from_vm8.send(LAB_ADDR, 0, "vm8 after removal");
    assert_eq!(rx_lab.expect("vm8 after removal"), 0);
    // Nothing unexpected is still queued anywhere.
    for rx in [&rx_lab, &rx_pc, &rx_vm7, &rx_vm8] {
        rx.sock.set_nonblocking(true).unwrap();
        assert_eq!(rx.next(), None, "{}", rx.ns);
    }
}

#[test]
fn nft_netlink_colours_a_tap_on_the_forward_path() {
    exercise_interface_scope(
        &|ns, scope| {
            Box::new(
                NftNetlink::open_in_netns(ns, DscpConfig::default())
                    .unwrap()
                    .scope(scope),
            )
        },
        2,
    );
}

#[test]
fn nft_session_colours_a_tap_on_the_forward_path() {
    exercise_interface_scope(
        &|ns, scope| {
            Box::new(
                Nft::new(
                    NftSession::start(&NetnsExec::new(ns)).unwrap(),
                    DscpConfig::default(),
                )
                .scope(scope),
            )
        },
        2,
    );
}

#[test]
fn nft_commands_colour_a_tap_on_the_forward_path() {
    exercise_interface_scope(
        &|ns, scope| {
            Box::new(
                Nft::new(
                    NftOneShot::new(Arc::new(NetnsExec::new(ns))),
                    DscpConfig::default(),
                )
                .scope(scope),
            )
        },
        2,
    );
}

#[test]
fn iptables_colours_a_tap_on_the_forward_path() {
    exercise_interface_scope(
        &|ns, scope| {
            Box::new(
                Iptables::new(Arc::new(NetnsExec::new(ns)), DscpConfig::default()).scope(scope),
            )
        },
        1,
    );
}
