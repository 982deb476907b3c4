//! The 8250 UART (vm-superio) on COM1, writing guest output to stdout or a file.

use std::io::{self, Write};
use std::path::PathBuf;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::capped_file::{CappedFile, Start};
use crate::interrupt::EventFdTrigger;
use crate::persist::UartState;

/// The most a console file holds before it moves to `PATH.1` and starts again.
pub const CONSOLE_MAX_BYTES: u64 = 16 << 20;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or emptied, kept to [`CONSOLE_MAX_BYTES`] (the rest in `PATH.1`:
    /// `crate::capped_file`).
    File(PathBuf),
    /// Discarded.
    Null,
}

/// Errors opening a serial output.
#[derive(Debug, thiserror::Error)]
pub enum SerialOutputError {
    #[error("serial output: {0}")]
    Open(#[from] crate::capped_file::CappedFileError),
    #[error("invalid --serial value {0:?}: expected stdout, null or file:PATH")]
    Parse(String),
}

impl std::str::FromStr for SerialOutput {
    type Err = SerialOutputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "null" | "none" => Ok(Self::Null),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(SerialOutputError::Parse(s.to_string())),
            },
        }
    }
}

impl SerialOutput {
    /// Opens the output as a writer.
    pub fn open(&self) -> Result<Box<dyn Write + Send>, SerialOutputError> {
        Ok(match self {
            Self::Stdout => Box::new(io::stdout()),
            Self::Null => Box::new(io::sink()),
            Self::File(path) => Box::new(CappedFile::open(path, CONSOLE_MAX_BYTES, Start::Empty)?),
        })
    }
}

/// COM1: a vm-superio 8250 UART on the port I/O bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// The UART's I/O base on a PC.
    pub const COM1_BASE: u64 = 0x3f8;
    /// Number of UART registers.
    pub const LEN: u64 = 8;
    /// The legacy interrupt line of COM1.
    pub const COM1_IRQ: u32 = 4;

    /// A UART raising `interrupt` and writing to `out`.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(interrupt, out),
        }
    }
}

impl SerialDevice {
    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Puts `bytes` in the receive FIFO for the guest to read (raising its interrupt if enabled);
    /// returns how many fit.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input not taken: {e:?}");
                0
            }
        }
    }

    /// The UART's registers and receive FIFO.
    pub fn save_state(&self) -> UartState {
        UartState::from(&self.serial.state())
    }

    /// Loads the UART's registers and FIFO, keeping its interrupt line and output.
    pub fn restore_state(&mut self, state: &UartState) -> Result<(), String> {
        let trigger = self
            .serial
            .interrupt_evt()
            .try_clone()
            .map_err(|e| format!("cannot clone the UART interrupt: {e}"))?;
        let spare = trigger
            .try_clone()
            .map_err(|e| format!("cannot clone the UART interrupt: {e}"))?;
        let placeholder: Box<dyn Write + Send> = Box::new(io::sink());
        let old = std::mem::replace(&mut self.serial, Serial::new(spare, placeholder));
        let out = old.into_writer();
        self.serial = Serial::from_state(&state.into(), trigger, NoEvents, out)
            .map_err(|e| format!("invalid UART state: {e}"))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.serial.write(offset, value) {
            crate::guest_warn!("serial write at offset {offset} failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_register_writes_reach_the_output() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn received_bytes_are_read_from_the_data_register() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink()));
        assert_eq!(dev.input_capacity(), 64);
        assert_eq!(dev.receive(b"ls\r"), 3);
        let mut data = [0u8; 1];
        dev.read(5, &mut data);
        assert_ne!(data[0] & 1, 0, "LSR: data ready");
        dev.read(0, &mut data);
        assert_eq!(data[0], b'l');
        assert_eq!(dev.receive(&[b'x'; 100]), 62, "the FIFO holds 64 bytes");
        assert_eq!(dev.receive(b"y"), 0);
    }

    #[test]
    fn parses_serial_output_specs() {
        assert_eq!(
            "stdout".parse::<SerialOutput>().unwrap(),
            SerialOutput::Stdout
        );
        assert_eq!(
            "file:/tmp/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tty".parse::<SerialOutput>().is_err());
    }
}
