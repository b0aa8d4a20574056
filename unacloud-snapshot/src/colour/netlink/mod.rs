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
//!
//! The module is split by responsibility: `abi` (the kernel's constants), `message`
//! (building requests, splitting answers), `rules` (the table, its counter and chains,
//! and the rules' expressions) and `session` (the socket, transactions and requests); the
//! [`ColourBackend`] implementation here says what each colour operation sends.

mod abi;
mod message;
mod rules;
mod session;

use self::abi::*;
use super::{Colour, ColourBackend};
use crate::net::Result;

pub use self::session::NftNetlink;

impl ColourBackend for NftNetlink {
    fn install(&mut self) -> Result<()> {
        let (t, scope) = (self.table.clone(), self.scope.clone());
        self.transaction("install", |b, next| {
            rules::install_msgs(b, next, &t, &scope)
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
            rules::flush_chain(b, next(), &t, rules::CHAIN_OUT);
            if let Some(v) = value {
                for ipv6 in [false, true] {
                    rules::add_rule(b, next(), &t, rules::CHAIN_OUT, |b| {
                        b.match_scope(&scope, NFT_META_IIFNAME);
                        rules::set_dscp_exprs(b, ipv6, v)
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
            rules::flush_chain(b, next(), &t, rules::CHAIN_IN);
            if drop {
                for ipv6 in [false, true] {
                    rules::add_rule(b, next(), &t, rules::CHAIN_IN, |b| {
                        b.match_scope(&scope, NFT_META_OIFNAME);
                        rules::drop_dscp_exprs(b, ipv6, post)
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
            b.str(NFTA_OBJ_NAME, rules::COUNTER);
            b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
        })?;
        Ok(answers
            .as_deref()
            .and_then(|a| a.iter().find_map(|p| rules::counter_packets(p)))
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
            Some((NFTA_RULE_CHAIN, rules::CHAIN_OUT)),
        )
    }

    fn remove(&mut self) -> Result<()> {
        let t = self.table.clone();
        self.transaction("remove", |b, next| rules::remove_msgs(b, next, &t))?;
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
