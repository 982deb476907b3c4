//! The snapshot decoder: a snapshot's state file (or a checkpoint's state, which a standby decodes
//! before committing it) made of arbitrary bytes must be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::machine::VmSnapshot;

fuzz_target!(|data: &[u8]| {
    if let Ok(snapshot) = vmm::snapshot::decode::<VmSnapshot>(data) {
        // Whatever decodes must encode again.
        vmm::snapshot::encode(&snapshot).expect("a decoded snapshot encodes");
    }
});
