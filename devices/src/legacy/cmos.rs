//! The PC's CMOS RAM and real-time clock (MC146818) at I/O ports 0x70 (index; bit 7 masks NMIs)
//! and 0x71 (data). Firmware (OVMF) and kernels read the date and time from it, and the memory
//! size bytes QEMU's platform puts there: RAM from 1 MiB (KiB, up to 64 MiB), from 16 MiB (64 KiB
//! units, up to the PCI hole) and above 4 GiB (64 KiB units).
//!
//! The clock is the host's (UTC) plus an offset the guest sets by writing the time registers; it is
//! computed at each read, so it never drifts from the host's and needs no timer. The update-in-
//! progress bit is never set: a read always sees a consistent time. Periodic and alarm interrupts
//! are not offered (no guest this VMM boots needs them; they read as never pending).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// First I/O port (index); the data port follows.
pub const PORT_BASE: u64 = 0x70;
/// Ports: index and data.
pub const PORT_LEN: u64 = 2;

/// The register holding the century, which the FADT names.
pub const CENTURY_INDEX: u8 = reg::CENTURY;

/// Register numbers.
mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const DAY_OF_WEEK: u8 = 0x06;
    pub const DAY_OF_MONTH: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const STATUS_A: u8 = 0x0a;
    pub const STATUS_B: u8 = 0x0b;
    pub const STATUS_C: u8 = 0x0c;
    pub const STATUS_D: u8 = 0x0d;
    pub const EXT_MEM_LOW: u8 = 0x17;
    pub const EXT_MEM_HIGH: u8 = 0x18;
    pub const EXT_MEM2_LOW: u8 = 0x30;
    pub const EXT_MEM2_HIGH: u8 = 0x31;
    pub const CENTURY: u8 = 0x32;
    pub const MEM_ABOVE_16M_LOW: u8 = 0x34;
    pub const MEM_ABOVE_16M_HIGH: u8 = 0x35;
    pub const MEM_ABOVE_4G: u8 = 0x5b;
    pub const CPUS_MINUS_ONE: u8 = 0x5f;
}

/// Status B: 24-hour mode.
const B_24H: u8 = 0x02;
/// Status B: binary (not BCD) values.
const B_BINARY: u8 = 0x04;
/// Status B: the clock is stopped for setting (SET); writes to time registers take effect at once
/// here, so it only reads back.
const B_SET: u8 = 0x80;
/// Status B bits a guest may change: SET, the interrupt enables are ignored, data mode, 24/12 h,
/// daylight saving.
const B_WRITABLE: u8 = 0x87;
/// Status D: the RAM and time are valid (battery good).
const D_VALID: u8 = 0x80;

/// The CMOS state, for snapshots: the 128 bytes, the index, and the guest's clock offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub ram: Vec<u8>,
    pub clock_offset_s: i64,
}

/// The CMOS RAM and clock.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Seconds added to the host's time (the guest set the clock).
    clock_offset_s: i64,
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The guest's RAM layout as the CMOS memory bytes describe it.
#[derive(Clone, Copy, Debug)]
pub struct CmosMemory {
    /// Bytes of RAM below 4 GiB (up to the PCI hole).
    pub below_4g: u64,
    /// Bytes of RAM from 4 GiB.
    pub above_4g: u64,
    pub vcpus: u8,
}

impl Cmos {
    /// A CMOS describing `memory`, its clock the host's.
    pub fn new(memory: CmosMemory) -> Self {
        Self::with_clock(memory, host_now)
    }

    fn with_clock(memory: CmosMemory, now: fn() -> i64) -> Self {
        let mut ram = [0u8; 128];
        ram[reg::STATUS_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[reg::STATUS_B as usize] = B_24H;
        ram[reg::STATUS_D as usize] = D_VALID;
        const MIB: u64 = 1 << 20;
        let ext_kib = (memory.below_4g.saturating_sub(MIB) / 1024).min(0xfc00) as u16;
        for (low, high) in [
            (reg::EXT_MEM_LOW, reg::EXT_MEM_HIGH),
            (reg::EXT_MEM2_LOW, reg::EXT_MEM2_HIGH),
        ] {
            ram[low as usize] = ext_kib as u8;
            ram[high as usize] = (ext_kib >> 8) as u8;
        }
        let above_16m = (memory.below_4g.saturating_sub(16 * MIB) >> 16).min(0xffff) as u16;
        ram[reg::MEM_ABOVE_16M_LOW as usize] = above_16m as u8;
        ram[reg::MEM_ABOVE_16M_HIGH as usize] = (above_16m >> 8) as u8;
        let above_4g = (memory.above_4g >> 16).min(0xff_ffff) as u32;
        ram[reg::MEM_ABOVE_4G as usize..reg::MEM_ABOVE_4G as usize + 3]
            .copy_from_slice(&above_4g.to_le_bytes()[..3]);
        ram[reg::CPUS_MINUS_ONE as usize] = memory.vcpus.saturating_sub(1);
        Self {
            index: 0,
            ram,
            clock_offset_s: 0,
            now,
        }
    }

    /// The state.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
            clock_offset_s: self.clock_offset_s,
        }
    }

    /// Restores `state`; a RAM image of another length is refused.
    pub fn restore_state(&mut self, state: &CmosState) -> Result<(), String> {
        self.ram = state
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| format!("CMOS RAM of {} bytes; it has 128", state.ram.len()))?;
        self.index = state.index & 0x7f;
        self.clock_offset_s = state.clock_offset_s;
        Ok(())
    }

    fn binary(&self) -> bool {
        self.ram[reg::STATUS_B as usize] & B_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0f)
        }
    }

    /// The guest's current time, broken down.
    fn time(&self) -> DateTime {
        DateTime::from_unix((self.now)() + self.clock_offset_s)
    }

    fn read_register(&self, index: u8) -> u8 {
        let t = self.time();
        match index {
            reg::SECONDS => self.encode(t.second),
            reg::MINUTES => self.encode(t.minute),
            reg::HOURS if self.ram[reg::STATUS_B as usize] & B_24H != 0 => self.encode(t.hour),
            reg::HOURS => {
                let h12 = match t.hour % 12 {
                    0 => 12,
                    h => h,
                };
                self.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
            }
            reg::DAY_OF_WEEK => self.encode(t.weekday + 1),
            reg::DAY_OF_MONTH => self.encode(t.day),
            reg::MONTH => self.encode(t.month),
            reg::YEAR => self.encode((t.year % 100) as u8),
            reg::CENTURY => self.encode((t.year / 100) as u8),
            reg::STATUS_C => 0,
            i => self.ram[usize::from(i & 0x7f)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let mut t = self.time();
        match index {
            reg::SECONDS => t.second = self.decode(value).min(59),
            reg::MINUTES => t.minute = self.decode(value).min(59),
            reg::HOURS if self.ram[reg::STATUS_B as usize] & B_24H != 0 => {
                t.hour = self.decode(value).min(23)
            }
            reg::HOURS => {
                let h = self.decode(value & 0x7f).clamp(1, 12) % 12;
                t.hour = h + if value & 0x80 != 0 { 12 } else { 0 };
            }
            reg::DAY_OF_MONTH => t.day = self.decode(value).clamp(1, 31),
            reg::MONTH => t.month = self.decode(value).clamp(1, 12),
            reg::YEAR => t.year = t.year / 100 * 100 + i64::from(self.decode(value).min(99)),
            reg::CENTURY => t.year = i64::from(self.decode(value).min(99)) * 100 + t.year % 100,
            reg::DAY_OF_WEEK => return, // follows from the date
            reg::STATUS_B => {
                let b = &mut self.ram[reg::STATUS_B as usize];
                *b = (*b & !B_WRITABLE) | (value & B_WRITABLE & !B_SET) | (value & B_SET);
                return;
            }
            reg::STATUS_A | reg::STATUS_C | reg::STATUS_D => return,
            i => {
                self.ram[usize::from(i & 0x7f)] = value;
                return;
            }
        }
        self.clock_offset_s = t.to_unix() - (self.now)();
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 masks NMIs on real hardware; there is nothing to mask here.
            0 => self.index = value & 0x7f,
            1 => self.write_register(self.index, value),
            _ => {}
        }
    }
}

/// A UTC calendar date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 is Sunday.
    weekday: u8,
}

impl DateTime {
    /// From seconds since 1970-01-01 (Howard Hinnant's days-to-civil algorithm).
    fn from_unix(t: i64) -> Self {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (secs / 3600) as u8,
            minute: (secs / 60 % 60) as u8,
            second: (secs % 60) as u8,
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    /// Seconds since 1970-01-01 (the inverse; days past a month's end roll over).
    fn to_unix(self) -> i64 {
        let y = self.year - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03 07:45:53 UTC, a Thursday.
    fn fixed() -> i64 {
        1_796_283_953
    }

    fn cmos() -> Cmos {
        Cmos::with_clock(
            CmosMemory {
                below_4g: 2 << 30,
                above_4g: 1 << 30,
                vcpus: 4,
            },
            fixed,
        )
    }

    fn get(c: &mut Cmos, index: u8) -> u8 {
        c.write(0, &[index | 0x80]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    fn set(c: &mut Cmos, index: u8, value: u8) {
        c.write(0, &[index]);
        c.write(1, &[value]);
    }

    #[test]
    fn the_clock_reads_in_bcd_and_in_binary() {
        let mut c = cmos();
        let date: Vec<u8> = [9, 8, 7, 4, 2, 0, 6, 0x32]
            .iter()
            .map(|&r| get(&mut c, r))
            .collect();
        assert_eq!(date, [0x26, 0x12, 0x03, 0x07, 0x45, 0x53, 0x05, 0x20]);
        set(&mut c, reg::STATUS_B, B_24H | B_BINARY);
        assert_eq!(get(&mut c, reg::YEAR), 26);
        assert_eq!(get(&mut c, reg::SECONDS), 53);
        set(&mut c, reg::STATUS_B, B_BINARY);
        assert_eq!(get(&mut c, reg::HOURS), 7, "12-hour mode, morning");
    }

    #[test]
    fn setting_the_clock_moves_only_the_guests_time() {
        let mut c = cmos();
        set(&mut c, reg::YEAR, 0x30);
        set(&mut c, reg::HOURS, 0x23);
        assert_eq!(get(&mut c, reg::YEAR), 0x30);
        assert_eq!(get(&mut c, reg::HOURS), 0x23);
        assert_eq!(get(&mut c, reg::MONTH), 0x12);
        // Four years on (one of them leap) and sixteen hours on.
        assert_eq!(c.state().clock_offset_s, (4 * 365 + 1) * 86_400 + 16 * 3600);
        // Nonsense values are clamped, not trusted.
        set(&mut c, reg::MONTH, 0x99);
        assert_eq!(get(&mut c, reg::MONTH), 0x12);
    }

    #[test]
    fn memory_size_bytes_follow_qemus_layout() {
        let mut c = cmos();
        let word = |c: &mut Cmos, lo: u8| u16::from(get(c, lo)) | u16::from(get(c, lo + 1)) << 8;
        assert_eq!(word(&mut c, reg::EXT_MEM2_LOW), 0xfc00);
        assert_eq!(
            word(&mut c, reg::MEM_ABOVE_16M_LOW),
            (((2u64 << 30) - (16 << 20)) >> 16) as u16
        );
        let high: u32 = (0..3)
            .map(|i| u32::from(get(&mut c, reg::MEM_ABOVE_4G + i)) << (8 * i))
            .sum();
        assert_eq!(high, (1 << 30) >> 16);
        assert_eq!(get(&mut c, reg::CPUS_MINUS_ONE), 3);
        assert_eq!(get(&mut c, reg::STATUS_D), D_VALID);
    }

    #[test]
    fn ram_round_trips_and_odd_accesses_are_harmless() {
        let mut c = cmos();
        set(&mut c, 0x40, 0xab);
        c.write(2, &[1]);
        c.write(1, &[]);
        let mut wide = [0u8; 4];
        c.read(5, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        let state = c.state();
        let mut d = cmos();
        d.restore_state(&state).unwrap();
        assert_eq!(get(&mut d, 0x40), 0xab);
        let mut bad = state;
        bad.ram.pop();
        assert!(d.restore_state(&bad).is_err());
    }

    #[test]
    fn dates_convert_both_ways() {
        for t in [
            0,
            951_782_400, /* 2000-02-29 */
            fixed(),
            4_102_444_800, /* 2100-01-01 */
        ] {
            assert_eq!(DateTime::from_unix(t).to_unix(), t);
        }
        let leap = DateTime::from_unix(951_782_400);
        assert_eq!(
            (leap.year, leap.month, leap.day, leap.weekday),
            (2000, 2, 29, 2)
        );
    }
}
