//! Address buses (port I/O and MMIO) that route guest accesses to devices.
//!
//! A bus maps non-overlapping `[base, base + len)` ranges to devices. It is built once while the VM is
//! set up and then shared read-only between vCPU threads; each device sits behind its own mutex so
//! accesses to different devices never contend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that can be placed on a [`Bus`].
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range has length zero.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("bus range {base:#x}+{len:#x} wraps around the address space")]
    Wraps { base: u64, len: u64 },
}

struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address bus: a set of device ranges.
#[derive(Default)]
pub struct Bus {
    entries: BTreeMap<u64, BusEntry>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base.checked_add(len).ok_or(BusError::Wraps { base, len })?;
        // The closest range starting at or below `end - 1` is the only one that can overlap.
        if let Some((&other_base, other)) = self.entries.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.entries.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// Finds the device covering `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64, access_len: usize) -> Option<(&BusEntry, u64)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(access_len as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Routes a read; returns false (and leaves `data` untouched) when no device covers it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device covers it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler panicked on another vCPU
/// thread keeps its last state, which is what real hardware would do.
fn lock<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_to_the_covering_device_with_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((7, vec![7])));
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x400, &mut data));
    }

    #[test]
    fn access_straddling_the_end_is_not_routed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 4)
            .unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x1000, &mut data));
        assert!(!bus.read(0x1002, &mut data));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x108, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::ZeroLength { base: 0x200 })
        );
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::Wraps { .. })
        ));
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }
}
