//! A one-vCPU KVM guest whose vCPU halts and is woken on command: the
//! guarded CPU's workload in the vCPU halt/wake pattern.
//!
//! Why not QEMU: on this lab (kvm-pvm) a stock guest kernel does not boot, a
//! `-S` guest's vCPU never runs, and SeaBIOS halts and is woken ~18 times a
//! second by its timer: no load to measure. So the bench runs its own tiny
//! VMM in a child process: it creates a VM with 64 KiB of memory holding
//! `hlt; jmp back` (real mode) and one vCPU, whose thread (named `CPU 0/KVM`,
//! as QEMU's `debug-threads=on` names it, and bound to the guarded CPU)
//! loops: block reading one byte from stdin (the vCPU is halted: the CPU goes
//! idle), `ioctl(KVM_RUN)` (the guest resumes after its `hlt`, jumps back and
//! halts again: a real guest entry and a HLT exit, without an in-kernel
//! irqchip HLT returns to user space), write one byte to stdout (the guest's
//! "I/O" wakes the other side). The bench's side, on the housekeeping CPU,
//! writes a byte and reads the answer: one round trip is one wake-up of the
//! vCPU from another CPU, one guest entry and one halt — what a vCPU doing
//! interrupt-driven I/O does — and the guarded CPU alternates owner and idle.
//!
//! The daemon sees a KVM guest as it sees QEMU: a process whose argv[0] is
//! `qemu-system-*` holding `anon_inode:kvm-vm` and `anon_inode:kvm-vcpu:0`,
//! its vCPU thread named `CPU 0/KVM` and listed in KVM's debugfs
//! (`vcpu0/pid`, set by the first KVM_RUN). With one guarded CPU and this
//! single vCPU, the daemon's plan makes that thread the owner of CPU 1 and
//! measures its waits, as for any guest's vCPU.
use std::{
    io::{Read as _, Write as _},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::libc;

/// argv[0] of the child: pinguard (and operators) take `qemu-system-*` for QEMU.
pub const ARGV0: &str = "qemu-system-pinguard-bench";
/// The hidden `cargo xtask` subcommand the child runs.
pub const SUBCOMMAND: &str = "bench-vcpu-guest";
/// The name QEMU gives vCPU 0's thread with `-name ...,debug-threads=on`.
const VCPU_THREAD: &str = "CPU 0/KVM";
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The child: a running guest with its vCPU thread pinned to a CPU.
pub struct VcpuGuest {
    child: Option<Child>,
    to: ChildStdin,
    from: ChildStdout,
    pub vcpu_tid: u32,
}

impl VcpuGuest {
    /// Starts the guest (`-name NAME`) with its vCPU thread bound to `cpu`;
    /// returns once the vCPU has entered the guest and halted once.
    pub fn start(name: &str, cpu: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("finding our own executable")?;
        let mut cmd = Command::new(&exe);
        cmd.arg0(ARGV0)
            .arg(SUBCOMMAND)
            .arg("--cpu")
            .arg(cpu.to_string())
            .arg("--")
            // Read by pinguard's QEMU command-line parser: the guest's name.
            .arg("-name")
            .arg(format!("{name},debug-threads=on"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Ctrl-C reaches only the bench, which stops this child in order.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the bench's KVM guest ({})", exe.display()))?;
        let to = child.stdin.take().context("guest stdin")?;
        let from = child.stdout.take().context("guest stdout")?;
        let mut me = Self {
            child: Some(child),
            to,
            from,
            vcpu_tid: 0,
        };
        // The child writes one byte once its vCPU ran; a dead child gives EOF.
        let (tx, rx) = std::sync::mpsc::channel();
        let mut from = dup(&me.from)?;
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let _ = tx.send(from.read_exact(&mut b).map(|()| b[0]));
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(b'R')) => {}
            Ok(Ok(b)) => bail!("the bench's KVM guest sent {b:#x} instead of its ready byte"),
            Ok(Err(e)) => bail!(
                "the bench's KVM guest exited before its vCPU ran ({e}): see its stderr above"
            ),
            Err(_) => bail!(
                "the bench's KVM guest did not start within {}s",
                START_TIMEOUT.as_secs()
            ),
        }
        let pid = me.pid();
        me.vcpu_tid = testkit::host::tids(pid)
            .into_iter()
            .find(|&t| testkit::host::comm(pid, t).as_deref() == Some(VCPU_THREAD))
            .with_context(|| {
                format!("the bench's KVM guest (pid {pid}) has no {VCPU_THREAD:?} thread")
            })?;
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `n` wake-ups of the vCPU, each answered after a guest entry and halt:
    /// their duration. Run it from the housekeeping CPU.
    pub fn round_trips(&mut self, n: u64) -> Result<Duration> {
        let mut b = [1u8; 1];
        let t = Instant::now();
        for _ in 0..n {
            self.to.write_all(&b).context("waking the guest's vCPU")?;
            self.from
                .read_exact(&mut b)
                .context("reading the guest's vCPU answer (did it exit? see its stderr)")?;
        }
        Ok(t.elapsed())
    }
}

impl Drop for VcpuGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Its vCPU exits on EOF too, but do not count on a wedged guest.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A second handle on the child's stdout, for the ready byte read by a
/// thread with a timeout (the main handle stays with the guest).
fn dup(out: &ChildStdout) -> Result<std::fs::File> {
    use std::os::fd::AsFd as _;
    let fd = out
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the guest's stdout")?;
    Ok(std::fs::File::from(fd))
}

/// The child's side: `cargo xtask bench-vcpu-guest --cpu N -- -name X`.
#[derive(clap::Args)]
pub struct GuestArgs {
    /// The CPU the vCPU thread is bound to.
    #[arg(long)]
    cpu: usize,
    /// QEMU-style options, read by pinguard only (`-name NAME,debug-threads=on`).
    #[arg(last = true, allow_hyphen_values = true)]
    qemu_style: Vec<String>,
}

pub fn guest_main(args: &GuestArgs) -> Result<()> {
    // Exit with the bench even if it is killed: stdin's EOF ends the vCPU
    // loop; this covers a bench killed while the vCPU is in KVM_RUN.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let vm = kvm::Vm::new().context("creating the KVM VM")?;
    let cpu = args.cpu;
    let vcpu = std::thread::Builder::new()
        .name(VCPU_THREAD.into())
        .spawn(move || -> Result<()> {
            testkit::threads::pin_current_thread(cpu)
                .with_context(|| format!("binding the vCPU thread to CPU {cpu}"))?;
            // Real-time, as vCPUs of latency-sensitive guests are (pinguard's
            // `vcpu_sched`): a wake-up is not held up by other people's
            // compilers that share this lab's CPUs (see whole::Fifo).
            let param = libc::sched_param {
                sched_priority: super::whole::LOAD_FIFO_PRIORITY,
            };
            // SAFETY: plain syscall on the calling thread.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                bail!(
                    "making the vCPU thread SCHED_FIFO: {}",
                    std::io::Error::last_os_error()
                );
            }
            let mut vcpu = vm.vcpu().context("creating vCPU 0")?;
            vcpu.run_to_halt().context("the first KVM_RUN")?;
            let mut stdin = std::io::stdin().lock();
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(b"R")?;
            stdout.flush()?;
            let mut b = [0u8; 1];
            loop {
                match stdin.read(&mut b) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                }
                vcpu.run_to_halt()?;
                stdout.write_all(&b)?;
                stdout.flush()?;
            }
        })
        .context("spawning the vCPU thread")?;
    match vcpu.join() {
        Ok(r) => r,
        Err(_) => bail!("the vCPU thread panicked"),
    }
}

/// The few KVM ioctls the guest needs (include/uapi/linux/kvm.h, x86).
mod kvm {
    use std::{
        fs::File,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    use anyhow::{Context as _, Result, bail};
    use nix::libc;

    const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
    const KVM_CREATE_VM: libc::c_ulong = 0xae01;
    const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xae04;
    const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
    /// _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region) (32 bytes).
    const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_ae46;
    /// _IOR/_IOW(KVMIO, 0x83/0x84, struct kvm_sregs) (312 bytes).
    const KVM_GET_SREGS: libc::c_ulong = 0x8138_ae83;
    const KVM_SET_SREGS: libc::c_ulong = 0x4138_ae84;
    /// _IOW(KVMIO, 0x82, struct kvm_regs) (144 bytes).
    const KVM_SET_REGS: libc::c_ulong = 0x4090_ae82;
    const KVM_RUN: libc::c_ulong = 0xae80;
    const KVM_EXIT_HLT: u32 = 5;
    const SREGS_SIZE: usize = 312;
    const REGS_SIZE: usize = 144;
    const MEM_SIZE: usize = 0x10000;
    /// Where the code sits (guest physical = real-mode linear address).
    const CODE_AT: usize = 0x1000;
    /// `hlt; jmp $-3`: halt, and after each resume jump back to the hlt.
    const CODE: [u8; 3] = [0xf4, 0xeb, 0xfd];

    fn ioctl(fd: i32, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<i32> {
        // SAFETY: every request here takes an integer or a pointer to a
        // buffer of the size its number encodes, which the callers pass.
        let r = unsafe { libc::ioctl(fd, req, arg) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn owned(fd: i32) -> OwnedFd {
        // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    pub struct Vm {
        _kvm: File,
        vm: OwnedFd,
        mmap_size: usize,
        /// Guest memory (leaked for the process's life: the VM maps it).
        _mem: *mut libc::c_void,
    }

    // The raw pointer is only kept to document the mapping's lifetime.
    unsafe impl Send for Vm {}

    pub struct Vcpu {
        fd: OwnedFd,
        run: *mut libc::c_void,
    }

    impl Vm {
        pub fn new() -> Result<Self> {
            let kvm = File::options()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .context("opening /dev/kvm")?;
            let k = kvm.as_raw_fd();
            let api = ioctl(k, KVM_GET_API_VERSION, 0).context("KVM_GET_API_VERSION")?;
            if api != 12 {
                bail!("KVM API version {api}, expected 12");
            }
            let vm = owned(ioctl(k, KVM_CREATE_VM, 0).context("KVM_CREATE_VM")?);
            let mmap_size =
                ioctl(k, KVM_GET_VCPU_MMAP_SIZE, 0).context("KVM_GET_VCPU_MMAP_SIZE")? as usize;
            // SAFETY: a fresh anonymous private mapping.
            let mem = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MEM_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if mem == libc::MAP_FAILED {
                bail!("mmap of guest memory: {}", std::io::Error::last_os_error());
            }
            // SAFETY: CODE_AT + CODE.len() < MEM_SIZE, inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    CODE.as_ptr(),
                    mem.cast::<u8>().add(CODE_AT),
                    CODE.len(),
                )
            };
            // struct kvm_userspace_memory_region { u32 slot, flags; u64 gpa, size, uaddr; }
            let region: [u64; 4] = [0, 0, MEM_SIZE as u64, mem as u64];
            ioctl(
                vm.as_raw_fd(),
                KVM_SET_USER_MEMORY_REGION,
                region.as_ptr() as libc::c_ulong,
            )
            .context("KVM_SET_USER_MEMORY_REGION")?;
            Ok(Self {
                _kvm: kvm,
                vm,
                mmap_size,
                _mem: mem,
            })
        }

        /// vCPU 0, in real mode at CODE_AT.
        pub fn vcpu(&self) -> Result<Vcpu> {
            let fd =
                owned(ioctl(self.vm.as_raw_fd(), KVM_CREATE_VCPU, 0).context("KVM_CREATE_VCPU")?);
            // SAFETY: mapping the vCPU's kvm_run area as the KVM API documents.
            let run = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    self.mmap_size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if run == libc::MAP_FAILED {
                bail!("mmap of kvm_run: {}", std::io::Error::last_os_error());
            }
            let mut sregs = [0u8; SREGS_SIZE];
            ioctl(
                fd.as_raw_fd(),
                KVM_GET_SREGS,
                sregs.as_mut_ptr() as libc::c_ulong,
            )
            .context("KVM_GET_SREGS")?;
            // sregs starts with cs: { u64 base; u32 limit; u16 selector; ... }.
            sregs[0..8].copy_from_slice(&0u64.to_ne_bytes());
            sregs[12..14].copy_from_slice(&0u16.to_ne_bytes());
            ioctl(
                fd.as_raw_fd(),
                KVM_SET_SREGS,
                sregs.as_ptr() as libc::c_ulong,
            )
            .context("KVM_SET_SREGS")?;
            // kvm_regs: 16 GPRs, then rip at 128 and rflags at 136 (bit 1 is reserved, set).
            let mut regs = [0u8; REGS_SIZE];
            regs[128..136].copy_from_slice(&(CODE_AT as u64).to_ne_bytes());
            regs[136..144].copy_from_slice(&2u64.to_ne_bytes());
            ioctl(fd.as_raw_fd(), KVM_SET_REGS, regs.as_ptr() as libc::c_ulong)
                .context("KVM_SET_REGS")?;
            Ok(Vcpu { fd, run })
        }
    }

    impl Vcpu {
        /// Enters the guest until it halts (KVM_EXIT_HLT).
        pub fn run_to_halt(&mut self) -> Result<()> {
            loop {
                match ioctl(self.fd.as_raw_fd(), KVM_RUN, 0) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e).context("KVM_RUN"),
                }
                // struct kvm_run: u8 request_interrupt_window, immediate_exit, pad[6]; u32 exit_reason.
                // SAFETY: the kvm_run mapping is at least a page; offset 8 is exit_reason.
                let reason = unsafe { self.run.cast::<u8>().add(8).cast::<u32>().read_volatile() };
                if reason == KVM_EXIT_HLT {
                    return Ok(());
                }
                bail!("KVM_RUN exited with reason {reason}, expected HLT ({KVM_EXIT_HLT})");
            }
        }
    }
}
