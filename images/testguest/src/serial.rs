//! COM1 (8250 UART at I/O 0x3f8) output from ring 3, with a spinlock so lines printed by
//! different vCPUs never interleave. `print!`/`println!` take the lock; `RawWriter` does not
//! (exception and panic paths). Lines end in "\n" only.

use crate::arch::cpu::{inb, outb, pause};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const REG_DATA: u16 = 0; // THR / DLL
const REG_IER: u16 = 1; // IER / DLM
const REG_LCR: u16 = 3;
const REG_LSR: u16 = 5;
const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const LSR_THRE: u8 = 0x20;

static LOCK: AtomicBool = AtomicBool::new(false);

/// 115200 8N1, no interrupts.
pub fn init() {
    outb(COM1 + REG_IER, 0);
    outb(COM1 + REG_LCR, LCR_DLAB);
    outb(COM1 + REG_DATA, 1);
    outb(COM1 + REG_IER, 0);
    outb(COM1 + REG_LCR, LCR_8N1);
}

fn putb(b: u8) {
    // Bounded: a UART that never reports an empty THR still gets the byte.
    for _ in 0..10_000 {
        if inb(COM1 + REG_LSR) & LSR_THRE != 0 {
            break;
        }
        pause();
    }
    outb(COM1 + REG_DATA, b);
}

/// Writes straight to the UART, without the lock.
pub struct RawWriter;

impl Write for RawWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(putb);
        Ok(())
    }
}

fn lock() {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        while LOCK.load(Ordering::Relaxed) {
            pause();
        }
    }
}

/// Takes the lock, giving up after `spins` attempts (for the panic path). Returns whether it
/// got it.
pub fn try_lock_for(spins: u64) -> bool {
    for _ in 0..spins {
        if LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        pause();
    }
    false
}

pub fn unlock() {
    LOCK.store(false, Ordering::Release);
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    lock();
    let _ = RawWriter.write_fmt(args);
    unlock();
}

/// Prints to COM1 under the serial lock.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

/// Prints a line to COM1 under the serial lock (one lock hold per line).
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($fmt:expr) => { $crate::print!(concat!($fmt, "\n")) };
    ($fmt:expr, $($arg:tt)*) => { $crate::print!(concat!($fmt, "\n"), $($arg)*) };
}
