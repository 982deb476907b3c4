//! PCI configuration space as a hostile guest reaches it: the fuzzer's bytes are a script of port
//! accesses to `0xCF8..0xD00` (any offset, 1 to 4 bytes), CONFIG_ADDRESS selections, and ECAM
//! reads and writes (any offset, 1 to 8 bytes) against a root holding the q35 host bridge and an
//! endpoint with a 64-bit memory BAR, an I/O BAR and two capabilities. Nothing may panic; BARs stay
//! aligned to their size, identities stay put, reported reprogrammings match where the BARs are,
//! and the endpoint's state always restores into a freshly built one.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::pci::{
    PciAddress, PciBarKind, PciClassCode, PciConfigIo, PciConfiguration, PciDevice, PciEcam,
    PciIdentity, PciInterruptPin, PciRoot,
};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;

/// An endpoint with nothing but its configuration space.
struct Endpoint(PciConfiguration);

impl PciDevice for Endpoint {
    fn configuration(&self) -> &PciConfiguration {
        &self.0
    }
    fn configuration_mut(&mut self) -> &mut PciConfiguration {
        &mut self.0
    }
}

const ENDPOINT_DEVICE: u8 = 3;
const ENDPOINT_VENDOR_DEVICE_ID: u32 = 0x1041_1af4;

fn endpoint_configuration() -> PciConfiguration {
    let mut config = PciConfiguration::new(&PciIdentity {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision: 1,
        class_code: PciClassCode {
            class: 0x02,
            subclass: 0x00,
            prog_if: 0x00,
        },
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
    });
    config.set_interrupt_pin(PciInterruptPin::IntA);
    let mem64 = PciBarKind::Memory64 { prefetchable: true };
    config.add_bar(0, 0x4000, mem64).expect("mem64 BAR");
    config.add_bar(2, 0x40, PciBarKind::Io).expect("I/O BAR");
    // A virtio-pci-like vendor capability (read-only) and MSI-X (enable and mask bits writable).
    config
        .add_capability(0x09, &[16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .expect("vendor capability");
    config
        .add_capability_with_writable_mask(0x11, &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0], &{
            let mut mask = [0; 10];
            mask[1] = 0xc0;
            mask
        })
        .expect("MSI-X capability");
    config
}

/// Takes the next `N` bytes of the script, if there are that many.
fn take<const N: usize>(script: &mut &[u8]) -> Option<[u8; N]> {
    let (bytes, rest) = script.split_first_chunk::<N>()?;
    *script = rest;
    Some(*bytes)
}

/// Takes the next `len` bytes of the script (fewer at its end).
fn take_slice<'a>(script: &mut &'a [u8], len: usize) -> &'a [u8] {
    let (bytes, rest) = script.split_at(len.min(script.len()));
    *script = rest;
    bytes
}

fuzz_target!(|data: &[u8]| {
    let endpoint = Arc::new(Mutex::new(Endpoint(endpoint_configuration())));
    let endpoint_address = PciAddress::new(0, ENDPOINT_DEVICE, 0).expect("address");
    let mut root = PciRoot::new();
    root.add_device(endpoint_address, endpoint.clone())
        .expect("free address");
    let root = Arc::new(Mutex::new(root));
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciEcam::new(root.clone());

    let mut script = data;
    let mut buffer = [0u8; 8];
    while let Some([op]) = take::<1>(&mut script) {
        match op % 5 {
            // Port read or write: offset in bits 2:0, length - 1 in bits 4:3.
            kind @ (0 | 1) => {
                let Some([shape]) = take::<1>(&mut script) else {
                    break;
                };
                let offset = u64::from(shape & 7);
                let len = usize::from(shape >> 3 & 3) + 1;
                if kind == 0 {
                    io.read(offset, &mut buffer[..len]);
                } else {
                    io.write(offset, take_slice(&mut script, len));
                }
            }
            // ECAM read or write: length - 1 in bits 2:0, then a 32-bit offset; op bit 7 keeps
            // the offset on bus 0, where the functions are.
            kind @ (2 | 3) => {
                let (Some([shape]), Some(offset)) =
                    (take::<1>(&mut script), take::<4>(&mut script))
                else {
                    break;
                };
                let mut offset = u64::from(u32::from_le_bytes(offset));
                if op & 0x80 != 0 {
                    offset &= PciEcam::BYTES_PER_BUS - 1;
                }
                let len = usize::from(shape & 7) + 1;
                if kind == 2 {
                    ecam.read(offset, &mut buffer[..len]);
                } else {
                    ecam.write(offset, take_slice(&mut script, len));
                }
            }
            // Select a function and register on bus 0 through CONFIG_ADDRESS.
            _ => {
                let Some([device_function, register]) = take::<2>(&mut script) else {
                    break;
                };
                let address = 1 << 31 | u32::from(device_function) << 8 | u32::from(register);
                io.write(0, &address.to_le_bytes());
            }
        }
    }

    let mut id = [0u8; 4];
    ecam.read(u64::from(ENDPOINT_DEVICE) << 15, &mut id);
    assert_eq!(u32::from_le_bytes(id), ENDPOINT_VENDOR_DEVICE_ID);
    ecam.read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x29c0_8086);

    let reprogrammed = root.lock().unwrap().take_bar_reprogrammings();
    let endpoint = endpoint.lock().unwrap();
    let config = endpoint.configuration();
    for index in [0, 2] {
        let (bar, address) = (
            config.bar(index).unwrap(),
            config.bar_address(index).unwrap(),
        );
        assert_eq!(address % bar.size, 0, "BAR {index} at {address:#x}");
    }
    for (address, change) in reprogrammed {
        assert_eq!(address, endpoint_address, "only the endpoint has BARs");
        assert_ne!(change.old, change.new);
        assert_eq!(config.bar_address(change.index), Some(change.new));
    }
    let state = config.state();
    let mut fresh = endpoint_configuration();
    fresh
        .restore_state(&state)
        .expect("a state the guest made restores");
    assert_eq!(fresh.state(), state);
});
