//! nf_tables rule building: the table's objects, its chains' rules as the expressions
//! `nft --debug=netlink` shows for them, and the counter's answer.

use super::abi::*;
use super::message::{attr, attributes, MsgBuf};
use crate::colour::Scope;

/// Name of the output chain (as in the `nft` backend).
pub(super) const CHAIN_OUT: &str = "colour_out";
/// Name of the input chain.
pub(super) const CHAIN_IN: &str = "filter_in";
/// Name of the drop counter.
pub(super) const COUNTER: &str = "post_drop";

/// Expressions, as `nft --debug=netlink` shows them.
impl MsgBuf {
    /// `[ meta load nfproto => reg 1 ] [ cmp eq reg 1 <proto> ]`
    pub(super) fn match_nfproto(&mut self, proto: u8) {
        self.expr("meta", |b| {
            b.u32(NFTA_META_DREG, NFT_REG_1);
            b.u32(NFTA_META_KEY, NFT_META_NFPROTO);
        });
        self.cmp_eq(&[proto]);
    }

    /// `[ meta load iifname|oifname => reg 1 ] [ cmp eq reg 1 <name, zero-padded> ]`
    pub(super) fn match_ifname(&mut self, key: u32, name: &str) {
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
    pub(super) fn match_scope(&mut self, scope: &Scope, key: u32) {
        if let Scope::Interface(name) = scope {
            self.match_ifname(key, name);
        }
    }

    pub(super) fn cmp_eq(&mut self, v: &[u8]) {
        self.expr("cmp", |b| {
            b.u32(NFTA_CMP_SREG, NFT_REG_1);
            b.u32(NFTA_CMP_OP, NFT_CMP_EQ);
            b.data_value(NFTA_CMP_DATA, v);
        });
    }

    /// `[ payload load <len>b @ network header + <off> => reg 1 ]`
    pub(super) fn load(&mut self, off: u32, len: u32) {
        self.expr("payload", |b| {
            b.u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
            b.u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
            b.u32(NFTA_PAYLOAD_OFFSET, off);
            b.u32(NFTA_PAYLOAD_LEN, len);
        });
    }

    /// `[ bitwise reg 1 = ( reg 1 & <mask> ) ^ <xor> ]`
    pub(super) fn bitwise(&mut self, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |b| {
            b.u32(NFTA_BITWISE_SREG, NFT_REG_1);
            b.u32(NFTA_BITWISE_DREG, NFT_REG_1);
            b.u32(NFTA_BITWISE_LEN, u32::try_from(mask.len()).unwrap_or(0));
            b.data_value(NFTA_BITWISE_MASK, mask);
            b.data_value(NFTA_BITWISE_XOR, xor);
        });
    }

    /// `[ payload write reg 1 => 2b @ network header + 0 csum_type … ]`
    pub(super) fn write_first_two_bytes(&mut self, ipv4_checksum: bool) {
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
    pub(super) fn count_and_drop(&mut self) {
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
pub(super) fn set_dscp_exprs(b: &mut MsgBuf, ipv6: bool, dscp: u8) {
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
pub(super) fn drop_dscp_exprs(b: &mut MsgBuf, ipv6: bool, dscp: u8) {
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

/// `add rule <table> <chain> <exprs>`, appended to the chain.
pub(super) fn add_rule(
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

/// `flush chain <table> <chain>` (every rule of the chain deleted).
pub(super) fn flush_chain(b: &mut MsgBuf, seq: u32, table: &str, chain: &str) {
    b.nft_msg(NFT_MSG_DELRULE, NLM_F_REQUEST | NLM_F_ACK, seq, |b| {
        b.str(NFTA_RULE_TABLE, table);
        b.str(NFTA_RULE_CHAIN, chain);
    });
}

/// `add table` (creates ours if missing).
pub(super) fn add_table(b: &mut MsgBuf, seq: u32, table: &str) {
    b.nft_msg(
        NFT_MSG_NEWTABLE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        seq,
        |b| b.str(NFTA_TABLE_NAME, table),
    );
}

/// `add table; delete table` (removes ours, idempotent).
pub(super) fn remove_msgs(b: &mut MsgBuf, next: &mut dyn FnMut() -> u32, table: &str) {
    add_table(b, next(), table);
    b.nft_msg(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, next(), |b| {
        b.str(NFTA_TABLE_NAME, table)
    });
}

/// The messages of `install`: our table removed if present and created again, with the
/// drop counter and the two base chains for `scope`, both empty.
pub(super) fn install_msgs(
    b: &mut MsgBuf,
    next: &mut dyn FnMut() -> u32,
    table: &str,
    scope: &Scope,
) {
    remove_msgs(b, next, table);
    add_table(b, next(), table);
    b.nft_msg(
        NFT_MSG_NEWOBJ,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        next(),
        |b| {
            b.str(NFTA_OBJ_TABLE, table);
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
                b.str(NFTA_CHAIN_TABLE, table);
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
}

/// The packets of a counter object (`NEWOBJ` answer payload, after `nlmsghdr`).
pub(super) fn counter_packets(payload: &[u8]) -> Option<u64> {
    let top = attributes(payload.get(4..)?);
    let data = attributes(attr(&top, NFTA_OBJ_DATA)?);
    let p = attr(&data, NFTA_COUNTER_PACKETS)?;
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::colour::netlink::message::attr_str;

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
}
