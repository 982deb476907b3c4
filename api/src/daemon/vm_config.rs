//! What a user asks the host daemon to run: a VM's configuration, checked before anything is
//! created, and the `ftvmm run` command line it becomes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most vCPUs a VM may have (the MP table's and `ftvmm run`'s limit).
pub const MAX_VCPUS: u8 = 254;
/// Least guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Longest kernel command line, bytes (Linux's x86 COMMAND_LINE_SIZE).
pub const MAX_CMDLINE: usize = 2048;

/// Errors in a VM configuration: each names the field and the value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("\"vcpus\" must be 1 to {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("\"memory_mib\" must be {MIN_MEMORY_MIB} to {max} (this host's RAM), got {got}")]
    Memory { got: u64, max: u64 },
    #[error("\"{field}\" {path:?}: {reason}")]
    File {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("\"cmdline\" is {0} bytes; at most {MAX_CMDLINE}")]
    Cmdline(usize),
    #[error("\"name\" {0:?}: 1 to 64 letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("\"nics\"[{index}].tap {tap:?}: 1 to 15 letters, digits, '-' or '_'")]
    Tap { index: usize, tap: String },
    #[error("\"nics\"[{index}].mac {mac:?}: six hex bytes separated by ':'")]
    Mac { index: usize, mac: String },
    #[error("\"cmdline\" must not contain a NUL byte or a newline")]
    CmdlineBytes,
    #[error("nothing to boot: give \"kernel\", \"firmware\" or both")]
    NothingToBoot,
}

/// A VM to create: its kernel, memory, vCPUs and devices. Paths are on the daemon's host.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// A name for people (unique on this host); the daemon gives every VM an id too.
    #[serde(default)]
    pub name: Option<String>,
    /// Guest kernel: an ELF (vmlinux, or the ftvmm test guest) or a bzImage; with `firmware`, a
    /// bzImage the firmware starts (or none: the firmware boots from the disks).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    /// UEFI firmware to boot through (`ftvmm run --firmware`, e.g. /usr/share/ovmf/OVMF.fd): a q35
    /// platform with virtio-pci devices.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub firmware: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1 to 254).
    #[serde(default = "default_vcpus")]
    #[schema(minimum = 1, maximum = 254)]
    pub vcpus: u8,
    /// Guest memory in MiB (16 to the host's RAM).
    #[serde(default = "default_memory_mib")]
    #[schema(minimum = 16)]
    pub memory_mib: u64,
    /// virtio-blk disks, in the order the guest sees them.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces on TAP devices (created if missing, removed when the VM ends).
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// Hyper-V enlightenments (`ftvmm run --hyperv`): `off`, `on` or `only`.
    #[serde(default)]
    #[schema(value_type = String)]
    pub hyperv: vmm::arch::hyperv::HypervMode,
}

/// A virtio-blk disk backed by a raw image file.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    #[schema(value_type = String)]
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

/// A virtio-net interface on a TAP device.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    pub tap: String,
    #[serde(default)]
    pub mac: Option<String>,
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    256
}

impl VmConfig {
    /// Checks every field against what `ftvmm run` accepts and this host has; `host_memory_mib`
    /// bounds the memory.
    pub fn validate(&self, host_memory_mib: u64) -> Result<(), ConfigError> {
        self.validate_hardware(host_memory_mib)?;
        if let Some(kernel) = &self.kernel {
            regular_file("kernel", kernel)?;
        }
        if let Some(firmware) = &self.firmware {
            regular_file("firmware", firmware)?;
        }
        if let Some(initrd) = &self.initrd {
            regular_file("initrd", initrd)?;
        }
        for disk in &self.disks {
            regular_file("disks", &disk.path)?;
        }
        Ok(())
    }

    /// Checks every field but the files: what a copy of a VM that arrives from a peer (a standby,
    /// a migration's destination) needs, whose kernel and disk paths are its first host's.
    pub fn validate_hardware(&self, host_memory_mib: u64) -> Result<(), ConfigError> {
        if self.kernel.is_none() && self.firmware.is_none() {
            return Err(ConfigError::NothingToBoot);
        }
        if let Some(name) = &self.name {
            let ok = (1..=64).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(ConfigError::Name(name.clone()));
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > host_memory_mib {
            return Err(ConfigError::Memory {
                got: self.memory_mib,
                max: host_memory_mib,
            });
        }
        if let Some(cmdline) = &self.cmdline {
            if cmdline.len() > MAX_CMDLINE {
                return Err(ConfigError::Cmdline(cmdline.len()));
            }
            if cmdline.contains(['\0', '\n']) {
                return Err(ConfigError::CmdlineBytes);
            }
        }
        for (index, nic) in self.nics.iter().enumerate() {
            let ok = (1..=15).contains(&nic.tap.len())
                && nic
                    .tap
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
            if !ok {
                return Err(ConfigError::Tap {
                    index,
                    tap: nic.tap.clone(),
                });
            }
            if let Some(mac) = &nic.mac {
                let bytes: Vec<&str> = mac.split(':').collect();
                let ok = bytes.len() == 6
                    && bytes
                        .iter()
                        .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
                if !ok {
                    return Err(ConfigError::Mac {
                        index,
                        mac: mac.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The `ftvmm run` arguments for this VM, its console in `console` and its API on `api_socket`.
    pub fn run_args(&self, console: &Path, api_socket: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["run".into()];
        if let Some(kernel) = &self.kernel {
            args.extend(["--kernel".into(), kernel.clone().into()]);
        }
        if let Some(firmware) = &self.firmware {
            args.extend(["--firmware".into(), firmware.clone().into()]);
        }
        if let Some(initrd) = &self.initrd {
            args.extend(["--initrd".into(), initrd.clone().into()]);
        }
        if let Some(cmdline) = &self.cmdline {
            args.extend(["--cmdline".into(), cmdline.into()]);
        }
        args.extend([
            "--vcpus".into(),
            self.vcpus.to_string().into(),
            "--memory".into(),
            self.memory_mib.to_string().into(),
        ]);
        if self.hyperv != vmm::arch::hyperv::HypervMode::Off {
            let mode = serde_json::to_value(self.hyperv).unwrap_or_default();
            args.extend(["--hyperv".into(), mode.as_str().unwrap_or("on").into()]);
        }
        args.extend(self.device_args(console, api_socket, true));
        args
    }

    /// This host's backends for the devices (and the firmware) of a copy of the VM that arrives
    /// from a peer (`ftvmm standby`, `ftvmm receive`) or from a snapshot: the guest keeps its MAC
    /// addresses.
    pub fn backend_args(&self, console: &Path, api_socket: &Path) -> Vec<OsString> {
        let mut args = self.device_args(console, api_socket, false);
        if let Some(firmware) = &self.firmware {
            args.extend(["--firmware".into(), firmware.into()]);
        }
        args
    }

    /// The disks, NICs (with their MACs if `macs`), console and API socket arguments.
    fn device_args(&self, console: &Path, api_socket: &Path, macs: bool) -> Vec<OsString> {
        let mut args = Vec::new();
        for disk in &self.disks {
            let mut spec = OsString::from("path=");
            spec.push(&disk.path);
            if disk.readonly {
                spec.push(",readonly");
            }
            args.extend(["--disk".into(), spec]);
        }
        for nic in &self.nics {
            let spec = match (&nic.mac, macs) {
                (Some(mac), true) => format!("tap={},mac={mac}", nic.tap),
                _ => format!("tap={}", nic.tap),
            };
            args.extend(["--net".into(), spec.into()]);
        }
        let mut serial = OsString::from("file:");
        serial.push(console);
        args.extend(["--serial".into(), serial]);
        args.extend(["--api-socket".into(), api_socket.into()]);
        args
    }
}

fn regular_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        field,
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_absolute() {
        return Err(err("must be an absolute path".into()));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(err("not a regular file".into())),
        Err(e) => Err(err(e.to_string())),
    }
}

/// This host's RAM in MiB (`/proc/meminfo`'s MemTotal).
pub fn host_memory_mib() -> u64 {
    host_meminfo_bytes("MemTotal:") >> 20
}

/// A field of `/proc/meminfo` (`key` with its colon, e.g. `MemAvailable:`), in bytes; 0 if missing.
pub fn host_meminfo_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        serde_json::from_str(r#"{"kernel": "/proc/self/exe"}"#).unwrap()
    }

    #[test]
    fn defaults_fill_what_is_not_given_and_unknown_fields_are_refused() {
        let c = config();
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "cpus": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpus`"), "{err}");
    }

    #[test]
    fn each_bad_field_is_named_with_its_value() {
        let host = 4096;
        let with = |f: fn(&mut VmConfig)| {
            let mut c = config();
            f(&mut c);
            c.validate(host).unwrap_err().to_string()
        };
        assert!(with(|c| c.vcpus = 0).contains("\"vcpus\" must be 1 to 254, got 0"));
        assert!(with(|c| c.memory_mib = 1 << 40).contains("got 1099511627776"));
        assert!(with(|c| c.kernel = Some("/no/such/kernel".into())).contains("\"/no/such/kernel\""));
        assert!(with(|c| c.kernel = Some("relative".into())).contains("absolute"));
        assert!(with(|c| c.kernel = Some("/proc".into())).contains("not a regular file"));
        assert!(with(|c| c.kernel = None).contains("nothing to boot"));
        assert!(with(|c| c.firmware = Some("/no/OVMF.fd".into())).contains("\"firmware\""));
        assert!(with(|c| c.name = Some("a b".into())).contains("\"name\""));
        assert!(with(|c| c.cmdline = Some("x".repeat(5000))).contains("5000 bytes"));
        assert!(with(|c| c.nics = vec![NicConfig {
            tap: "much-too-long-name".into(),
            mac: None
        }])
        .contains("\"nics\"[0].tap"));
        assert!(with(|c| c.nics = vec![NicConfig {
            tap: "tap0".into(),
            mac: Some("52:54:00:zz:00:01".into())
        }])
        .contains("\"nics\"[0].mac"));
        config().validate(host).unwrap();
        let mut firmware_only = config();
        firmware_only.kernel = None;
        firmware_only.firmware = Some("/proc/self/exe".into());
        firmware_only.validate(host).unwrap();
    }

    /// The `ftvmm run` command line of `c`, its console and API socket at `/c` and `/a`.
    fn run_line(c: &VmConfig) -> String {
        c.run_args(Path::new("/c"), Path::new("/a"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_run_command_line_carries_every_device() {
        let mut c = config();
        c.cmdline = Some("mode=spin".into());
        c.disks = vec![DiskConfig {
            path: "/d.img".into(),
            readonly: true,
        }];
        c.nics = vec![NicConfig {
            tap: "tap3".into(),
            mac: Some("52:54:00:00:00:01".into()),
        }];
        let args: Vec<String> = c
            .run_args(Path::new("/v/console.log"), Path::new("/v/api.sock"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert_eq!(
            line,
            "run --kernel /proc/self/exe --cmdline mode=spin --vcpus 1 --memory 256 \
             --disk path=/d.img,readonly --net tap=tap3,mac=52:54:00:00:00:01 \
             --serial file:/v/console.log --api-socket /v/api.sock"
        );
        c.hyperv = vmm::arch::hyperv::HypervMode::Only;
        let args = run_line(&c);
        assert!(args.contains("--memory 256 --hyperv only --disk"), "{args}");
        c.firmware = Some("/usr/share/ovmf/OVMF.fd".into());
        c.kernel = None;
        let args = run_line(&c);
        assert!(
            args.starts_with("run --firmware /usr/share/ovmf/OVMF.fd --cmdline"),
            "{args}"
        );
        let bad = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "hyperv": "yes"}"#);
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown variant `yes`"));
    }
}
