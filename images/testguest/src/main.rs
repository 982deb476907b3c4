//! ftvmm test guest. Booted by ftvmm as a plain ELF (Linux 64-bit boot protocol, see
//! docs/boot-abi.md): a few hundred ring-0 instructions in `arch::entry` set up paging, SSE, GDT,
//! TSS and IDT, then everything runs in ring 3 with IOPL 3 (ring 0 is emulated, and slow, on the
//! test host). Ring 3 prints `testguest: booted cmdline="..."` on COM1 and runs the mode named by
//! `mode=` (default `hello`, see `modes`), then powers off through the ACPI sleep register.
//! Failures print `testguest: FAIL ...`, `testguest: PANIC ...` or `testguest: EXCEPTION ...`.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi_tables;
mod arch;
mod bootparams;
mod cmdline;
mod heap;
mod mem;
mod modes;
mod serial;
mod virtio;

use arch::cpu;
use cmdline::Cmdline;
use core::fmt::Write;

/// Prints the command line, escaping anything that is not printable ASCII as `\xNN`.
struct Escaped<'a>(&'a [u8]);

impl core::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "\\x{:02x}", b)?;
            }
        }
        Ok(())
    }
}

/// Ring-3 entry of the BSP (from `tg_user_entry`, after .bss is zeroed).
#[unsafe(no_mangle)]
extern "C" fn tg_bsp_main() -> ! {
    serial::init();
    let raw = bootparams::cmdline();
    println!("testguest: booted cmdline=\"{}\"", Escaped(raw));
    // Parse the longest valid UTF-8 prefix (a VMM passes ASCII).
    let text = match core::str::from_utf8(raw) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&raw[..e.valid_up_to()]).unwrap_or(""),
    };
    let cmdline = Cmdline::new(text);
    let mode = cmdline.get("mode").unwrap_or(modes::DEFAULT);
    match modes::find(mode) {
        Some(m) => (m.run)(&cmdline),
        None => {
            println!("testguest: FAIL unknown mode={}", mode);
            for m in modes::MODES {
                println!("testguest: mode {}: {}", m.name, m.about);
            }
        }
    }
    cpu::poweroff()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Another CPU may hold the serial lock (or this one, if formatting panicked): wait a
    // little, then print regardless.
    let locked = serial::try_lock_for(1_000_000);
    let mut w = serial::RawWriter;
    let _ = match info.location() {
        Some(loc) => writeln!(
            w,
            "testguest: PANIC {} at {}:{}",
            info.message(),
            loc.file(),
            loc.line()
        ),
        None => writeln!(w, "testguest: PANIC {}", info.message()),
    };
    if locked {
        serial::unlock();
    }
    cpu::poweroff()
}
