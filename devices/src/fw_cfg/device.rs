//! The fw_cfg device on x86's I/O ports: the selector (0x510, 16 bits), the data byte (0x511) and
//! the DMA address (0x514, 64 bits big-endian; writing its low half starts a transfer, and reading
//! it gives "QEMU CFG", how firmware detects DMA). A transfer is described in guest memory by an
//! `FWCfgDmaAccess` (`control`, `length`, `address`, big-endian) and ends by writing `control` back:
//! 0, or the error bit.
//!
//! Everything here is guest-controlled: unknown selectors read as zeros, a read past an item's end
//! reads zeros, a transfer to memory the guest does not have or a write (fw_cfg is read-only here)
//! ends with the error bit, and a description the device cannot even read is left alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::items::FwCfgItems;
use crate::bus::BusDevice;
use crate::virtio::device_queues::GuestErrorLog;
use crate::virtio::GuestMemoryMmap;

/// First I/O port.
pub const PORT_BASE: u64 = 0x510;
/// Ports from [`PORT_BASE`]: selector, data, (two unused), DMA address.
pub const PORT_LEN: u64 = 0x0c;
const SELECTOR: u64 = 0;
const DATA: u64 = 1;
const DMA_HIGH: u64 = 4;
const DMA_LOW: u64 = 8;
/// What reading the DMA address register gives: "QEMU CFG".
pub const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

/// `control` bits of a DMA transfer.
mod control {
    pub const ERROR: u32 = 1;
    pub const READ: u32 = 2;
    pub const SKIP: u32 = 4;
    pub const SELECT: u32 = 8;
    pub const WRITE: u32 = 16;
}

/// Bytes of zeros written at a time when a read runs past an item's end.
const ZERO_CHUNK: usize = 4096;

/// The device's registers, for snapshots (its items are the VM's configuration, rebuilt on
/// restore).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    pub selector: u16,
    pub offset: u32,
    pub dma_address_high: u32,
}

/// The fw_cfg device.
pub struct FwCfg {
    selectors: BTreeMap<u16, Arc<[u8]>>,
    mem: GuestMemoryMmap,
    state: FwCfgState,
    errors: GuestErrorLog,
}

impl FwCfg {
    /// Serves `items`, transferring to and from `mem`.
    pub fn new(items: &FwCfgItems, mem: GuestMemoryMmap) -> Self {
        Self {
            selectors: items.selectors(),
            mem,
            state: FwCfgState::default(),
            errors: GuestErrorLog::new("fw_cfg"),
        }
    }

    /// The guest memory transfers go to and from.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The registers.
    pub fn state(&self) -> FwCfgState {
        self.state.clone()
    }

    /// Restores the registers.
    pub fn restore_state(&mut self, state: &FwCfgState) {
        self.state = state.clone();
    }

    fn select(&mut self, selector: u16) {
        self.state.selector = selector;
        self.state.offset = 0;
    }

    /// The selected item's bytes from the current offset (empty past its end or for an unknown
    /// selector).
    fn remaining(&self) -> &[u8] {
        self.selectors
            .get(&self.state.selector)
            .and_then(|d| d.get(self.state.offset as usize..))
            .unwrap_or(&[])
    }

    /// The next data byte (0 past the end), advancing the offset.
    fn next_byte(&mut self) -> u8 {
        let byte = self.remaining().first().copied();
        if byte.is_some() {
            self.state.offset += 1;
        }
        byte.unwrap_or(0)
    }

    /// Runs the transfer described at guest address `at`.
    fn dma(&mut self, at: u64) {
        let mut access = [0u8; 16];
        if self.mem.read_slice(&mut access, GuestAddress(at)).is_err() {
            self.errors.report(format!(
                "DMA description at {at:#x} is outside guest memory"
            ));
            return;
        }
        let word = |i: usize| u32::from_be_bytes(access[i..i + 4].try_into().unwrap_or_default());
        let ctl = word(0);
        let length = word(4);
        let address = u64::from_be_bytes(access[8..16].try_into().unwrap_or_default());
        if ctl & control::SELECT != 0 {
            self.select((ctl >> 16) as u16);
        }
        let ok = if ctl & control::READ != 0 {
            self.dma_read(address, length)
        } else if ctl & control::WRITE != 0 {
            self.errors
                .report("DMA write: fw_cfg items are read-only here");
            false
        } else if ctl & control::SKIP != 0 {
            let skip = (self.remaining().len() as u32).min(length);
            self.state.offset += skip;
            true
        } else {
            true
        };
        let result = if ok { 0 } else { control::ERROR };
        // The description was readable, so its first word is writable unless it is ROM.
        let _ = self
            .mem
            .write_slice(&result.to_be_bytes(), GuestAddress(at));
    }

    /// Copies `length` bytes of the selected item to `address` (zeros past its end); whether all
    /// of it landed in guest memory.
    fn dma_read(&mut self, address: u64, length: u32) -> bool {
        let take = (self.remaining().len() as u32).min(length);
        let Some(zeros_at) = address.checked_add(u64::from(take)) else {
            self.errors
                .report(format!("DMA read to {address:#x}+{length:#x} wraps"));
            return false;
        };
        let data = &self.remaining()[..take as usize];
        if self.mem.write_slice(data, GuestAddress(address)).is_err() {
            self.errors.report(format!(
                "DMA read to {address:#x}+{take:#x}: outside guest memory"
            ));
            return false;
        }
        self.state.offset += take;
        let mut left = u64::from(length - take);
        let mut at = zeros_at;
        let zeros = [0u8; ZERO_CHUNK];
        while left > 0 {
            let n = left.min(ZERO_CHUNK as u64) as usize;
            if self.mem.write_slice(&zeros[..n], GuestAddress(at)).is_err() {
                self.errors
                    .report(format!("DMA read to {at:#x}: outside guest memory"));
                return false;
            }
            at += n as u64;
            left -= n as u64;
        }
        true
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (DATA, _) => data.iter_mut().for_each(|b| *b = self.next_byte()),
            (DMA_HIGH, 8) => data.copy_from_slice(&DMA_SIGNATURE.to_be_bytes()),
            (DMA_HIGH, 4) => data.copy_from_slice(&DMA_SIGNATURE.to_be_bytes()[..4]),
            (DMA_LOW, 4) => data.copy_from_slice(&DMA_SIGNATURE.to_be_bytes()[4..]),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (SELECTOR, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_HIGH, 4) => {
                self.state.dma_address_high =
                    u32::from_be_bytes(data.try_into().unwrap_or_default())
            }
            (DMA_HIGH, 8) => {
                let address = u64::from_be_bytes(data.try_into().unwrap_or_default());
                self.state.dma_address_high = 0;
                self.dma(address);
            }
            (DMA_LOW, 4) => {
                let low = u32::from_be_bytes(data.try_into().unwrap_or_default());
                let address = u64::from(self.state.dma_address_high) << 32 | u64::from(low);
                self.state.dma_address_high = 0;
                self.dma(address);
            }
            _ => {
                self.errors.report(format!(
                    "{}-byte write at port {:#x} ignored",
                    data.len(),
                    PORT_BASE + offset
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fw_cfg::items::key;

    const MIB: usize = 1 << 20;

    fn device() -> FwCfg {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB)]).unwrap();
        let mut items = FwCfgItems::new();
        items
            .add_file("etc/e820", (0u8..40).collect::<Vec<_>>())
            .unwrap();
        items.add_file("bootorder", &b"HALT\0"[..]).unwrap();
        items
            .add_item(key::NB_CPUS, 2u16.to_le_bytes().to_vec())
            .unwrap();
        FwCfg::new(&items, mem)
    }

    fn select(d: &mut FwCfg, selector: u16) {
        d.write(SELECTOR, &selector.to_le_bytes());
    }

    fn read_data(d: &mut FwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                d.read(DATA, &mut b);
                b[0]
            })
            .collect()
    }

    /// Writes an FWCfgDmaAccess at `at` and starts it through the two 32-bit registers.
    fn dma(d: &mut FwCfg, at: u64, ctl: u32, length: u32, address: u64) -> u32 {
        let mut access = Vec::new();
        access.extend_from_slice(&ctl.to_be_bytes());
        access.extend_from_slice(&length.to_be_bytes());
        access.extend_from_slice(&address.to_be_bytes());
        d.mem.write_slice(&access, GuestAddress(at)).unwrap();
        d.write(DMA_HIGH, &((at >> 32) as u32).to_be_bytes());
        d.write(DMA_LOW, &(at as u32).to_be_bytes());
        d.mem
            .read_obj::<[u8; 4]>(GuestAddress(at))
            .map(u32::from_be_bytes)
            .unwrap()
    }

    #[test]
    fn the_signature_features_and_items_read_through_the_data_port() {
        let mut d = device();
        select(&mut d, key::SIGNATURE);
        assert_eq!(read_data(&mut d, 4), b"QEMU");
        select(&mut d, key::ID);
        assert_eq!(read_data(&mut d, 4), [3, 0, 0, 0]);
        select(&mut d, key::NB_CPUS);
        assert_eq!(read_data(&mut d, 3), [2, 0, 0], "past the end reads zeros");
        let mut sig = [0u8; 8];
        d.read(DMA_HIGH, &mut sig);
        assert_eq!(&sig, b"QEMU CFG");
    }

    #[test]
    fn unknown_selectors_and_odd_accesses_read_zeros_and_change_nothing() {
        let mut d = device();
        select(&mut d, 0x3fff);
        assert_eq!(read_data(&mut d, 4), [0; 4]);
        d.write(DATA, &[1, 2, 3]);
        d.write(SELECTOR, &[1]);
        d.write(0x20, &[1, 2, 3, 4]);
        let mut buf = [0xAAu8; 3];
        d.read(DMA_LOW, &mut buf);
        assert_eq!(buf, [0; 3]);
        assert_eq!(d.state().selector, 0x3fff);
    }

    #[test]
    fn dma_selects_skips_and_reads_a_file_then_zeros() {
        let mut d = device();
        // File 0x21 is etc/e820 (name order: bootorder, etc/e820).
        let ctl = (0x21 << 16) | control::SELECT | control::SKIP;
        assert_eq!(dma(&mut d, 0x1000, ctl, 8, 0), 0);
        assert_eq!(dma(&mut d, 0x1000, control::READ, 48, 0x2000), 0);
        let mut got = [0u8; 48];
        d.mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got[..32], &(8u8..40).collect::<Vec<_>>()[..]);
        assert_eq!(&got[32..], &[0; 16]);
        // The directory through DMA: two files.
        let ctl = (u32::from(key::FILE_DIR) << 16) | control::SELECT | control::READ;
        assert_eq!(dma(&mut d, 0x1000, ctl, 4, 0x3000), 0);
        assert_eq!(
            d.mem.read_obj::<[u8; 4]>(GuestAddress(0x3000)).unwrap(),
            [0, 0, 0, 2]
        );
    }

    #[test]
    fn bad_dma_addresses_and_writes_end_with_the_error_bit_not_a_panic() {
        let mut d = device();
        let read_e820 = (0x21 << 16) | control::SELECT | control::READ;
        // Destination outside guest memory, or wrapping.
        assert_eq!(
            dma(&mut d, 0x1000, read_e820, 40, 64 * MIB as u64),
            control::ERROR
        );
        assert_eq!(
            dma(&mut d, 0x1000, read_e820, 40, u64::MAX - 8),
            control::ERROR
        );
        // Zeros past the end running out of memory.
        assert_eq!(
            dma(&mut d, 0x1000, read_e820, u32::MAX, MIB as u64 - 64),
            control::ERROR
        );
        // Writes are refused.
        assert_eq!(
            dma(&mut d, 0x1000, control::WRITE, 4, 0x2000),
            control::ERROR
        );
        // A description outside memory is left alone.
        d.write(DMA_HIGH, &[0, 0, 0, 1]);
        d.write(DMA_LOW, &[0, 0, 0, 0]);
        d.write(DMA_HIGH, &(4 * MIB as u64).to_be_bytes());
    }

    #[test]
    fn registers_round_trip_through_their_state() {
        let mut d = device();
        select(&mut d, key::SIGNATURE);
        read_data(&mut d, 2);
        let state = d.state();
        let mut e = device();
        e.restore_state(&state);
        assert_eq!(read_data(&mut e, 2), b"MU");
    }
}
