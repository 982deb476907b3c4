//! The wire protocol's decoder: any bytes a peer (authenticated or not: plain TCP exists) can send
//! are read as frames and messages until the first error; nothing may panic or allocate beyond the
//! frame limit. Inputs whose first byte is odd are raw bytes (the framing itself is under test);
//! the others are well-formed frames around the fuzzer's payloads (the message decoder is).
#![no_main]

use ftvmm_fuzz::framed;
use libfuzzer_sys::fuzz_target;
use replication::wire::{read_frame, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let framed_stream;
    let mut stream = if mode & 1 == 1 {
        rest
    } else {
        framed_stream = framed(rest);
        &framed_stream[..]
    };
    while let Ok(message) = read_frame::<_, Message>(&mut stream) {
        // Whatever decodes must encode again.
        replication::wire::write_frame(&mut Vec::new(), &message)
            .expect("a decoded message encodes");
    }
});
