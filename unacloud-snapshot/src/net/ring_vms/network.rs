//! The lab's network: PC namespaces, VM taps on the lab bridge, and the rules left in a namespace.

use super::*;

pub(super) fn ip(args: &[&str]) -> Result<()> {
    let argv: Vec<String> = std::iter::once("ip")
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect();
    check(&argv, run_argv(&argv, IP_TIMEOUT)?).map(|_| ())
}

pub(super) fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-q",
        "-w",
        &format!("{key}={value}"),
    ])
}

pub(super) fn vm_addr(v: usize) -> Ipv4Addr {
    Ipv4Addr::new(VM_SUBNET[0], VM_SUBNET[1], VM_SUBNET[2], (v + 1) as u8)
}

pub(super) fn tap_name(v: usize) -> String {
    format!("uct{v}")
}

pub(super) fn vm_name(v: usize) -> String {
    format!("vm{v}")
}

/// One emulated PC: its namespace, lab address, root folder and hypervisor.
pub(super) struct Pc {
    pub(super) name: String,
    pub(super) ns: String,
    pub(super) addr: Ipv4Addr,
    pub(super) root: PathBuf,
    pub(super) template: PathBuf,
    /// `None` only while the PC is powered off.
    pub(super) hv: Option<Arc<QemuHypervisor>>,
}

impl Pc {
    pub(super) fn hv(&self) -> Result<&Arc<QemuHypervisor>> {
        self.hv.as_ref().ok_or_else(|| Error::Rcpbt {
            reason: format!("{} is powered off", self.name),
        })
    }
}

/// Routes a PC's VMs to the lab bridge.
pub(super) fn prepare_pc_network(ns: &str) -> Result<()> {
    sysctl(ns, "net.ipv4.ip_forward", "1")?;
    sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")?;
    sysctl(ns, "net.ipv4.conf.default.rp_filter", "0")?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{}.{}.{}.0/24", VM_SUBNET[0], VM_SUBNET[1], VM_SUBNET[2]),
        "via",
        &HUB_ADDR.to_string(),
    ])
}

/// The tap of VM `v` at a PC (persistent, so it and its route outlive a QEMU process),
/// and the hub's route to the VM through that PC.
pub(super) fn plug_vm(pc_ns: &str, pc_addr: Ipv4Addr, hub: &str, v: usize) -> Result<()> {
    let tap = tap_name(v);
    ip(&["-n", pc_ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
    ip(&["-n", pc_ns, "link", "set", &tap, "address", TAP_MAC])?;
    ip(&[
        "-n",
        pc_ns,
        "addr",
        "add",
        &format!("{VM_GATEWAY}/32"),
        "dev",
        &tap,
    ])?;
    ip(&["-n", pc_ns, "link", "set", &tap, "up"])?;
    sysctl(pc_ns, &format!("net.ipv4.conf.{tap}.proxy_arp"), "1")?;
    sysctl(pc_ns, &format!("net.ipv4.conf.{tap}.rp_filter"), "0")?;
    ip(&[
        "-n",
        pc_ns,
        "route",
        "add",
        &format!("{}/32", vm_addr(v)),
        "dev",
        &tap,
    ])?;
    ip(&[
        "-n",
        hub,
        "route",
        "replace",
        &format!("{}/32", vm_addr(v)),
        "via",
        &pc_addr.to_string(),
    ])
}

pub(super) fn tap_config(ns: &str, v: usize, mac: &str) -> NetConfig {
    NetConfig::Tap {
        netns: Some(ns.to_string()),
        ifname: tap_name(v),
        ip: Some(format!("{}/24", vm_addr(v))),
        gateway: Some(VM_GATEWAY.to_string()),
        mac: mac.to_string(),
    }
}

/// Our nf_tables tables and iptables chains left in a namespace.
pub(super) fn rules_in(ns: &str) -> usize {
    let argv: Vec<String> = ["ip", "netns", "exec", ns, "nft", "list", "tables"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tables = run_argv(&argv, IP_TIMEOUT)
        .map(|o| {
            o.stdout
                .lines()
                .filter(|l| l.contains(crate::colour::nft::DEFAULT_TABLE))
                .count()
        })
        .unwrap_or(0);
    let argv: Vec<String> = ["ip", "netns", "exec", ns, "iptables-save"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let chains = run_argv(&argv, IP_TIMEOUT)
        .map(|o| o.stdout.lines().filter(|l| l.starts_with(":UC-")).count())
        .unwrap_or(0);
    tables + chains
}
