//! One PCI function's configuration space: a type 0 header, six BARs and a capability list.
//!
//! The space is 4 KiB (PCI Express); the first 256 bytes are the conventional space that the
//! `0xCF8`/`0xCFC` mechanism reaches. Next to the bytes sits a mask of the bits the guest may
//! write; a guest write changes only those, which is all it takes for the header to behave as on
//! hardware:
//!
//! - A BAR's writable bits are the address bits above its size, so writing all-ones and reading
//!   back gives the size mask with the read-only type bits (bit 0 for I/O, bits 2:1 = `0b10` for
//!   64-bit memory, bit 3 for prefetchable).
//! - The command register keeps only I/O space, memory space, bus master and interrupt disable;
//!   the status register is read-only (its write-1-to-clear bits are ignored).
//! - Capabilities are chained from `0x34` starting at `0x40`; after the two-byte header their
//!   bytes are read-only unless their owner declares some writable.
//!
//! Accesses are bytewise, at any offset and of any length; bytes past the end read as `0xFF` and
//! writes to them are ignored.
//!
//! **BAR reprogramming.** When a write changes the address a BAR decodes, the configuration
//! records a [`BarReprogrammed`] for it. Records are kept per BAR and merged (the first old
//! address, the latest new one; dropped when they are equal again, as after a sizing sequence),
//! so at most six wait, however long nobody drains them with
//! [`PciConfiguration::take_bar_reprogrammings`].

use serde::{Deserialize, Serialize};

use super::{PciIdentity, PciInterruptPin};

/// Size of a PCI Express function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional PCI part of it, where capabilities live.
pub const CONVENTIONAL_CONFIG_SIZE: usize = 256;
/// Number of BAR registers in a type 0 header.
pub const BAR_COUNT: usize = 6;

/// Command register bit: the function decodes its I/O BARs.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register bit: the function decodes its memory BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register bit: the function may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register bit: the function must not assert INTx.
pub const COMMAND_INTERRUPT_DISABLE: u16 = 1 << 10;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const BARS_END: usize = BAR0 + 4 * BAR_COUNT;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
const FIRST_CAPABILITY: usize = 0x40;

const STATUS_INTERRUPT: u16 = 1 << 3;
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;

const BAR_IO_SPACE: u32 = 1 << 0;
const BAR_MEMORY_64: u32 = 0b10 << 1;
const BAR_PREFETCHABLE: u32 = 1 << 3;
const BAR_IO_TYPE_BITS: u64 = 0x3;
const BAR_MEMORY_TYPE_BITS: u64 = 0xf;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarKind {
    /// I/O ports; 4 to 256 bytes.
    Io,
    /// Memory below 4 GiB; 16 bytes to 2 GiB.
    Memory32 { prefetchable: bool },
    /// Memory anywhere, taking this BAR register and the next one (the upper half); 16 bytes to
    /// 2^63 bytes.
    Memory64 { prefetchable: bool },
}

/// A BAR as its owner declared it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    pub kind: PciBarKind,
    /// Size in bytes, a power of two.
    pub size: u64,
}

/// A BAR whose address the guest changed, from `old` to `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogrammed {
    /// Index of the BAR (of its lower half for a 64-bit BAR).
    pub index: usize,
    pub old: u64,
    pub new: u64,
}

/// Errors from building a configuration space or restoring its state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigurationError {
    /// There is no BAR register with this index.
    #[error("BAR index {index} is out of range (a type 0 header has 6 BARs)")]
    BarIndexOutOfRange { index: usize },
    /// The size is not a power of two in the range the BAR kind allows.
    #[error("BAR {index}: size {size:#x} is not a power of two from {min:#x} to {max:#x}")]
    BarSize {
        index: usize,
        size: u64,
        min: u64,
        max: u64,
    },
    /// A 64-bit BAR needs a second register for its upper half, and BAR 5 is the last.
    #[error("BAR {index}: a 64-bit BAR needs two registers and {index} is the last")]
    Memory64InLastSlot { index: usize },
    /// The BAR register (or, for a 64-bit BAR, the next one) already belongs to a BAR.
    #[error("BAR {index}: the register is already in use")]
    BarInUse { index: usize },
    /// The capability does not fit in what is left of the conventional space.
    #[error("capability {id:#04x} with {len} body bytes does not fit at {offset:#x} (space ends at 0x100)")]
    CapabilitySpaceFull { id: u8, len: usize, offset: usize },
    /// The writable mask of a capability is not as long as its body.
    #[error(
        "capability {id:#04x}: writable mask has {mask_len} bytes but the body has {body_len}"
    )]
    CapabilityMaskLength {
        id: u8,
        body_len: usize,
        mask_len: usize,
    },
    /// A device-specific register outside 0x40..0x1000, or a mask not as long as its value.
    #[error("device register at {reg:#x} of {len} bytes: outside 0x40..0x1000 or its mask differs in length")]
    DeviceRegister { reg: usize, len: usize },
    /// The state has the wrong number of bytes.
    #[error("PCI configuration state has {len} bytes, expected {expected}")]
    StateLength { len: usize, expected: usize },
    /// The state disagrees with this configuration in bits nobody but the builder sets: it belongs
    /// to another device, or to another version of this one.
    #[error("PCI configuration state byte {offset:#x} has read-only bits {found:#04x} where this device has {expected:#04x}")]
    StateMismatch {
        offset: usize,
        expected: u8,
        found: u8,
    },
}

/// The bytes of a configuration space, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    /// All [`CONFIG_SPACE_SIZE`] bytes.
    pub bytes: Vec<u8>,
}

/// What a BAR register holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar(PciBar),
    /// The upper half of the 64-bit BAR in the register before.
    UpperHalf,
}

/// One function's configuration space. See the module documentation.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// The bits of each byte that guest writes change.
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [BarSlot; BAR_COUNT],
    /// Where the next capability goes.
    next_capability: usize,
    /// The byte that will point at the next capability (`0x34`, then the last one's next field).
    last_next_pointer: usize,
    /// Reprogrammings not yet drained, by BAR index.
    reprogrammed: [Option<BarReprogrammed>; BAR_COUNT],
}

impl PciConfiguration {
    /// A type 0 header for `identity`, with no BARs, capabilities or interrupt pin.
    pub fn new(identity: &PciIdentity) -> Self {
        let mut config = Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [BarSlot::Unused; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_next_pointer: CAPABILITIES_POINTER,
            reprogrammed: [None; BAR_COUNT],
        };
        config.set_u16(VENDOR_ID, identity.vendor_id);
        config.set_u16(DEVICE_ID, identity.device_id);
        config.bytes[REVISION_ID] = identity.revision;
        let class = identity.class_code;
        config.bytes[CLASS_CODE..CLASS_CODE + 3].copy_from_slice(&[
            class.prog_if,
            class.subclass,
            class.class,
        ]);
        config.set_u16(SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_ID, identity.subsystem_id);
        let command_mask = COMMAND_IO_SPACE
            | COMMAND_MEMORY_SPACE
            | COMMAND_BUS_MASTER
            | COMMAND_INTERRUPT_DISABLE;
        config.writable[COMMAND..COMMAND + 2].copy_from_slice(&command_mask.to_le_bytes());
        config.writable[CACHE_LINE_SIZE] = 0xff;
        config.writable[INTERRUPT_LINE] = 0xff;
        config
    }

    /// Sets the INTx pin the function uses (read-only to the guest).
    pub fn set_interrupt_pin(&mut self, pin: PciInterruptPin) {
        self.bytes[INTERRUPT_PIN] = pin as u8;
    }

    /// Marks function 0 of a device as having other functions, so that the guest looks for them.
    pub fn set_multi_function(&mut self, multi_function: bool) {
        if multi_function {
            self.bytes[HEADER_TYPE] |= HEADER_TYPE_MULTI_FUNCTION;
        } else {
            self.bytes[HEADER_TYPE] &= !HEADER_TYPE_MULTI_FUNCTION;
        }
    }

    /// Sets or clears the status register's interrupt status bit (an INTx is pending).
    pub fn set_interrupt_status(&mut self, pending: bool) {
        let status = self.u16_at(STATUS) & !STATUS_INTERRUPT;
        let bit = if pending { STATUS_INTERRUPT } else { 0 };
        self.set_u16(STATUS, status | bit);
    }

    /// The command register as the guest last wrote it.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Declares BAR `index` (of `size` bytes, a power of two) decoding `kind`.
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: PciBarKind,
    ) -> Result<(), PciConfigurationError> {
        if index >= BAR_COUNT {
            return Err(PciConfigurationError::BarIndexOutOfRange { index });
        }
        let (min, max) = match kind {
            PciBarKind::Io => (4, 256),
            PciBarKind::Memory32 { .. } => (16, 1 << 31),
            PciBarKind::Memory64 { .. } => (16, 1 << 63),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciConfigurationError::BarSize {
                index,
                size,
                min,
                max,
            });
        }
        let registers = if matches!(kind, PciBarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
        let Some(slots) = self.bars.get(index..index + registers) else {
            return Err(PciConfigurationError::Memory64InLastSlot { index });
        };
        if slots.iter().any(|slot| *slot != BarSlot::Unused) {
            return Err(PciConfigurationError::BarInUse { index });
        }
        let address_mask = !(size - 1);
        let (type_bits, low_mask) = match kind {
            PciBarKind::Io => (BAR_IO_SPACE, address_mask as u32 & !0x3),
            PciBarKind::Memory32 { prefetchable } => {
                (prefetchable_bit(prefetchable), address_mask as u32 & !0xf)
            }
            PciBarKind::Memory64 { prefetchable } => (
                BAR_MEMORY_64 | prefetchable_bit(prefetchable),
                address_mask as u32 & !0xf,
            ),
        };
        let offset = bar_offset(index);
        self.set_u32(offset, type_bits);
        self.writable[offset..offset + 4].copy_from_slice(&low_mask.to_le_bytes());
        if registers == 2 {
            let upper = bar_offset(index + 1);
            let upper_mask = (address_mask >> 32) as u32;
            self.writable[upper..upper + 4].copy_from_slice(&upper_mask.to_le_bytes());
            self.bars[index + 1] = BarSlot::UpperHalf;
        }
        self.bars[index] = BarSlot::Bar(PciBar { kind, size });
        Ok(())
    }

    /// BAR `index` as declared; `None` for an unused register or the upper half of a 64-bit BAR.
    pub fn bar(&self, index: usize) -> Option<PciBar> {
        match self.bars.get(index)? {
            BarSlot::Bar(bar) => Some(*bar),
            BarSlot::Unused | BarSlot::UpperHalf => None,
        }
    }

    /// The address BAR `index` is programmed with (both halves of a 64-bit BAR, type bits
    /// cleared); `None` where [`bar`](Self::bar) is `None`.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let low = u64::from(self.u32_at(bar_offset(index)));
        Some(match bar.kind {
            PciBarKind::Io => low & !BAR_IO_TYPE_BITS,
            PciBarKind::Memory32 { .. } => low & !BAR_MEMORY_TYPE_BITS,
            PciBarKind::Memory64 { .. } => {
                let high = u64::from(self.u32_at(bar_offset(index + 1)));
                (high << 32 | low) & !BAR_MEMORY_TYPE_BITS
            }
        })
    }

    /// Drains the BARs reprogrammed since the last call, by index (see the module documentation).
    pub fn take_bar_reprogrammings(&mut self) -> Vec<BarReprogrammed> {
        self.reprogrammed
            .iter_mut()
            .filter_map(Option::take)
            .collect()
    }

    /// Appends a capability whose body (the bytes after the ID and next pointer) is read-only;
    /// returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciConfigurationError> {
        self.insert_capability(id, body, None)
    }

    /// Appends a capability whose body bits set in `writable_mask` (as long as `body`) the guest
    /// may write; returns its offset.
    pub fn add_capability_with_writable_mask(
        &mut self,
        id: u8,
        body: &[u8],
        writable_mask: &[u8],
    ) -> Result<usize, PciConfigurationError> {
        if writable_mask.len() != body.len() {
            return Err(PciConfigurationError::CapabilityMaskLength {
                id,
                body_len: body.len(),
                mask_len: writable_mask.len(),
            });
        }
        self.insert_capability(id, body, Some(writable_mask))
    }

    fn insert_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable_mask: Option<&[u8]>,
    ) -> Result<usize, PciConfigurationError> {
        let offset = self.next_capability;
        let body_start = offset + 2;
        let end = body_start.saturating_add(body.len());
        if end > CONVENTIONAL_CONFIG_SIZE {
            return Err(PciConfigurationError::CapabilitySpaceFull {
                id,
                len: body.len(),
                offset,
            });
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[body_start..end].copy_from_slice(body);
        if let Some(mask) = writable_mask {
            self.writable[body_start..end].copy_from_slice(mask);
        }
        self.bytes[self.last_next_pointer] = offset as u8;
        self.last_next_pointer = offset + 1;
        self.next_capability = end.next_multiple_of(4);
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES_LIST;
        self.set_u16(STATUS, status);
        Ok(offset)
    }

    /// Makes a device-specific register of `value.len()` bytes at `reg` (at or after the standard
    /// header's end, 0x40) hold `value`, with the bits set in `writable_mask` (as long as `value`)
    /// writable by the guest: the chipset registers of a host or LPC bridge, say.
    pub fn set_device_register(
        &mut self,
        reg: usize,
        value: &[u8],
        writable_mask: &[u8],
    ) -> Result<(), PciConfigurationError> {
        let end = reg.saturating_add(value.len());
        if reg < FIRST_CAPABILITY || end > CONFIG_SPACE_SIZE || writable_mask.len() != value.len() {
            return Err(PciConfigurationError::DeviceRegister {
                reg,
                len: value.len(),
            });
        }
        self.bytes[reg..end].copy_from_slice(value);
        self.writable[reg..end].copy_from_slice(writable_mask);
        Ok(())
    }

    /// Reads `data.len()` bytes from offset `reg`; bytes past the end read as `0xFF`.
    pub fn read(&self, reg: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = reg
                .checked_add(i)
                .and_then(|at| self.bytes.get(at))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Writes `data` at offset `reg` as the guest would: only writable bits change, bytes past the
    /// end are ignored, and moved BARs are recorded.
    pub fn write(&mut self, reg: usize, data: &[u8]) {
        let touches_bars = reg < BARS_END && reg.saturating_add(data.len()) > BAR0;
        let before = touches_bars.then(|| self.bar_addresses());
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = reg.checked_add(i).filter(|&at| at < CONFIG_SPACE_SIZE) else {
                break;
            };
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
        if let Some(before) = before {
            self.record_reprogrammings(before);
        }
    }

    /// The bytes of the space.
    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Replaces the bytes with `state`, taken from a configuration built the same way: the bits
    /// only the builder sets (identity, BAR types, capability chain and bodies) must match. Moved
    /// BARs are recorded as if the guest had moved them.
    pub fn restore_state(
        &mut self,
        state: &PciConfigurationState,
    ) -> Result<(), PciConfigurationError> {
        let bytes: &[u8; CONFIG_SPACE_SIZE] =
            state
                .bytes
                .as_slice()
                .try_into()
                .map_err(|_| PciConfigurationError::StateLength {
                    len: state.bytes.len(),
                    expected: CONFIG_SPACE_SIZE,
                })?;
        for (offset, (&found, &current)) in bytes.iter().zip(self.bytes.iter()).enumerate() {
            let fixed = !self.writable[offset] & !device_owned_bits(offset);
            if (found ^ current) & fixed != 0 {
                return Err(PciConfigurationError::StateMismatch {
                    offset,
                    expected: current & fixed,
                    found: found & fixed,
                });
            }
        }
        let before = self.bar_addresses();
        self.bytes.copy_from_slice(bytes);
        self.record_reprogrammings(before);
        Ok(())
    }

    fn bar_addresses(&self) -> [Option<u64>; BAR_COUNT] {
        std::array::from_fn(|index| self.bar_address(index))
    }

    fn record_reprogrammings(&mut self, before: [Option<u64>; BAR_COUNT]) {
        for (index, old) in before.into_iter().enumerate() {
            let (Some(old), Some(new)) = (old, self.bar_address(index)) else {
                continue;
            };
            if old == new {
                continue;
            }
            let pending = &mut self.reprogrammed[index];
            let first_old = pending.map_or(old, |p| p.old);
            *pending = (first_old != new).then_some(BarReprogrammed {
                index,
                old: first_old,
                new,
            });
        }
    }

    fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(bytes)
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }
}

/// Offset of BAR register `index` (below [`BAR_COUNT`]).
fn bar_offset(index: usize) -> usize {
    BAR0 + 4 * index
}

fn prefetchable_bit(prefetchable: bool) -> u32 {
    if prefetchable {
        BAR_PREFETCHABLE
    } else {
        0
    }
}

/// Read-only bits the device itself changes at run time, which a state may therefore differ in.
fn device_owned_bits(offset: usize) -> u8 {
    if offset == STATUS {
        STATUS_INTERRUPT as u8
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciClassCode;
    use PciConfigurationError as E;

    const IDENTITY: PciIdentity = PciIdentity {
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
    };
    const MEM32: PciBarKind = PciBarKind::Memory32 {
        prefetchable: false,
    };
    const MEM32_PREFETCHABLE: PciBarKind = PciBarKind::Memory32 { prefetchable: true };
    const MEM64: PciBarKind = PciBarKind::Memory64 {
        prefetchable: false,
    };
    const MEM64_PREFETCHABLE: PciBarKind = PciBarKind::Memory64 { prefetchable: true };

    fn read_u32(config: &PciConfiguration, reg: usize) -> u32 {
        let mut data = [0; 4];
        config.read(reg, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_u32(config: &mut PciConfiguration, reg: usize, value: u32) {
        config.write(reg, &value.to_le_bytes());
    }

    /// Sizes BAR register `index` as a guest does: all-ones, read back, old value back.
    fn size_bar_register(config: &mut PciConfiguration, index: usize) -> u32 {
        let reg = bar_offset(index);
        let old = read_u32(config, reg);
        write_u32(config, reg, 0xffff_ffff);
        let sized = read_u32(config, reg);
        write_u32(config, reg, old);
        sized
    }

    fn with_bar(index: usize, size: u64, kind: PciBarKind) -> PciConfiguration {
        let mut config = PciConfiguration::new(&IDENTITY);
        config.add_bar(index, size, kind).unwrap();
        config
    }

    fn moved(index: usize, old: u64, new: u64) -> BarReprogrammed {
        BarReprogrammed { index, old, new }
    }

    #[test]
    fn identity_registers_are_in_place_and_read_only() {
        let mut config = PciConfiguration::new(&IDENTITY);
        config.write(0x00, &[0; 4]);
        config.write(0x08, &[0xff; 4]);
        assert_eq!(read_u32(&config, 0x00), 0x1041_1af4);
        assert_eq!(read_u32(&config, 0x08), 0x0200_0001);
        assert_eq!(read_u32(&config, 0x2c), 0x1100_1af4);
    }

    #[test]
    fn mem32_bar_sizing_reads_back_the_size_mask() {
        let mut config = with_bar(0, 0x1000, MEM32);
        assert_eq!(size_bar_register(&mut config, 0), 0xffff_f000);
        assert_eq!(read_u32(&config, bar_offset(0)), 0);
    }

    #[test]
    fn prefetchable_mem32_bar_sets_bit3() {
        let mut config = with_bar(1, 0x10, MEM32_PREFETCHABLE);
        assert_eq!(size_bar_register(&mut config, 1), 0xffff_fff8);
    }

    #[test]
    fn mem64_bar_sizing_covers_both_halves() {
        let mut config = with_bar(2, 0x4000, MEM64_PREFETCHABLE);
        assert_eq!(size_bar_register(&mut config, 2), 0xffff_c00c);
        assert_eq!(size_bar_register(&mut config, 3), 0xffff_ffff);
        assert_eq!(config.bar(3), None);
        let mut huge = with_bar(0, 1 << 33, MEM64);
        assert_eq!(size_bar_register(&mut huge, 0), 0x0000_0004);
        assert_eq!(size_bar_register(&mut huge, 1), 0xffff_fffe);
    }

    #[test]
    fn io_bar_sizing_sets_bit0() {
        let mut config = with_bar(5, 0x20, PciBarKind::Io);
        assert_eq!(size_bar_register(&mut config, 5), 0xffff_ffe1);
    }

    #[test]
    fn bad_bars_are_refused_with_their_index_and_size() {
        let mut config = PciConfiguration::new(&IDENTITY);
        let size_error = |index, size, (min, max)| {
            Err(E::BarSize {
                index,
                size,
                min,
                max,
            })
        };
        let memory32_range = (16, 1 << 31);
        assert_eq!(
            config.add_bar(6, 0x1000, MEM32),
            Err(E::BarIndexOutOfRange { index: 6 })
        );
        assert_eq!(
            config.add_bar(0, 0x1800, MEM32),
            size_error(0, 0x1800, memory32_range)
        );
        assert_eq!(
            config.add_bar(0, 8, MEM32),
            size_error(0, 8, memory32_range)
        );
        assert_eq!(
            config.add_bar(0, 1 << 32, MEM32),
            size_error(0, 1 << 32, memory32_range)
        );
        assert_eq!(
            config.add_bar(1, 2, PciBarKind::Io),
            size_error(1, 2, (4, 256))
        );
        assert_eq!(
            config.add_bar(1, 512, PciBarKind::Io),
            size_error(1, 512, (4, 256))
        );
        assert_eq!(
            config.add_bar(5, 0x1000, MEM64),
            Err(E::Memory64InLastSlot { index: 5 })
        );
        config.add_bar(1, 0x1000, MEM64).unwrap();
        assert_eq!(
            config.add_bar(2, 0x1000, MEM32),
            Err(E::BarInUse { index: 2 })
        );
        assert_eq!(
            config.add_bar(0, 0x1000, MEM64),
            Err(E::BarInUse { index: 0 })
        );
    }

    #[test]
    fn reprogrammed_bars_read_back_and_are_reported() {
        let mut config = with_bar(0, 0x4000, MEM64_PREFETCHABLE);
        config.add_bar(2, 0x40, PciBarKind::Io).unwrap();
        assert_eq!(config.bar_address(0), Some(0));
        write_u32(&mut config, bar_offset(0), 0xfeb0_4321);
        write_u32(&mut config, bar_offset(1), 0x0000_0080);
        config.write(bar_offset(2), &[0x47, 0xc0]);
        assert_eq!(config.bar_address(0), Some(0x80_feb0_4000));
        assert_eq!(config.bar_address(1), None);
        assert_eq!(config.bar_address(2), Some(0xc040));
        let expected = vec![moved(0, 0, 0x80_feb0_4000), moved(2, 0, 0xc040)];
        assert_eq!(config.take_bar_reprogrammings(), expected);
        assert!(config.take_bar_reprogrammings().is_empty());

        // A sizing sequence leaves the BAR where it was: nothing to report.
        size_bar_register(&mut config, 0);
        size_bar_register(&mut config, 1);
        assert!(config.take_bar_reprogrammings().is_empty());
        assert_eq!(config.bar_address(0), Some(0x80_feb0_4000));
    }

    #[test]
    fn out_of_range_and_odd_accesses_read_all_ones_and_do_not_panic() {
        let mut config = with_bar(0, 0x1000, MEM32);
        let mut data = [0; 4];
        config.read(CONFIG_SPACE_SIZE - 2, &mut data);
        assert_eq!(data, [0, 0, 0xff, 0xff]);
        config.read(usize::MAX - 1, &mut data);
        assert_eq!(data, [0xff; 4]);
        config.write(usize::MAX - 1, &[0xff; 4]);
        config.write(CONFIG_SPACE_SIZE - 1, &[0xff; 8]);
        let mut odd = [0; 3];
        config.read(0x01, &mut odd);
        assert_eq!(odd, [0x1a, 0x41, 0x10]);
        config.read(0, &mut []);
        config.write(0, &[]);
        // An unaligned write across the command and status registers changes only writable bits.
        config.write(0x03, &[0xff; 5]);
        assert_eq!(read_u32(&config, 0x04), 0x0000_0407);
        assert_eq!(read_u32(&config, 0x00), 0x1041_1af4);
    }

    #[test]
    fn command_interrupt_line_and_cache_line_are_the_writable_header_bits() {
        let mut config = PciConfiguration::new(&IDENTITY);
        config.set_interrupt_pin(PciInterruptPin::IntA);
        write_u32(&mut config, 0x04, 0xffff_ffff);
        assert_eq!(config.command(), 0x0407);
        assert_eq!(read_u32(&config, 0x04) >> 16, 0, "status is read-only");
        write_u32(&mut config, 0x3c, 0xffff_ffff);
        assert_eq!(read_u32(&config, 0x3c), 0x0000_01ff);
        config.write(0x0c, &[0x10]);
        assert_eq!(read_u32(&config, 0x0c), 0x0000_0010);
        write_u32(&mut config, 0x30, 0xffff_fffe);
        assert_eq!(read_u32(&config, 0x30), 0, "no expansion ROM");
    }

    #[test]
    fn capability_chain_walks_from_0x34() {
        let mut config = PciConfiguration::new(&IDENTITY);
        assert_eq!(read_u32(&config, 0x04) >> 16 & 0x10, 0);
        assert_eq!(config.add_capability(0x09, &[0xaa; 3]), Ok(0x40));
        assert_eq!(config.add_capability(0x05, &[0xbb; 12]), Ok(0x48));
        assert_eq!(config.add_capability(0x11, &[]), Ok(0x58));
        assert_eq!(read_u32(&config, 0x04) >> 16 & 0x10, 0x10);

        let mut walked = Vec::new();
        let mut pointer = [0];
        config.read(CAPABILITIES_POINTER, &mut pointer);
        while pointer[0] != 0 && walked.len() < 48 {
            let mut header = [0; 2];
            config.read(usize::from(pointer[0]), &mut header);
            walked.push((pointer[0], header[0]));
            pointer[0] = header[1];
        }
        assert_eq!(walked, vec![(0x40, 0x09), (0x48, 0x05), (0x58, 0x11)]);
    }

    #[test]
    fn capabilities_are_read_only_unless_declared_writable() {
        let mut config = PciConfiguration::new(&IDENTITY);
        let read_only = config.add_capability(0x09, &[1, 2, 3, 4, 5, 6]).unwrap();
        let msix = config
            .add_capability_with_writable_mask(0x11, &[0x03, 0x00, 0, 0], &[0, 0xc0, 0, 0])
            .unwrap();
        config.write(read_only, &[0xff; 8]);
        let mut bytes = [0; 8];
        config.read(read_only, &mut bytes);
        assert_eq!(bytes, [0x09, msix as u8, 1, 2, 3, 4, 5, 6]);
        config.write(msix, &[0xff; 6]);
        config.read(msix, &mut bytes[..6]);
        assert_eq!(bytes[..6], [0x11, 0, 0x03, 0xc0, 0, 0]);
        let mismatched = config.add_capability_with_writable_mask(0x11, &[0; 2], &[0; 3]);
        let expected = E::CapabilityMaskLength {
            id: 0x11,
            body_len: 2,
            mask_len: 3,
        };
        assert_eq!(mismatched, Err(expected));
    }

    #[test]
    fn capability_space_runs_out_at_0x100() {
        let mut config = PciConfiguration::new(&IDENTITY);
        assert_eq!(config.add_capability(0x09, &[0; 0xbe]), Ok(0x40));
        let full = E::CapabilitySpaceFull {
            id: 0x05,
            len: 0,
            offset: 0x100,
        };
        assert_eq!(config.add_capability(0x05, &[]), Err(full));
        let mut other = PciConfiguration::new(&IDENTITY);
        let too_long = E::CapabilitySpaceFull {
            id: 0x09,
            len: 0xbf,
            offset: 0x40,
        };
        assert_eq!(other.add_capability(0x09, &[0; 0xbf]), Err(too_long));
    }

    #[test]
    fn state_round_trips_and_reports_moved_bars() {
        let build = || {
            let mut config = with_bar(0, 0x1000, MEM32);
            config.add_capability(0x09, &[7; 4]).unwrap();
            config
        };
        let mut source = build();
        write_u32(&mut source, 0x10, 0xfe00_0000);
        write_u32(&mut source, 0x04, 0x0006);
        source.set_interrupt_status(true);
        let state = source.state();

        let mut restored = build();
        restored.restore_state(&state).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(restored.bar_address(0), Some(0xfe00_0000));
        assert_eq!(
            restored.take_bar_reprogrammings(),
            vec![moved(0, 0, 0xfe00_0000)]
        );
    }

    #[test]
    fn state_of_wrong_length_or_other_device_is_refused() {
        let mut config = PciConfiguration::new(&IDENTITY);
        let short = PciConfigurationState {
            bytes: vec![0; 256],
        };
        let wrong_length = E::StateLength {
            len: 256,
            expected: CONFIG_SPACE_SIZE,
        };
        assert_eq!(config.restore_state(&short), Err(wrong_length));
        let mut other = config.state();
        other.bytes[DEVICE_ID] = 0x42;
        let mismatch = E::StateMismatch {
            offset: DEVICE_ID,
            expected: 0x41,
            found: 0x42,
        };
        assert_eq!(config.restore_state(&other), Err(mismatch));
        assert_eq!(read_u32(&config, 0), 0x1041_1af4);
    }
}
