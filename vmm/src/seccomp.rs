//! Seccomp filters per kind of thread, as Firecracker does it: each thread, once it starts its real
//! work, installs an allowlist of the system calls that kind of thread needs; anything else traps, and
//! the trap handler reports the thread and the call on stderr and ends the process with
//! [`EXIT_SECCOMP`]. A guest or a peer that takes over a thread therefore cannot execute programs,
//! fork, trace, mount, load modules or (on vCPU threads) open files or sockets.
//!
//! The kinds ([`ThreadKind`]): vCPU threads (guest exits: KVM_RUN, MMIO/PIO devices); the event loop
//! (the process's main thread once the VM runs: virtio backends, TAPs, disks, snapshots, control
//! commands; receivers install it before accepting a peer); the API server (and tokio's blocking
//! pool it spawns); replication (migration and epoch-loop threads: sockets, TLS, dirty logs).
//!
//! Filters stack in Linux: a thread created by a filtered thread inherits its filter and can only
//! narrow it, so each list is a subset of the list of the thread that creates it (vCPU ⊂ event loop,
//! replication ⊂ event loop). Filtering is on unless [`disable`] was called (`--no-seccomp`); library
//! users who never call [`enable`] get none.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a process ended by a forbidden system call.
pub const EXIT_SECCOMP: i32 = 159;

/// The kinds of threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    EventLoop,
    Api,
    Replication,
}

impl ThreadKind {
    /// All kinds.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Api,
        ThreadKind::Replication,
    ];

    /// The kind's name, as used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Api => "api",
            ThreadKind::Replication => "replication",
        }
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: building the {kind} filter: {reason}")]
    Build { kind: &'static str, reason: String },
    #[error("seccomp: installing the {kind} filter: {reason}")]
    Install { kind: &'static str, reason: String },
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static HANDLER: Once = Once::new();

thread_local! {
    static INSTALLED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Turns filtering on for threads that start from now on (the `ftvmm` binary does, unless
/// `--no-seccomp`). Call it before any thread starts.
pub fn enable() {
    // glibc gives threads their own malloc arenas, and when it shrinks one it reads
    // /proc/sys/vm/overcommit_memory: an `openat` from whatever thread freed memory (seen on the
    // migration thread). With one arena every thread allocates from the main heap, which shrinks
    // with brk and opens nothing, so no filter needs to allow opening files for malloc's sake.
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    ENABLED.store(true, Ordering::SeqCst);
}

/// Turns filtering off (`--no-seccomp`, for debugging).
pub fn disable() {
    ENABLED.store(false, Ordering::SeqCst);
}

/// Whether filtering is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Installs the filter of `kind` on the calling thread, if filtering is on and this thread has not
/// installed that filter already.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() || INSTALLED.with(|k| k.get()) == Some(kind) {
        return Ok(());
    }
    install_trap_handler();
    for program in programs(kind)? {
        seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install {
            kind: kind.name(),
            reason: e.to_string(),
        })?;
    }
    INSTALLED.with(|k| k.set(Some(kind)));
    tracing::debug!(kind = kind.name(), "seccomp filter installed");
    Ok(())
}

/// As [`apply`], for threads that cannot report an error: on failure the process stops, since a
/// thread running unfiltered against the user's wish is worse.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("ftvmm: {e}");
        std::process::exit(1);
    }
}

/// The BPF programs of `kind`: first one that makes `clone3` fail with ENOSYS (its flags live in
/// memory, where a filter cannot check them, so glibc must fall back to `clone`), then the allowlist
/// that traps everything else.
fn programs(kind: ThreadKind) -> Result<Vec<BpfProgram>, SeccompError> {
    let build = |reason: String| SeccompError::Build {
        kind: kind.name(),
        reason,
    };
    let arch = TargetArch::x86_64;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| build(e.to_string()))?;
    let allow = SeccompFilter::new(
        allowlist(kind).map_err(build)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| build(e.to_string()))?;
    [clone3, allow]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(|e| build(e.to_string())))
        .collect()
}

/// What every thread needs: memory, locks, time, signals, I/O on descriptors it already holds,
/// and ending itself.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    // Positional I/O on held descriptors (protection reads a disk image it was handed).
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    // A capped output file (devices/src/capped_file.rs) rotates through its descriptors: any thread
    // may write the log, and a vCPU thread writes the console.
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_restart_syscall,
    // Installing a further (only narrowing) filter: threads started by a filtered thread.
    libc::SYS_seccomp,
];

/// Sockets on descriptors the thread makes or is given (links, the API).
const NETWORK: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
];

/// Files and devices: building the VM (KVM, TAP, disks), snapshots, the API socket's file.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
    libc::SYS_chmod,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // The private directory an API socket is bound in (api/src/server/mod.rs).
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fallocate,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_sched_setaffinity,
    // Write-protecting guest memory for a checkpoint's copy (`userfault.rs`).
    libc::SYS_userfaultfd,
];

/// The allowlist of `kind`: syscall → rules (an empty list allows it whatever its arguments).
fn allowlist(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut sets: Vec<&[i64]> = vec![COMMON];
    let spawns_threads = match kind {
        ThreadKind::Vcpu => false,
        ThreadKind::Replication => {
            sets.push(NETWORK);
            false
        }
        ThreadKind::Api => {
            sets.push(NETWORK);
            true
        }
        ThreadKind::EventLoop => {
            sets.push(NETWORK);
            sets.push(FILES);
            true
        }
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = sets
        .into_iter()
        .flatten()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // No kind may push input into a terminal it inherited (TIOCSTI) or drive the console
    // (TIOCLINUX). The kernel takes an ioctl's request as 32 bits: the low half is compared.
    let not = |request: u64| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, request)
            .map_err(|e| e.to_string())
    };
    rules.insert(
        libc::SYS_ioctl,
        vec![
            SeccompRule::new(vec![not(libc::TIOCSTI)?, not(libc::TIOCLINUX)?])
                .map_err(|e| e.to_string())?,
        ],
    );
    if spawns_threads {
        // New threads only: `clone` with CLONE_THREAD (never a new process), and `clone3`, which
        // the first program turns into ENOSYS.
        let thread_only = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )
        .map_err(|e| e.to_string())?;
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![thread_only]).map_err(|e| e.to_string())?],
        );
        rules.insert(libc::SYS_clone3, Vec::new());
    }
    Ok(rules)
}

fn install_trap_handler() {
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid start; we set the handler and flags, and the
        // handler only makes async-signal-safe calls (write, _exit).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
        }
    });
}

/// Reports the forbidden call (thread name, syscall number) and ends the process.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The siginfo of SIGSYS holds, after signo/errno/code and padding, the calling address and
    // then the system call's number (kernel's `_sigsys` layout on x86_64).
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; offset 24 is `_syscall`.
    let nr = unsafe { *((info as *const u8).add(24) as *const i32) };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    let mut msg = [0u8; 128];
    let mut len = 0;
    for part in [
        b"ftvmm: seccomp: thread ".as_slice(),
        &name[..name_len],
        b" made forbidden system call ",
    ] {
        msg[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    len += format_decimal(nr, &mut msg[len..]);
    msg[len] = b'\n';
    len += 1;
    // SAFETY: write and _exit are async-signal-safe; msg outlives the call.
    unsafe {
        libc::write(2, msg.as_ptr() as *const libc::c_void, len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Writes `n` in decimal into `out` without allocating; returns the length.
fn format_decimal(n: i32, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 12];
    let mut v = n.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        digits[i] = b'-';
    }
    let len = digits.len() - i;
    out[..len].copy_from_slice(&digits[i..]);
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_narrows_its_creator() {
        for kind in ThreadKind::ALL {
            assert_eq!(programs(kind).unwrap().len(), 2, "{kind:?}");
        }
        let event_loop = allowlist(ThreadKind::EventLoop).unwrap();
        for kind in [ThreadKind::Vcpu, ThreadKind::Replication, ThreadKind::Api] {
            for nr in allowlist(kind).unwrap().keys() {
                assert!(
                    event_loop.contains_key(nr),
                    "{kind:?} allows {nr}, the event loop not"
                );
            }
        }
        let vcpu = allowlist(ThreadKind::Vcpu).unwrap();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_clone,
            libc::SYS_ptrace,
        ] {
            assert!(!vcpu.contains_key(&forbidden), "{forbidden}");
        }
        for kind in ThreadKind::ALL {
            let list = allowlist(kind).unwrap();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
            ] {
                assert!(!list.contains_key(&forbidden), "{kind:?}: {forbidden}");
            }
        }
    }

    #[test]
    fn decimal_formatting() {
        let mut out = [0u8; 12];
        let n = format_decimal(59, &mut out);
        assert_eq!(&out[..n], b"59");
        let n = format_decimal(-7, &mut out);
        assert_eq!(&out[..n], b"-7");
        let n = format_decimal(0, &mut out);
        assert_eq!(&out[..n], b"0");
    }

    /// Runs this test binary again with `FTVMM_SECCOMP_CHILD=<kind>`: the child installs that filter
    /// on a thread and calls `execve` (or, with `FTVMM_SECCOMP_CALL=tiocsti`, pushes a byte into a
    /// terminal with TIOCSTI, the request's upper half set to slip past a 64-bit comparison), which
    /// must end it with EXIT_SECCOMP and a report.
    #[test]
    fn a_forbidden_call_ends_the_process() {
        if let Ok(kind) = std::env::var("FTVMM_SECCOMP_CHILD") {
            let kind = ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == kind)
                .unwrap();
            enable();
            std::thread::Builder::new()
                .name("filtered".into())
                .spawn(move || {
                    apply(kind).unwrap();
                    if std::env::var("FTVMM_SECCOMP_CALL").as_deref() == Ok("tiocsti") {
                        let byte = b'x';
                        // SAFETY: the filter traps the call before the kernel reads `byte`.
                        unsafe {
                            libc::syscall(libc::SYS_ioctl, 0, (1u64 << 32) | libc::TIOCSTI, &byte);
                        }
                        return;
                    }
                    // SAFETY: execve with null arguments only reaches the filter, which traps it.
                    unsafe {
                        libc::syscall(
                            libc::SYS_execve,
                            c"/bin/true".as_ptr(),
                            std::ptr::null::<*const libc::c_char>(),
                            std::ptr::null::<*const libc::c_char>(),
                        );
                    }
                })
                .unwrap()
                .join()
                .unwrap();
            return;
        }
        for (call, number) in [("execve", 59), ("tiocsti", 16)] {
            for kind in ThreadKind::ALL {
                let out = std::process::Command::new(std::env::current_exe().unwrap())
                    .args([
                        "--exact",
                        "seccomp::tests::a_forbidden_call_ends_the_process",
                    ])
                    .env("FTVMM_SECCOMP_CHILD", kind.name())
                    .env("FTVMM_SECCOMP_CALL", call)
                    .output()
                    .unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(EXIT_SECCOMP),
                    "{kind:?} {call}: {stderr}"
                );
                assert!(
                    stderr.contains(&format!(
                        "thread filtered made forbidden system call {number}"
                    )),
                    "{kind:?} {call}: {stderr}"
                );
            }
        }
    }
}
