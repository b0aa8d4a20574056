//! The nftables backend without any `nft` process: nf_tables messages sent straight to the
//! kernel over a `NETLINK_NETFILTER` socket owned by the calling process.
//!
//! It builds exactly the table [`super::nft::Nft`] builds (same names, same bytecode as
//! `nft` 1.0.6 generates for the same rules, so `nft list table inet unacloud` shows
//! `ip dscp set cs2` and `ip dscp 0x12 counter name "post_drop" drop`):
//!
//! ```text
//! table inet unacloud {
//!     counter post_drop { }
//!     chain colour_out { type filter hook output priority mangle; policy accept;
//!         ip dscp set 0x10; ip6 dscp set 0x10 }                     (colour PRE)
//!     chain filter_in { type filter hook input priority filter; policy accept;
//!         ip dscp 0x12 counter name post_drop drop
//!         ip6 dscp 0x12 counter name post_drop drop }               (drop POST)
//! }
//! ```
//!
//! With [`super::Scope::Interface`] it builds the forward-hook table of
//! [`super::nft::Nft::scope`] instead (`meta load iifname`/`oifname` compared with the
//! tap's name, padded to `IFNAMSIZ`, before each rule's own expressions).
//!
//! Every change is one nf_tables batch (a kernel transaction: all of it or nothing), so a
//! colour switch (flush the chain, add the two new rules) is atomic, as with `nft`.
//! A change costs one `sendmsg` and one `recvmsg` in the calling thread: no process to wake
//! and no rule text to parse, which is what matters when many hosts share few cores.
//!
//! The socket belongs to the network namespace it was created in.
//! [`NftNetlink::open_in_netns`] creates it on a short-lived thread that first enters the
//! namespace (`setns`), so the calling process and its other threads stay where they are.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

use super::exec::DEFAULT_COMMAND_TIMEOUT;
use super::nft::{check_table_name, DEFAULT_TABLE};
use super::{Colour, ColourBackend, DscpConfig, Scope};
use crate::net::{Error, Result};

// <linux/netlink.h>
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;

// <linux/netfilter/nfnetlink.h>
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

// <linux/netfilter/nf_tables.h>: messages
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
// attributes
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
/// `IFNAMSIZ`: interface names are compared as 16 zero-padded bytes.
const IFNAMSIZ: usize = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_PAYLOAD_SREG: u16 = 5;
const NFTA_PAYLOAD_CSUM_TYPE: u16 = 6;
const NFTA_PAYLOAD_CSUM_OFFSET: u16 = 7;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_CSUM_NONE: u32 = 0;
const NFT_PAYLOAD_CSUM_INET: u32 = 1;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_OBJREF_IMM_TYPE: u16 = 1;
const NFTA_OBJREF_IMM_NAME: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_IP_PRI_MANGLE: i32 = -150;
const NF_IP_PRI_FILTER: i32 = 0;

/// Name of the output chain (as in the `nft` backend).
const CHAIN_OUT: &str = "colour_out";
/// Name of the input chain.
const CHAIN_IN: &str = "filter_in";
/// Name of the drop counter.
const COUNTER: &str = "post_drop";

/// nf_tables message type.
fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// Builds netlink messages (and nested attributes) into one buffer.
#[derive(Debug, Default)]
struct MsgBuf {
    buf: Vec<u8>,
}

impl MsgBuf {
    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// One message: `nlmsghdr` + `nfgenmsg` + attributes written by `body`.
    fn msg(
        &mut self,
        ty: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
        body: impl FnOnce(&mut Self),
    ) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        body(self);
        self.pad();
        let len = u32::try_from(self.buf.len() - start).unwrap_or(u32::MAX);
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// One nf_tables message about family inet.
    fn nft_msg(&mut self, msg: u16, flags: u16, seq: u32, body: impl FnOnce(&mut Self)) {
        self.msg(nft_type(msg), flags, seq, NFPROTO_INET, 0, body);
    }

    /// The begin or end (`ty`) of a batch of nf_tables messages.
    fn batch_mark(&mut self, ty: u16, seq: u32) {
        self.msg(
            ty,
            NLM_F_REQUEST,
            seq,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(ty, &d);
    }

    fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nested(&mut self, ty: u16, body: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 2]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        body(self);
        self.pad();
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn data_value(&mut self, ty: u16, v: &[u8]) {
        self.nested(ty, |b| b.attr(NFTA_DATA_VALUE, v));
    }

    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Self)) {
        self.nested(NFTA_LIST_ELEM, |b| {
            b.str(NFTA_EXPR_NAME, name);
            b.nested(NFTA_EXPR_DATA, body);
        });
    }

    // ---- expressions, as `nft --debug=netlink` shows them ----

    /// `[ meta load nfproto => reg 1 ] [ cmp eq reg 1 <proto> ]`
    fn match_nfproto(&mut self, proto: u8) {
        self.expr("meta", |b| {
            b.u32(NFTA_META_DREG, NFT_REG_1);
            b.u32(NFTA_META_KEY, NFT_META_NFPROTO);
        });
        self.cmp_eq(&[proto]);
    }

    /// `[ meta load iifname|oifname => reg 1 ] [ cmp eq reg 1 <name, zero-padded> ]`
    fn match_ifname(&mut self, key: u32, name: &str) {
        self.expr("meta", |b| {
            b.u32(NFTA_META_DREG, NFT_REG_1);
            b.u32(NFTA_META_KEY, key);
        });
        let mut padded = [0u8; IFNAMSIZ];
        let n = name.len().min(IFNAMSIZ - 1);
        padded[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.cmp_eq(&padded);
    }

    /// The interface match of a scope (nothing for the host scope).
    fn match_scope(&mut self, scope: &Scope, key: u32) {
        if let Scope::Interface(name) = scope {
            self.match_ifname(key, name);
        }
    }

    fn cmp_eq(&mut self, v: &[u8]) {
        self.expr("cmp", |b| {
            b.u32(NFTA_CMP_SREG, NFT_REG_1);
            b.u32(NFTA_CMP_OP, NFT_CMP_EQ);
            b.data_value(NFTA_CMP_DATA, v);
        });
    }

    /// `[ payload load <len>b @ network header + <off> => reg 1 ]`
    fn load(&mut self, off: u32, len: u32) {
        self.expr("payload", |b| {
            b.u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
            b.u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
            b.u32(NFTA_PAYLOAD_OFFSET, off);
            b.u32(NFTA_PAYLOAD_LEN, len);
        });
    }

    /// `[ bitwise reg 1 = ( reg 1 & <mask> ) ^ <xor> ]`
    fn bitwise(&mut self, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |b| {
            b.u32(NFTA_BITWISE_SREG, NFT_REG_1);
            b.u32(NFTA_BITWISE_DREG, NFT_REG_1);
            b.u32(NFTA_BITWISE_LEN, u32::try_from(mask.len()).unwrap_or(0));
            b.data_value(NFTA_BITWISE_MASK, mask);
            b.data_value(NFTA_BITWISE_XOR, xor);
        });
    }

    /// `[ payload write reg 1 => 2b @ network header + 0 csum_type … ]`
    fn write_first_two_bytes(&mut self, ipv4_checksum: bool) {
        self.expr("payload", |b| {
            b.u32(NFTA_PAYLOAD_SREG, NFT_REG_1);
            b.u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
            b.u32(NFTA_PAYLOAD_OFFSET, 0);
            b.u32(NFTA_PAYLOAD_LEN, 2);
            if ipv4_checksum {
                b.u32(NFTA_PAYLOAD_CSUM_TYPE, NFT_PAYLOAD_CSUM_INET);
                b.u32(NFTA_PAYLOAD_CSUM_OFFSET, 10);
            } else {
                b.u32(NFTA_PAYLOAD_CSUM_TYPE, NFT_PAYLOAD_CSUM_NONE);
                b.u32(NFTA_PAYLOAD_CSUM_OFFSET, 0);
            }
        });
    }

    /// `[ objref type 1 name <counter> ] [ immediate reg 0 drop ]`
    fn count_and_drop(&mut self) {
        self.expr("objref", |b| {
            b.u32(NFTA_OBJREF_IMM_TYPE, NFT_OBJECT_COUNTER);
            b.str(NFTA_OBJREF_IMM_NAME, COUNTER);
        });
        self.expr("immediate", |b| {
            b.u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
            b.nested(NFTA_IMMEDIATE_DATA, |b| {
                b.nested(NFTA_DATA_VERDICT, |b| b.u32(NFTA_VERDICT_CODE, NF_DROP));
            });
        });
    }
}

/// The expressions of `ip dscp set <v>` (`ipv6 == false`) or `ip6 dscp set <v>` in an
/// `inet` table.
fn set_dscp_exprs(b: &mut MsgBuf, ipv6: bool, dscp: u8) {
    if ipv6 {
        // Traffic class = low nibble of byte 0 and high nibble of byte 1; DSCP = its top 6 bits.
        b.match_nfproto(NFPROTO_IPV6);
        b.load(0, 2);
        b.bitwise(&[0xf0, 0x3f], &[dscp >> 2, (dscp & 0x3) << 6]);
        b.write_first_two_bytes(false);
    } else {
        // TOS = byte 1; DSCP = its top 6 bits. Written as 16 bits so the checksum update is aligned.
        b.match_nfproto(NFPROTO_IPV4);
        b.load(0, 2);
        b.bitwise(&[0xff, 0x03], &[0x00, dscp << 2]);
        b.write_first_two_bytes(true);
    }
}

/// The expressions of `ip dscp <v> counter name post_drop drop` (or `ip6 …`).
fn drop_dscp_exprs(b: &mut MsgBuf, ipv6: bool, dscp: u8) {
    if ipv6 {
        b.match_nfproto(NFPROTO_IPV6);
        b.load(0, 2);
        b.bitwise(&[0x0f, 0xc0], &[0, 0]);
        b.cmp_eq(&[dscp >> 2, (dscp & 0x3) << 6]);
    } else {
        b.match_nfproto(NFPROTO_IPV4);
        b.load(1, 1);
        b.bitwise(&[0xfc], &[0]);
        b.cmp_eq(&[dscp << 2]);
    }
    b.count_and_drop();
}

/// One parsed netlink message of an answer.
#[derive(Debug)]
struct Answer<'a> {
    ty: u16,
    seq: u32,
    /// After `nlmsghdr`.
    payload: &'a [u8],
}

/// Splits a datagram into netlink messages (malformed tails are ignored).
fn split_messages(mut data: &[u8]) -> Vec<Answer<'_>> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        out.push(Answer {
            ty: u16::from_ne_bytes([data[4], data[5]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
            payload: &data[NLMSG_HDRLEN..len],
        });
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or(&[]);
    }
    out
}

/// The error code of an `NLMSG_ERROR` payload (0 = acknowledgement).
fn error_code(payload: &[u8]) -> Option<i32> {
    let b = payload.get(..4)?;
    Some(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Top-level attributes of an nf_tables message payload (after `nfgenmsg`), as
/// `(type, data)`.
fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((ty, &data[4..len]));
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or(&[]);
    }
    out
}

fn attr<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| *t == ty).map(|(_, d)| *d)
}

fn attr_str<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attr(attrs, ty).map(|d| d.strip_suffix(&[0]).unwrap_or(d))
}

/// The packets of a counter object (`NEWOBJ` answer payload, after `nlmsghdr`).
fn counter_packets(payload: &[u8]) -> Option<u64> {
    let top = attributes(payload.get(4..)?);
    let data = attributes(attr(&top, NFTA_OBJ_DATA)?);
    let p = attr(&data, NFTA_COUNTER_PACKETS)?;
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

/// A packet-colouring backend that speaks nf_tables netlink itself (no `nft` process).
///
/// ```no_run
/// use unacloud_snapshot::colour::netlink::NftNetlink;
/// use unacloud_snapshot::colour::{Colour, ColourBackend, ColourGuard, DscpConfig};
///
/// # fn main() -> Result<(), unacloud_snapshot::net::Error> {
/// // Needs CAP_NET_ADMIN in the namespace `lab-3` (which must exist).
/// let nl = NftNetlink::open_in_netns("lab-3", DscpConfig::default())?;
/// let mut guard = ColourGuard::install(nl)?; // table inet unacloud, empty
/// guard.backend().set_outgoing(Some(Colour::Pre))?;
/// guard.backend().set_drop_post(true)?;
/// println!("{} POST packets dropped", guard.backend().post_packets_dropped()?);
/// guard.remove()?; // also on drop
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct NftNetlink {
    sock: OwnedFd,
    place: String,
    table: String,
    scope: Scope,
    dscp: DscpConfig,
    seq: u32,
    outgoing: Option<Colour>,
    dropping: bool,
    timeout: Duration,
    buf: Vec<u8>,
}

impl NftNetlink {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn open_here(dscp: DscpConfig) -> Result<Self> {
        let sock = open_socket().map_err(|e| Error::Netlink {
            place: "host".to_string(),
            operation: "open socket".to_string(),
            reason: e.desc().to_string(),
        })?;
        Ok(Self::with_socket(sock, "host".to_string(), dscp))
    }

    /// Opens a netlink socket inside the named network namespace (`ip netns` name, bound
    /// at `/run/netns/<name>`). The socket is created on a dedicated thread that enters the
    /// namespace; the calling thread's namespace does not change.
    pub fn open_in_netns(name: &str, dscp: DscpConfig) -> Result<Self> {
        let place = format!("netns {name}");
        let fail = |operation: &str, reason: String| Error::Netlink {
            place: place.clone(),
            operation: operation.to_string(),
            reason,
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(fail(
                "open namespace",
                format!("{name:?} is not a namespace name"),
            ));
        }
        let path = std::path::Path::new("/run/netns").join(name);
        let ns = std::fs::File::open(&path)
            .map_err(|e| fail("open namespace", format!("{}: {e}", path.display())))?;
        let handle = std::thread::Builder::new()
            .name("netns-netlink".to_string())
            .spawn(move || -> std::result::Result<OwnedFd, String> {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns: {}", e.desc()))?;
                open_socket().map_err(|e| format!("socket: {}", e.desc()))
            })
            .map_err(|e| fail("open namespace", format!("cannot start a thread: {e}")))?;
        let sock = handle
            .join()
            .map_err(|_| {
                fail(
                    "open namespace",
                    "the namespace thread panicked".to_string(),
                )
            })?
            .map_err(|e| fail("open namespace", e))?;
        Ok(Self::with_socket(sock, place, dscp))
    }

    fn with_socket(sock: OwnedFd, place: String, dscp: DscpConfig) -> Self {
        Self {
            sock,
            place,
            table: DEFAULT_TABLE.to_string(),
            scope: Scope::Host,
            dscp,
            seq: 1,
            outgoing: None,
            dropping: false,
            timeout: DEFAULT_COMMAND_TIMEOUT,
            buf: vec![0; 256 * 1024],
        }
    }

    /// Uses table `inet <name>` (letters, digits, `_`; at most 32 characters; the same
    /// rule as [`super::nft::Nft::table`]).
    pub fn table(mut self, name: &str) -> Result<Self> {
        check_table_name(name)?;
        self.table = name.to_string();
        Ok(self)
    }

    /// Colours and filters the datagrams of `scope` (default [`Scope::Host`]); the table
    /// becomes the scope's own ([`Scope::nft_table`]) unless [`NftNetlink::table`] is
    /// called afterwards.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.table = scope.nft_table();
        self.scope = scope;
        self
    }

    /// Bounds the wait for each kernel answer (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn err(&self, operation: &str, reason: impl Into<String>) -> Error {
        Error::Netlink {
            place: self.place.clone(),
            operation: operation.to_string(),
            reason: reason.into(),
        }
    }

    /// Sends one transaction: batch begin, the messages `body` adds (each asks for an
    /// acknowledgement), batch end; waits for every acknowledgement.
    fn transaction(
        &mut self,
        operation: &str,
        body: impl FnOnce(&mut MsgBuf, &mut dyn FnMut() -> u32),
    ) -> Result<()> {
        let mut m = MsgBuf::default();
        m.batch_mark(NFNL_MSG_BATCH_BEGIN, self.next_seq());
        let mut seqs = Vec::new();
        {
            let mut seq = self.seq;
            let mut next = || {
                seq = seq.wrapping_add(1).max(1);
                seqs.push(seq);
                seq
            };
            body(&mut m, &mut next);
            if let Some(&last) = seqs.last() {
                self.seq = last;
            }
        }
        m.batch_mark(NFNL_MSG_BATCH_END, self.next_seq());
        self.send_all(operation, &m.buf)?;
        let deadline = Instant::now() + self.timeout;
        let mut pending: Vec<u32> = seqs;
        let mut errors: Vec<String> = Vec::new();
        while !pending.is_empty() {
            // After an error the kernel has queued every answer of the batch already.
            let wait = errors.is_empty();
            let n = match self.recv_one(operation, deadline, wait)? {
                Some(n) => n,
                None => break,
            };
            for a in split_messages(&self.buf[..n]) {
                if a.ty != NLMSG_ERROR || !pending.contains(&a.seq) {
                    continue; // stale answer of an earlier, timed-out request
                }
                pending.retain(|s| *s != a.seq);
                match error_code(a.payload) {
                    Some(0) => {}
                    Some(code) => errors.push(Errno::from_raw(-code).desc().to_string()),
                    None => errors.push("truncated error message".to_string()),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            errors.dedup();
            Err(self.err(operation, errors.join("; ")))
        }
    }

    /// Sends one request and collects the payloads of its answers (a single answer, or a
    /// dump until `NLMSG_DONE`). `Ok(None)` when the kernel answered ENOENT.
    fn request(
        &mut self,
        operation: &str,
        msg_type: u16,
        dump: bool,
        body: impl FnOnce(&mut MsgBuf),
    ) -> Result<Option<Vec<Vec<u8>>>> {
        let seq = self.next_seq();
        let mut m = MsgBuf::default();
        let flags = NLM_F_REQUEST | NLM_F_ACK | if dump { NLM_F_DUMP } else { 0 };
        m.nft_msg(msg_type, flags, seq, body);
        self.send_all(operation, &m.buf)?;
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        loop {
            let Some(n) = self.recv_one(operation, deadline, true)? else {
                return Err(self.err(operation, "no answer"));
            };
            let mut finished = false;
            let mut failure = None;
            for a in split_messages(&self.buf[..n]) {
                if a.seq != seq {
                    continue;
                }
                match a.ty {
                    NLMSG_ERROR => {
                        match error_code(a.payload) {
                            Some(0) => {}
                            Some(code) => failure = Some(-code),
                            None => failure = Some(Errno::EPROTO as i32),
                        }
                        finished = true;
                    }
                    NLMSG_DONE => finished = true,
                    _ => out.push(a.payload.to_vec()),
                }
            }
            if let Some(code) = failure {
                if code == Errno::ENOENT as i32 {
                    return Ok(None);
                }
                return Err(self.err(operation, Errno::from_raw(code).desc()));
            }
            if finished {
                return Ok(Some(out));
            }
        }
    }

    fn send_all(&self, operation: &str, data: &[u8]) -> Result<()> {
        loop {
            match send(self.sock.as_raw_fd(), data, MsgFlags::empty()) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(n) => {
                    return Err(self.err(operation, format!("sent {n} of {} bytes", data.len())))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(self.err(operation, format!("send: {}", e.desc()))),
            }
        }
    }

    /// Receives one datagram into `self.buf`, waiting until `deadline` (or not at all
    /// when `wait` is false: `Ok(None)` if nothing is queued).
    fn recv_one(
        &mut self,
        operation: &str,
        deadline: Instant,
        wait: bool,
    ) -> Result<Option<usize>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if wait && left.is_zero() {
                return Err(self.err(
                    operation,
                    format!("no answer from the kernel within {:?}", self.timeout),
                ));
            }
            let ms = if wait {
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            } else {
                0
            };
            let ready = {
                let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
                poll(
                    &mut fds,
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                )
            };
            match ready {
                Ok(0) if !wait => return Ok(None),
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(self.err(operation, format!("poll: {}", e.desc()))),
            }
            match recv(self.sock.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
                Err(Errno::ENOBUFS) => {
                    return Err(self.err(operation, "receive buffer overrun (answers lost)"))
                }
                Err(e) => return Err(self.err(operation, format!("recv: {}", e.desc()))),
            }
        }
    }

    /// Whether our table exists.
    fn table_exists(&mut self, operation: &str) -> Result<bool> {
        let t = self.table.clone();
        Ok(self
            .request(operation, NFT_MSG_GETTABLE, false, |b| {
                b.str(NFTA_TABLE_NAME, &t)
            })?
            .is_some())
    }

    /// Dumps `msg_type` objects of family inet and keeps those of our table whose
    /// `chain_attr` (if given) names `chain`. Returns how many.
    fn count_in_table(
        &mut self,
        operation: &str,
        msg_type: u16,
        table_attr: u16,
        chain: Option<(u16, &str)>,
    ) -> Result<usize> {
        let Some(answers) = self.request(operation, msg_type, true, |_| {})? else {
            return Ok(0);
        };
        let table = self.table.as_bytes();
        Ok(answers
            .iter()
            .filter(|p| {
                let a = attributes(p.get(4..).unwrap_or(&[]));
                attr_str(&a, table_attr) == Some(table)
                    && match chain {
                        None => true,
                        Some((ty, name)) => attr_str(&a, ty) == Some(name.as_bytes()),
                    }
            })
            .count())
    }

    fn add_rule(
        b: &mut MsgBuf,
        seq: u32,
        table: &str,
        chain: &str,
        exprs: impl FnOnce(&mut MsgBuf),
    ) {
        b.nft_msg(
            NFT_MSG_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
            seq,
            |b| {
                b.str(NFTA_RULE_TABLE, table);
                b.str(NFTA_RULE_CHAIN, chain);
                b.nested(NFTA_RULE_EXPRESSIONS, exprs);
            },
        );
    }

    fn flush_chain(b: &mut MsgBuf, seq: u32, table: &str, chain: &str) {
        b.nft_msg(NFT_MSG_DELRULE, NLM_F_REQUEST | NLM_F_ACK, seq, |b| {
            b.str(NFTA_RULE_TABLE, table);
            b.str(NFTA_RULE_CHAIN, chain);
        });
    }

    /// `add table` (creates ours if missing).
    fn add_table(b: &mut MsgBuf, seq: u32, table: &str) {
        b.nft_msg(
            NFT_MSG_NEWTABLE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            seq,
            |b| b.str(NFTA_TABLE_NAME, table),
        );
    }

    /// `add table; delete table` (removes ours, idempotent).
    fn remove_msgs(b: &mut MsgBuf, next: &mut dyn FnMut() -> u32, table: &str) {
        NftNetlink::add_table(b, next(), table);
        b.nft_msg(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, next(), |b| {
            b.str(NFTA_TABLE_NAME, table)
        });
    }
}

fn open_socket() -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

impl ColourBackend for NftNetlink {
    fn install(&mut self) -> Result<()> {
        let t = self.table.clone();
        let scope = self.scope.clone();
        self.transaction("install", |b, next| {
            NftNetlink::remove_msgs(b, next, &t);
            NftNetlink::add_table(b, next(), &t);
            b.nft_msg(
                NFT_MSG_NEWOBJ,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                next(),
                |b| {
                    b.str(NFTA_OBJ_TABLE, &t);
                    b.str(NFTA_OBJ_NAME, COUNTER);
                    b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
                    b.nested(NFTA_OBJ_DATA, |_| {});
                },
            );
            let (out_hook, in_hook) = match scope {
                Scope::Host => (NF_INET_LOCAL_OUT, NF_INET_LOCAL_IN),
                Scope::Interface(_) => (NF_INET_FORWARD, NF_INET_FORWARD),
            };
            for (chain, hook, prio) in [
                (CHAIN_OUT, out_hook, NF_IP_PRI_MANGLE),
                (CHAIN_IN, in_hook, NF_IP_PRI_FILTER),
            ] {
                b.nft_msg(
                    NFT_MSG_NEWCHAIN,
                    NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                    next(),
                    |b| {
                        b.str(NFTA_CHAIN_TABLE, &t);
                        b.str(NFTA_CHAIN_NAME, chain);
                        b.nested(NFTA_CHAIN_HOOK, |b| {
                            b.u32(NFTA_HOOK_HOOKNUM, hook);
                            b.attr(NFTA_HOOK_PRIORITY, &prio.to_be_bytes());
                        });
                        b.u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                        b.str(NFTA_CHAIN_TYPE, "filter");
                    },
                );
            }
        })?;
        self.outgoing = None;
        self.dropping = false;
        Ok(())
    }

    fn set_outgoing(&mut self, colour: Option<Colour>) -> Result<()> {
        if self.outgoing == colour {
            return Ok(());
        }
        let t = self.table.clone();
        let value = colour.map(|c| self.dscp.value(c));
        let scope = self.scope.clone();
        self.transaction("set colour", |b, next| {
            NftNetlink::flush_chain(b, next(), &t, CHAIN_OUT);
            if let Some(v) = value {
                for ipv6 in [false, true] {
                    NftNetlink::add_rule(b, next(), &t, CHAIN_OUT, |b| {
                        b.match_scope(&scope, NFT_META_IIFNAME);
                        set_dscp_exprs(b, ipv6, v)
                    });
                }
            }
        })?;
        self.outgoing = colour;
        Ok(())
    }

    fn set_drop_post(&mut self, drop: bool) -> Result<()> {
        if self.dropping == drop {
            return Ok(());
        }
        let t = self.table.clone();
        let post = self.dscp.post();
        let scope = self.scope.clone();
        self.transaction("set POST filter", |b, next| {
            NftNetlink::flush_chain(b, next(), &t, CHAIN_IN);
            if drop {
                for ipv6 in [false, true] {
                    NftNetlink::add_rule(b, next(), &t, CHAIN_IN, |b| {
                        b.match_scope(&scope, NFT_META_OIFNAME);
                        drop_dscp_exprs(b, ipv6, post)
                    });
                }
            }
        })?;
        self.dropping = drop;
        Ok(())
    }

    fn post_packets_dropped(&mut self) -> Result<u64> {
        let t = self.table.clone();
        let answers = self.request("read counter", NFT_MSG_GETOBJ, false, |b| {
            b.str(NFTA_OBJ_TABLE, &t);
            b.str(NFTA_OBJ_NAME, COUNTER);
            b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
        })?;
        Ok(answers
            .as_deref()
            .and_then(|a| a.iter().find_map(|p| counter_packets(p)))
            .unwrap_or(0))
    }

    fn leftovers(&mut self) -> Result<usize> {
        if !self.table_exists("count leftovers")? {
            return Ok(0);
        }
        let chains =
            self.count_in_table("count leftovers", NFT_MSG_GETCHAIN, NFTA_CHAIN_TABLE, None)?;
        let rules =
            self.count_in_table("count leftovers", NFT_MSG_GETRULE, NFTA_RULE_TABLE, None)?;
        let objs = self.count_in_table("count leftovers", NFT_MSG_GETOBJ, NFTA_OBJ_TABLE, None)?;
        Ok(1 + chains + rules + objs)
    }

    fn active_rules(&mut self) -> Result<usize> {
        self.count_in_table("count rules", NFT_MSG_GETRULE, NFTA_RULE_TABLE, None)
    }

    fn colouring_rules(&mut self) -> Result<usize> {
        self.count_in_table(
            "count rules",
            NFT_MSG_GETRULE,
            NFTA_RULE_TABLE,
            Some((NFTA_RULE_CHAIN, CHAIN_OUT)),
        )
    }

    fn remove(&mut self) -> Result<()> {
        let t = self.table.clone();
        self.transaction("remove", |b, next| NftNetlink::remove_msgs(b, next, &t))?;
        self.outgoing = None;
        self.dropping = false;
        Ok(())
    }

    fn place(&self) -> String {
        self.place.clone()
    }

    fn is_fast(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule_bytes(f: impl FnOnce(&mut MsgBuf)) -> Vec<u8> {
        let mut b = MsgBuf::default();
        f(&mut b);
        b.buf
    }

    /// Collects `(expression name, [(attribute, data)])` of a rule's expression list.
    /// An expression's name and its attributes.
    type Expr = (String, Vec<(u16, Vec<u8>)>);

    fn exprs(bytes: &[u8]) -> Vec<Expr> {
        attributes(bytes)
            .into_iter()
            .map(|(ty, elem)| {
                assert_eq!(ty, NFTA_LIST_ELEM);
                let a = attributes(elem);
                let name =
                    String::from_utf8(attr_str(&a, NFTA_EXPR_NAME).unwrap().to_vec()).unwrap();
                let data = attributes(attr(&a, NFTA_EXPR_DATA).unwrap())
                    .into_iter()
                    .map(|(t, d)| (t, d.to_vec()))
                    .collect();
                (name, data)
            })
            .collect()
    }

    fn value_of(nested: &[u8]) -> Vec<u8> {
        attr(&attributes(nested), NFTA_DATA_VALUE).unwrap().to_vec()
    }

    // The register contents `nft --debug=netlink` (nft 1.0.6) prints for
    // `ip dscp set 0x10`: `bitwise reg 1 = ( reg 1 & 0x000003ff ) ^ 0x00004000` and for
    // `ip6 dscp set 0x12`: `( reg 1 & 0x00003ff0 ) ^ 0x00008004` (little-endian words).
    #[test]
    fn set_dscp_matches_nft_bytecode() {
        let v4 = exprs(&rule_bytes(|b| set_dscp_exprs(b, false, 0x10)));
        let names: Vec<&str> = v4.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["meta", "cmp", "payload", "bitwise", "payload"]);
        let bitwise: std::collections::HashMap<u16, Vec<u8>> = v4[3].1.iter().cloned().collect();
        assert_eq!(
            value_of(&bitwise[&NFTA_BITWISE_MASK]),
            0x03ffu32.to_le_bytes()[..2]
        );
        assert_eq!(
            value_of(&bitwise[&NFTA_BITWISE_XOR]),
            0x4000u32.to_le_bytes()[..2]
        );
        let write: std::collections::HashMap<u16, Vec<u8>> = v4[4].1.iter().cloned().collect();
        assert_eq!(write[&NFTA_PAYLOAD_CSUM_TYPE], 1u32.to_be_bytes());
        assert_eq!(write[&NFTA_PAYLOAD_CSUM_OFFSET], 10u32.to_be_bytes());
        let cmp: std::collections::HashMap<u16, Vec<u8>> = v4[1].1.iter().cloned().collect();
        assert_eq!(value_of(&cmp[&NFTA_CMP_DATA]), [NFPROTO_IPV4]);

        let v6 = exprs(&rule_bytes(|b| set_dscp_exprs(b, true, 0x12)));
        let bitwise: std::collections::HashMap<u16, Vec<u8>> = v6[3].1.iter().cloned().collect();
        assert_eq!(
            value_of(&bitwise[&NFTA_BITWISE_MASK]),
            0x3ff0u32.to_le_bytes()[..2]
        );
        assert_eq!(
            value_of(&bitwise[&NFTA_BITWISE_XOR]),
            0x8004u32.to_le_bytes()[..2]
        );
    }

    // `ip dscp 0x12 … drop`: `payload load 1b @ network header + 1`, mask 0xfc,
    // `cmp eq reg 1 0x00000048`; ip6: mask 0x0000c00f, `cmp eq reg 1 0x00008004`.
    #[test]
    fn drop_post_matches_nft_bytecode() {
        let v4 = exprs(&rule_bytes(|b| drop_dscp_exprs(b, false, 0x12)));
        let names: Vec<&str> = v4.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "meta",
                "cmp",
                "payload",
                "bitwise",
                "cmp",
                "objref",
                "immediate"
            ]
        );
        let cmp: std::collections::HashMap<u16, Vec<u8>> = v4[4].1.iter().cloned().collect();
        assert_eq!(value_of(&cmp[&NFTA_CMP_DATA]), [0x48]);
        let v6 = exprs(&rule_bytes(|b| drop_dscp_exprs(b, true, 0x12)));
        let bitwise: std::collections::HashMap<u16, Vec<u8>> = v6[3].1.iter().cloned().collect();
        assert_eq!(
            value_of(&bitwise[&NFTA_BITWISE_MASK]),
            0xc00fu32.to_le_bytes()[..2]
        );
        let cmp: std::collections::HashMap<u16, Vec<u8>> = v6[4].1.iter().cloned().collect();
        assert_eq!(value_of(&cmp[&NFTA_CMP_DATA]), 0x8004u32.to_le_bytes()[..2]);
    }

    // `oifname "tap1"`: `meta load oifname => reg 1`, `cmp eq reg 1 0x31706174 0x0 0x0 0x0`.
    #[test]
    fn interface_match_precedes_the_rule() {
        let scope = Scope::interface("tap1").unwrap();
        let e = exprs(&rule_bytes(|b| {
            b.match_scope(&scope, NFT_META_OIFNAME);
            drop_dscp_exprs(b, false, 0x12)
        }));
        assert_eq!(e[0].0, "meta");
        let meta: std::collections::HashMap<u16, Vec<u8>> = e[0].1.iter().cloned().collect();
        assert_eq!(meta[&NFTA_META_KEY], NFT_META_OIFNAME.to_be_bytes());
        let cmp: std::collections::HashMap<u16, Vec<u8>> = e[1].1.iter().cloned().collect();
        let mut want = [0u8; 16];
        want[..4].copy_from_slice(b"tap1");
        assert_eq!(value_of(&cmp[&NFTA_CMP_DATA]), want);
        assert_eq!(e.len(), 9);
        // The host scope adds nothing.
        let host = exprs(&rule_bytes(|b| {
            b.match_scope(&Scope::Host, NFT_META_IIFNAME)
        }));
        assert!(host.is_empty());
    }

    #[test]
    fn messages_split_and_errors_decode() {
        let mut b = MsgBuf::default();
        b.msg(
            nft_type(NFT_MSG_GETTABLE),
            NLM_F_REQUEST,
            7,
            NFPROTO_INET,
            0,
            |b| b.str(NFTA_TABLE_NAME, "abc"),
        );
        b.msg(NLMSG_ERROR, 0, 8, 0, 0, |_| {});
        let msgs = split_messages(&b.buf);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].seq, 7);
        let a = attributes(&msgs[0].payload[4..]);
        assert_eq!(attr_str(&a, NFTA_TABLE_NAME), Some(&b"abc"[..]));
        assert_eq!(msgs[1].ty, NLMSG_ERROR);
        // A truncated buffer yields no half message.
        assert_eq!(split_messages(&b.buf[..b.buf.len() - 1]).len(), 1);
        assert!(split_messages(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(NftNetlink::open_in_netns("../etc", DscpConfig::default()).is_err());
        assert!(NftNetlink::open_in_netns("", DscpConfig::default()).is_err());
    }
}
