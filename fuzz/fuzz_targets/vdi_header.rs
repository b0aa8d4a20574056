//! Fuzz the VDI header reader: any bytes give a header or a typed error, and a
//! header that parses survives an encode/parse round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unacloud_vbox::vdi::VdiHeader;

fuzz_target!(|data: &[u8]| {
    match VdiHeader::parse(data) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(h) => {
            let _ = h.min_file_len();
            let again = VdiHeader::parse(&h.encode()).expect("an encoded valid header parses");
            if h.comment.len() <= 255 {
                assert_eq!(again, h, "encode/parse round trip changed the header");
            } else {
                // A lossily decoded comment can grow past the field; the rest must match.
                let mut h2 = h.clone();
                h2.comment = again.comment.clone();
                assert_eq!(again, h2, "encode/parse round trip changed the header");
            }
        }
    }
});
