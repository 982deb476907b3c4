//! The wire protocol's decoder: any bytes a peer (authenticated or not: plain TCP exists) can send
//! are read as frames and messages until the first error; nothing may panic or allocate beyond the
//! frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replication::wire::{read_frame, Message};

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    while read_frame::<_, Message>(&mut stream).is_ok() {}
});
