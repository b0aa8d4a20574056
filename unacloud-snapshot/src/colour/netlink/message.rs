//! Netlink messages: building requests (headers, attributes, nested attributes) into one
//! buffer, and splitting the kernel's answers into messages and attributes.

use super::abi::*;

/// Builds netlink messages (and nested attributes) into one buffer.
#[derive(Debug, Default)]
pub(super) struct MsgBuf {
    pub(super) buf: Vec<u8>,
}

impl MsgBuf {
    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// One message: `nlmsghdr` + `nfgenmsg` + attributes written by `body`.
    pub(super) fn msg(
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
    pub(super) fn nft_msg(&mut self, msg: u16, flags: u16, seq: u32, body: impl FnOnce(&mut Self)) {
        self.msg(nft_type(msg), flags, seq, NFPROTO_INET, 0, body);
    }

    /// The begin or end (`ty`) of a batch of nf_tables messages.
    pub(super) fn batch_mark(&mut self, ty: u16, seq: u32) {
        self.msg(
            ty,
            NLM_F_REQUEST,
            seq,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
    }

    pub(super) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub(super) fn str(&mut self, ty: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(ty, &d);
    }

    pub(super) fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    pub(super) fn nested(&mut self, ty: u16, body: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 2]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        body(self);
        self.pad();
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub(super) fn data_value(&mut self, ty: u16, v: &[u8]) {
        self.nested(ty, |b| b.attr(NFTA_DATA_VALUE, v));
    }

    pub(super) fn expr(&mut self, name: &str, body: impl FnOnce(&mut Self)) {
        self.nested(NFTA_LIST_ELEM, |b| {
            b.str(NFTA_EXPR_NAME, name);
            b.nested(NFTA_EXPR_DATA, body);
        });
    }
}

/// One parsed netlink message of an answer.
#[derive(Debug)]
pub(super) struct Answer<'a> {
    pub(super) ty: u16,
    pub(super) seq: u32,
    /// After `nlmsghdr`.
    pub(super) payload: &'a [u8],
}

/// Splits a datagram into netlink messages (malformed tails are ignored).
pub(super) fn split_messages(mut data: &[u8]) -> Vec<Answer<'_>> {
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
pub(super) fn error_code(payload: &[u8]) -> Option<i32> {
    let b = payload.get(..4)?;
    Some(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Top-level attributes of an nf_tables message payload (after `nfgenmsg`), as
/// `(type, data)`.
pub(super) fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
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

pub(super) fn attr<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| *t == ty).map(|(_, d)| *d)
}

pub(super) fn attr_str<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attr(attrs, ty).map(|d| d.strip_suffix(&[0]).unwrap_or(d))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
