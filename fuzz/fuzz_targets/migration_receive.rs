//! The migration destination's receive loop and `Machine::apply_state`, against a real KVM VM
//! (1 vCPU, 16 MiB, one virtio-blk disk), fed by a source the fuzzer plays. Inputs whose first byte
//! is even are well-formed frames around the fuzzer's payloads (pages anywhere, states of any
//! shape, messages out of order); odd ones are the VM's own state with the fuzzer's byte edits
//! (`offset: u16 LE | xor: u8` triples), followed by Go, so that `apply_state` meets nearly valid
//! vCPU, VM and device state. Nothing may panic, and pages outside guest memory are refused.
#![no_main]

use std::cell::RefCell;
use std::net::SocketAddr;

use devices::legacy::serial::SerialOutput;
use devices::virtio::block::BlockConfig;
use ftvmm_fuzz::{framed, scratch_path, ScriptedPeer};
use libfuzzer_sys::fuzz_target;
use replication::migration::receive_stream;
use replication::wire::{write_frame, Message};
use vmm::machine::{DiskDescription, MachineDescription};
use vmm::{Machine, RestoreOptions};

struct Destination {
    machine: Machine,
    /// The machine's own state as a source would send it.
    own_state: Vec<u8>,
}

thread_local! {
    // One VM for the whole run: building a KVM VM per input would be most of the time spent.
    static DESTINATION: RefCell<Option<Destination>> = const { RefCell::new(None) };
}

fn destination() -> Destination {
    let disk = scratch_path("migration-disk");
    std::fs::write(&disk, vec![0u8; 64 * 1024]).expect("disk image");
    let description = MachineDescription {
        vcpus: 1,
        memory_mib: vmm::memory::MIN_MEMORY_MIB,
        disks: vec![DiskDescription {
            path: disk.clone(),
            read_only: false,
        }],
        nets: vec![],
        hyperv: Default::default(),
        firmware: None,
        cpu_features: vec![],
    };
    let options = RestoreOptions {
        serial: Some(SerialOutput::Null),
        withheld_cpu: Default::default(),
        firmware: None,
        disks: Some(vec![BlockConfig {
            path: disk,
            read_only: false,
        }]),
        nets: Some(vec![]),
    };
    let machine = Machine::assemble_for_restore(&description, &options).expect("a KVM VM");
    let state = machine.capture_state().expect("the new VM's state");
    let own_state = vmm::snapshot::encode(&state).expect("state encodes");
    Destination { machine, own_state }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let source: SocketAddr = "192.0.2.1:7000".parse().unwrap();
    DESTINATION.with(|cell| {
        let mut cell = cell.borrow_mut();
        let d = cell.get_or_insert_with(destination);
        let stream = if mode & 1 == 0 {
            framed(rest)
        } else {
            let mut state = d.own_state.clone();
            for edit in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % state.len();
                state[at] ^= edit[2];
            }
            let mut stream = Vec::new();
            write_frame(&mut stream, &Message::State { snapshot: state }).expect("to a Vec");
            write_frame(&mut stream, &Message::Go).expect("to a Vec");
            stream
        };
        let _ = receive_stream(&mut ScriptedPeer(&stream), source, &mut d.machine);
    });
});
