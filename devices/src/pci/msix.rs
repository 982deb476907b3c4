//! MSI-X (PCI 3.0 §6.8.2): a function's table of interrupt vectors, its pending-bit array, and the
//! capability that enables and masks them.
//!
//! Each table entry is 16 bytes: message address (low, high), message data, vector control (bit 0:
//! masked; entries start masked). The guest programs entries through the BAR that holds the table;
//! the device raises vector `n` with [`MsixVectors::trigger`]. A vector masked (by its own bit or
//! by the capability's function mask) keeps its interrupt pending in the PBA and delivers it when
//! unmasked. Delivery is an eventfd per vector, which the VMM registers as a KVM irqfd on a GSI
//! whose MSI route it keeps equal to the entry: [`MsiRouting`] tells it when an entry changes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The MSI-X capability ID.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;
/// The most vectors a table may have.
pub const MAX_VECTORS: u16 = 2048;

/// An MSI message: where the interrupt is written and what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// What the VMM does for a function's vectors: keep vector `vector`'s route equal to `message`.
pub trait MsiRouting: Send + Sync {
    /// Routes the eventfd of `vector` to `message`.
    fn set_route(&self, vector: u16, message: MsiMessage);
}

/// One table entry as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address_low: u32,
    pub address_high: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            address_low: 0,
            address_high: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_high) << 32 | u64::from(self.address_low),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// The table, PBA and capability state, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub table: Vec<MsixEntry>,
    pub pending: Vec<bool>,
    pub control: u16,
}

/// Errors building or restoring the vectors.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("an MSI-X table has 1 to {MAX_VECTORS} vectors, not {0}")]
    VectorCount(u16),
    #[error("cannot create the eventfd of MSI-X vector {vector}: {source}")]
    EventFd { vector: u16, source: std::io::Error },
    #[error("saved MSI-X state has {got} vectors for a table of {expected}")]
    StateSize { expected: usize, got: usize },
}

/// A function's MSI-X vectors.
pub struct MsixVectors {
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    /// The capability's message control word (enable and function mask are the writable bits).
    control: u16,
    eventfds: Vec<EventFd>,
    routing: Arc<dyn MsiRouting>,
}

impl MsixVectors {
    /// A table of `count` masked vectors, routed through `routing`.
    pub fn new(count: u16, routing: Arc<dyn MsiRouting>) -> Result<Self, MsixError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(MsixError::VectorCount(count));
        }
        let eventfds = (0..count)
            .map(|vector| {
                EventFd::new(EFD_NONBLOCK).map_err(|source| MsixError::EventFd { vector, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            table: vec![MsixEntry::default(); usize::from(count)],
            pending: vec![false; usize::from(count)],
            control: count - 1,
            eventfds,
            routing,
        })
    }

    /// The number of vectors.
    pub fn count(&self) -> u16 {
        self.table.len() as u16
    }

    /// The eventfd of each vector, for the VMM to register as irqfds.
    pub fn eventfds(&self) -> &[EventFd] {
        &self.eventfds
    }

    /// The capability's body after its ID and next pointer: message control, then the table's and
    /// the PBA's offset in BAR `bar`.
    pub fn capability_body(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&self.control.to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        body
    }

    /// The capability body's writable bits: enable and function mask.
    pub fn capability_writable_mask() -> [u8; 10] {
        let mut mask = [0u8; 10];
        mask[0..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        mask
    }

    /// The guest wrote the capability's message control word.
    pub fn set_control(&mut self, control: u16) {
        let writable = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        self.control = (self.control & !writable) | (control & writable);
        self.deliver_unmasked_pending();
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    fn function_masked(&self) -> bool {
        self.control & CONTROL_FUNCTION_MASK != 0
    }

    /// Raises `vector`: delivered now, or left pending while masked. Does nothing while MSI-X is
    /// disabled or for a vector the table does not have.
    pub fn trigger(&mut self, vector: u16) {
        let index = usize::from(vector);
        let Some(entry) = self.table.get(index) else {
            return;
        };
        if !self.enabled() {
            return;
        }
        if entry.masked() || self.function_masked() {
            self.pending[index] = true;
            return;
        }
        if let Err(e) = self.eventfds[index].write(1) {
            crate::guest_error!("cannot raise MSI-X vector {vector}: {e}");
        }
    }

    fn deliver_unmasked_pending(&mut self) {
        if !self.enabled() || self.function_masked() {
            return;
        }
        for index in 0..self.table.len() {
            if self.pending[index] && !self.table[index].masked() {
                self.pending[index] = false;
                if let Err(e) = self.eventfds[index].write(1) {
                    crate::guest_error!("cannot raise MSI-X vector {index}: {e}");
                }
            }
        }
    }

    /// Reads the table at byte `offset` (dword or qword accesses).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Some(entry) = self.table.get((at / MSIX_ENTRY_SIZE) as usize) else {
                return;
            };
            let value = match at % MSIX_ENTRY_SIZE {
                0 => entry.address_low,
                4 => entry.address_high,
                8 => entry.data,
                12 => entry.control,
                _ => 0,
            };
            let bytes = value.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Writes the table at byte `offset` (dword or qword accesses; others are ignored).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(4) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let index = (at / MSIX_ENTRY_SIZE) as usize;
            let Some(entry) = self.table.get_mut(index) else {
                return;
            };
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match at % MSIX_ENTRY_SIZE {
                0 => entry.address_low = value,
                4 => entry.address_high = value,
                8 => entry.data = value,
                _ => entry.control = value & VECTOR_MASKED,
            }
            if at % MSIX_ENTRY_SIZE != 12 {
                let message = entry.message();
                self.routing.set_route(index as u16, message);
            }
        }
        self.deliver_unmasked_pending();
    }

    /// Reads the pending-bit array at byte `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *byte = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |b, bit| b | 1 << bit);
        }
    }

    /// The table, PBA and control word.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
            control: self.control,
        }
    }

    /// Loads saved state and routes every vector again.
    pub fn restore_state(&mut self, state: &MsixState) -> Result<(), MsixError> {
        if state.table.len() != self.table.len() || state.pending.len() != self.pending.len() {
            return Err(MsixError::StateSize {
                expected: self.table.len(),
                got: state.table.len(),
            });
        }
        self.table = state.table.clone();
        self.pending = state.pending.clone();
        self.control = state.control;
        for (vector, entry) in self.table.iter().enumerate() {
            self.routing.set_route(vector as u16, entry.message());
        }
        self.deliver_unmasked_pending();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records the routes it is given.
    #[derive(Default)]
    pub(crate) struct Routes(pub(crate) Mutex<Vec<(u16, MsiMessage)>>);

    impl MsiRouting for Routes {
        fn set_route(&self, vector: u16, message: MsiMessage) {
            self.0.lock().unwrap().push((vector, message));
        }
    }

    fn vectors(count: u16) -> (MsixVectors, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        (MsixVectors::new(count, routes.clone()).unwrap(), routes)
    }

    fn fired(v: &MsixVectors, vector: usize) -> bool {
        v.eventfds()[vector].read().is_ok()
    }

    fn program(v: &mut MsixVectors, vector: u64, address: u64, data: u32) {
        let base = vector * MSIX_ENTRY_SIZE;
        v.write_table(base, &address.to_le_bytes());
        v.write_table(base + 8, &data.to_le_bytes());
        v.write_table(base + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn a_programmed_unmasked_vector_is_routed_and_delivered_once_enabled() {
        let (mut v, routes) = vectors(2);
        program(&mut v, 1, 0xfee0_0000, 0x41);
        assert_eq!(
            routes.0.lock().unwrap().last(),
            Some(&(
                1,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                }
            ))
        );
        v.trigger(1);
        assert!(!fired(&v, 1), "MSI-X is not enabled yet");
        v.set_control(CONTROL_ENABLE);
        v.trigger(1);
        assert!(fired(&v, 1));
        let mut entry = [0u8; 16];
        v.read_table(16, &mut entry);
        assert_eq!(u32::from_le_bytes(entry[8..12].try_into().unwrap()), 0x41);
        assert_eq!(u32::from_le_bytes(entry[12..16].try_into().unwrap()), 0);
    }

    #[test]
    fn masked_vectors_stay_pending_and_fire_when_unmasked() {
        let (mut v, _) = vectors(3);
        v.set_control(CONTROL_ENABLE);
        v.trigger(2); // entries start masked
        assert!(!fired(&v, 2));
        let mut pba = [0u8; 1];
        v.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b100);
        program(&mut v, 2, 0xfee0_0000, 0x42);
        assert!(fired(&v, 2), "unmasking delivers the pending interrupt");
        v.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // The function mask holds every vector.
        v.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        v.trigger(2);
        assert!(!fired(&v, 2));
        v.set_control(CONTROL_ENABLE);
        assert!(fired(&v, 2));
    }

    #[test]
    fn bad_accesses_and_vectors_are_ignored() {
        let (mut v, routes) = vectors(1);
        v.write_table(16, &1u32.to_le_bytes()); // past the table
        v.write_table(2, &1u32.to_le_bytes()); // unaligned
        v.write_table(0, &[1, 2]); // two bytes
        assert!(routes.0.lock().unwrap().is_empty());
        v.trigger(7);
        let mut data = [0xffu8; 4];
        v.read_table(64, &mut data);
        assert_eq!(data, [0; 4]);
        assert!(matches!(
            MsixVectors::new(0, routes.clone()),
            Err(MsixError::VectorCount(0))
        ));
    }

    #[test]
    fn the_capability_says_the_table_size_and_where_table_and_pba_are() {
        let (v, _) = vectors(3);
        let body = v.capability_body(2, 0x2000, 0x3000);
        assert_eq!(
            u16::from_le_bytes([body[0], body[1]]),
            2,
            "size - 1, disabled"
        );
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x2002);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x3002);
    }

    #[test]
    fn state_round_trips_and_routes_again() {
        let (mut v, _) = vectors(2);
        program(&mut v, 0, 0xfee0_1000, 7);
        v.set_control(CONTROL_ENABLE);
        let state = v.state();
        let (mut fresh, routes) = vectors(2);
        fresh.restore_state(&state).unwrap();
        assert_eq!(fresh.state(), state);
        assert_eq!(routes.0.lock().unwrap().len(), 2);
        let (mut small, _) = vectors(1);
        assert!(matches!(
            small.restore_state(&state),
            Err(MsixError::StateSize { .. })
        ));
    }
}
