//! The socket session: a `NETLINK_NETFILTER` socket in a network namespace, nf_tables
//! transactions (batches) and requests with their answers, every wait bounded.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

use super::abi::*;
use super::message::{attr_str, attributes, error_code, split_messages, MsgBuf};
use crate::colour::exec::DEFAULT_COMMAND_TIMEOUT;
use crate::colour::nft::{check_table_name, DEFAULT_TABLE};
use crate::colour::{Colour, DscpConfig, Scope};
use crate::net::{Error, Result};

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
    pub(super) place: String,
    pub(super) table: String,
    pub(super) scope: Scope,
    pub(super) dscp: DscpConfig,
    seq: u32,
    pub(super) outgoing: Option<Colour>,
    pub(super) dropping: bool,
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
    /// rule as [`crate::colour::nft::Nft::table`]).
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
    pub(super) fn transaction(
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
    pub(super) fn request(
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
    pub(super) fn table_exists(&mut self, operation: &str) -> Result<bool> {
        let t = self.table.clone();
        Ok(self
            .request(operation, NFT_MSG_GETTABLE, false, |b| {
                b.str(NFTA_TABLE_NAME, &t)
            })?
            .is_some())
    }

    /// Dumps `msg_type` objects of family inet and keeps those of our table whose
    /// `chain_attr` (if given) names `chain`. Returns how many.
    pub(super) fn count_in_table(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused() {
        assert!(NftNetlink::open_in_netns("../etc", DscpConfig::default()).is_err());
        assert!(NftNetlink::open_in_netns("", DscpConfig::default()).is_err());
    }
}
