//! Fuzz the protocol-v1 transport as a server meets it: arbitrary bytes are split into
//! frames and driven through the handshake (HELLO, AUTH) and an established session
//! (sequence numbers, MACs, envelope checks), keyed and unkeyed. Every path must end in
//! `Ok` or a typed error: no panic, and no frame larger than the decoder's limit is
//! ever buffered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unacloud_snapshot::net::frame::{
    ClientHandshake, ClusterKey, FrameDecoder, FrameKind, ServerHandshake, MAX_HANDSHAKE_LEN,
};
use unacloud_snapshot::protocol::{ClusterId, ParticipantId};

const CLUSTER: ClusterId = ClusterId(42);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let key = (mode & 1 == 1).then(|| ClusterKey::new(vec![7u8; 32]).expect("a valid key"));
    let mut buf = data;
    let mut dec = FrameDecoder::new(MAX_HANDSHAKE_LEN);
    let mut next = |dec: &FrameDecoder| -> Option<_> {
        match dec.decode(buf) {
            Ok(Some((f, used))) => {
                assert!(used <= 4 + MAX_HANDSHAKE_LEN.max(1 << 16));
                buf = &buf[used..];
                Some(f)
            }
            Ok(None) | Err(_) => None,
        }
    };
    // The client side meets a WELCOME from the same bytes when the mode says so.
    if mode & 2 == 2 {
        if let Some(w) = next(&dec) {
            let c = ClientHandshake::new(CLUSTER, key, ParticipantId(1), ParticipantId(0), [1; 32]);
            if let Ok((_, mut s)) = c.on_welcome(&w) {
                dec.set_keyed(s.is_keyed());
                dec.set_max_len(1 << 16);
                while let Some(f) = next(&dec) {
                    match s.open(f) {
                        Ok((FrameKind::Data, body)) => {
                            let _ = s.check_envelope(CLUSTER, &body);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        }
        return;
    }
    let Some(hello) = next(&dec) else { return };
    let server = ServerHandshake::new(CLUSTER, key, ParticipantId::COORDINATOR, [2; 32]);
    let Ok((pending, _welcome)) = server.on_hello(&hello, |id| {
        if id.0 < 16 {
            Ok(())
        } else {
            Err("not a participant".into())
        }
    }) else {
        return;
    };
    let Some(auth) = next(&dec) else { return };
    let Ok(mut session) = pending.on_auth(&auth) else {
        return;
    };
    dec.set_keyed(session.is_keyed());
    dec.set_max_len(1 << 16);
    while let Some(f) = next(&dec) {
        match session.open(f) {
            Ok((FrameKind::Data, body)) => {
                let _ = session.check_envelope(CLUSTER, &body);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
});
