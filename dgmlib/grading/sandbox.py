"""The sandboxed grading kernel: ipykernel inside bubblewrap, unprivileged even when the grader is root.

The kernelspec's argv is ``python .../dgmlib/grading/sandbox.py -f {connection_file}``, this file run by path so
that the launcher does not import ``dgmlib.grading`` (torch and every dgmlib module, about 2 s) only to exec
bubblewrap. The launcher sets the limits, joins the submission's cgroup if the grader made one, and execs
``bwrap_command``. Where bubblewrap is missing (macOS, Windows), the kernel runs unsandboxed after a loud
warning. Source: the course's issues 12 and 26 ("least privilege, even when the grader is root").

**Who the kernel is.** uid and gid 65534 (``nobody``) in a user namespace of its own, with no capability
at all (effective, permitted, inheritable, ambient and bounding sets empty), in a new session (no
``TIOCSTI`` into the grader's terminal), killed with its parent, in its own network (none: the kernel
talks over Unix sockets), PID, IPC, UTS and cgroup namespaces. When the grader runs as root, bubblewrap's
own ``--unshare-user`` would map the kernel's uid to host root, for which the kernel ignores
``RLIMIT_NPROC`` (a fork bomb would run unchecked). So a root launcher makes the user namespace itself
(``--userns``): uid 0 in it is host root, for bubblewrap's mounts only, and uid 65534 is a host uid of this
submission's own (``host_uid``: ``dgm grade`` gives each submission its own, so that the process limit,
counted per host uid, is per submission); a tiny
entry program (``_ENTER``, trusted code run with nothing but ``CAP_SETUID``, ``CAP_SETGID`` and
``CAP_SETPCAP``) empties the bounding set, drops the supplementary groups, becomes 65534 (which clears
every capability), sets the per-process limits, closes stray descriptors and execs ipykernel. Without
root, bubblewrap maps 65534 to the grader's own uid. The kernel's host uid is then never 0, and writable
for it are only its IPC socket folder (handed to host uid 65534) and its tmpfs folders; the checker's and
the judge's sockets are made connectable (``0666``) in their read-only, private folder.

**System calls.** A seccomp filter (``seccomp_program``, classic BPF written here with ``struct``, handed
to bubblewrap's ``--seccomp`` through a memfd) makes these fail with ``EPERM``, because a kernel that
grades notebooks never needs them and each is a way out of, or around, the sandbox:

- ``mount``, ``umount2``, ``pivot_root``, ``chroot``, ``mount_setattr``, ``move_mount``, ``open_tree``,
  ``fsopen``, ``fsmount``, ``fsconfig``, ``fspick``: change the file system view (unmount the tmpfs over a
  folder, remount ``/`` writable);
- ``unshare``, ``setns``, and ``clone`` with any ``CLONE_NEW*`` flag: new or other namespaces (a new user
  namespace gives back every capability inside it); ``clone3`` fails with ``ENOSYS`` (its flags live in
  memory, out of the filter's reach) so that glibc falls back to ``clone``;
- ``ptrace``, ``process_vm_readv``, ``process_vm_writev``: read or change another process;
- ``bpf``, ``perf_event_open``, ``userfaultfd``: kernel attack surface no notebook needs;
- ``kexec_load``, ``kexec_file_load``, ``init_module``, ``finit_module``, ``delete_module``, ``reboot``,
  ``swapon``, ``swapoff``: the machine's, not the kernel's;
- ``open_by_handle_at``: opens files by handle, around the mount tree (the "shocker" escape);
- ``keyctl``, ``add_key``, ``request_key``: the kernel keyrings are not namespaced.

The filter checks ``seccomp_data.arch`` first (``AUDIT_ARCH_X86_64`` or ``AUDIT_ARCH_AARCH64``, from
``platform.machine()``): a system call of another ABI (32-bit ``int 0x80``) kills the process, and on
x86-64 the x32 ABI (numbers from ``0x40000000``) fails with ``EPERM``.

**What the kernel sees** (``bwrap_command``): read-only ``/usr`` (``/bin``, ``/sbin``, ``/lib*`` as the
same symlinks or folders as outside), the few ``/etc`` files Python and matplotlib need (``ETC_FILES``),
``/sys/devices/system/cpu``, a minimal ``/etc/passwd`` and ``/etc/group``, the Python environment
(``sys.prefix`` and ``sys.base_prefix``, nothing else of their home folders), the installed dgmlib
package folder alone (or, with ``DGM_STRIPPED_LIBRARY``, the copy whose answers are withheld,
``dgmlib.grading.strip``, at the same path), a fresh ``/tmp``, ``/dev/shm`` and working folder (size-capped
tmpfs; the working folder at ``DGM_KERNEL_CWD``, else the launcher's working folder, and the grader never
reads it back), its IPC socket folder (read-write), its connection file and the checker's folder
(read-only), a new ``/dev`` and ``/proc``. Parent folders are made ``0755`` (``_mount``: bubblewrap 0.8
makes them ``0700``), and a course that lies inside something bound is covered by an empty tmpfs. Not the
course (gradebook, solutions, submissions), ``/root``, ``/home``, ``/etc/shadow`` or
any other student's files. The environment is rebuilt (``kernel_environment``): nothing of the
grader's reaches the kernel but ``OMP_NUM_THREADS`` and the ``DGM_*`` settings.

As host uid 65534, the kernel reads of what is mounted only what any user may read (``/usr``, the Python
environment and dgmlib must be world-readable, as installs make them). bubblewrap 0.5 or later is needed;
before 0.7 the tmpfs folders have no size of their own.

**Limits** (settings from the environment that ``dgm grade`` sets, defaults below): CPU time
(``DGM_SANDBOX_CPU_SECONDS``), data segment (``DGM_SANDBOX_MEMORY_MB``; ``RLIMIT_DATA``, as torch reserves
far more address space than it uses), processes and threads (``DGM_SANDBOX_PROCESSES``, ``RLIMIT_NPROC``,
counted per user namespace), the size of one file (``DGM_SANDBOX_FILE_MB``, ``RLIMIT_FSIZE``), no core
files, each tmpfs (``DGM_SANDBOX_TMPFS_MB``), output per stream (``DGM_SANDBOX_OUTPUT_KB``,
``dgmlib.grading.limits.LimitedOutStream``). Where the grader could make one, the kernel also runs in a
cgroup of its own (``DGM_SANDBOX_CGROUP``, ``dgmlib.grading.limits.submission_cgroup``) that caps its
memory, tmpfs pages included, its tasks and its CPU share.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import dgmlib

KERNEL_NAME = "dgm-sandbox"
DEFAULT_CPU_SECONDS = 1200
DEFAULT_MEMORY_MB = 6144
DEFAULT_OUTPUT_KB = 512
DEFAULT_PROCESSES = 256
"""Processes and threads of one kernel (``RLIMIT_NPROC``): ipykernel, torch's threads and a few workers."""
DEFAULT_FILE_MB = 256
"""Largest file the kernel may write (``RLIMIT_FSIZE``)."""
DEFAULT_TMPFS_MB = 512
"""Size of each of the kernel's tmpfs folders: ``/tmp``, ``/dev/shm`` and its working folder."""
KERNEL_UID = 65534
"""uid and gid of the kernel, inside its user namespace and, under a root grader, on the host (``nobody``)."""

ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/fonts",
             "/etc/localtime")
"""What of ``/etc`` the kernel sees: the dynamic loader's cache, fontconfig's settings, the time zone."""
SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")

_PASSWD = f"nobody:x:{KERNEL_UID}:{KERNEL_UID}:nobody:/tmp:/usr/sbin/nologin\n"
_GROUP = f"nogroup:x:{KERNEL_UID}:\n"
_HIDDEN_SETTINGS = frozenset({"DGM_COURSE_ROOT", "DGM_STRIPPED_LIBRARY", "DGM_SANDBOX_HOST_UID"})  # the grader's business, not the kernel's

# ---------------------------------------------------------------- seccomp

DENIED_SYSCALLS = ("mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
                   "fsopen", "fsmount", "fsconfig", "fspick", "unshare", "setns", "ptrace", "process_vm_readv",
                   "process_vm_writev", "bpf", "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load",
                   "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff",
                   "open_by_handle_at", "keyctl", "add_key", "request_key")
"""System calls that fail with ``EPERM`` in the kernel (see the module's docstring for why)."""

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
# <asm/unistd_64.h> on x86-64; <asm-generic/unistd.h> on arm64
_SYSCALL_NUMBERS = {
    "x86_64": (AUDIT_ARCH_X86_64, dict(
        mount=165, umount2=166, pivot_root=155, chroot=161, mount_setattr=442, move_mount=429, open_tree=428,
        fsopen=430, fsmount=432, fsconfig=431, fspick=433, unshare=272, setns=308, ptrace=101,
        process_vm_readv=310, process_vm_writev=311, bpf=321, perf_event_open=298, userfaultfd=323,
        kexec_load=246, kexec_file_load=320, init_module=175, finit_module=313, delete_module=176, reboot=169,
        swapon=167, swapoff=168, open_by_handle_at=304, keyctl=250, add_key=248, request_key=249,
        clone=56, clone3=435)),
    "aarch64": (AUDIT_ARCH_AARCH64, dict(
        mount=40, umount2=39, pivot_root=41, chroot=51, mount_setattr=442, move_mount=429, open_tree=428,
        fsopen=430, fsmount=432, fsconfig=431, fspick=433, unshare=97, setns=268, ptrace=117,
        process_vm_readv=270, process_vm_writev=271, bpf=280, perf_event_open=241, userfaultfd=282,
        kexec_load=104, kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, reboot=142,
        swapon=224, swapoff=225, open_by_handle_at=265, keyctl=219, add_key=217, request_key=218,
        clone=220, clone3=435)),
}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
_X32_SYSCALL_BIT = 0x40000000
_EPERM, _ENOSYS = 1, 38
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|J*|K, BPF_RET|K
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (little-endian: the low half of args[0])


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter


def seccomp_program(machine: str | None = None) -> bytes:
    """The seccomp filter of the kernel: classic BPF, as bubblewrap's ``--seccomp`` reads it.

    ``DENIED_SYSCALLS`` and ``clone`` with a ``CLONE_NEW*`` flag fail with ``EPERM``, ``clone3`` with
    ``ENOSYS``, the x32 ABI with ``EPERM``; a system call of another architecture kills the process;
    everything else is allowed.

    Args:
        machine: ``platform.machine()`` by default (``x86_64`` or ``aarch64``).

    Raises:
        RuntimeError: on another architecture (grading needs a filter written for it).
    """
    machine = machine or platform.machine()
    if _MACHINES.get(machine.lower()) is None:
        raise RuntimeError(f"no seccomp filter for {machine}: the sandbox supports x86_64 and aarch64")
    arch, numbers = _SYSCALL_NUMBERS[_MACHINES[machine.lower()]]
    deny = _RET_ERRNO | _EPERM
    prog = [_insn(_LD_W_ABS, _ARCH), _insn(_JEQ, arch, jt=1), _insn(_RET, _RET_KILL_PROCESS),
            _insn(_LD_W_ABS, _NR)]
    if arch == AUDIT_ARCH_X86_64:
        prog += [_insn(_JGE, _X32_SYSCALL_BIT, jf=1), _insn(_RET, deny)]
    for name in DENIED_SYSCALLS:
        prog += [_insn(_JEQ, numbers[name], jf=1), _insn(_RET, deny)]
    prog += [_insn(_JEQ, numbers["clone3"], jf=1), _insn(_RET, _RET_ERRNO | _ENOSYS),
             _insn(_JEQ, numbers["clone"], jf=3), _insn(_LD_W_ABS, _ARG0),  # clone(flags, ...): flags first
             _insn(_JSET, _CLONE_NAMESPACES, jf=1), _insn(_RET, deny),
             _insn(_RET, _RET_ALLOW)]
    return b"".join(prog)


# ---------------------------------------------------------------- the entry program inside the sandbox

# Run by the sandbox's python with -I -S: ARGV = uid processes file_bytes command...
_ENTER = r"""
import ctypes, os, resource, sys
uid, processes, file_bytes, command = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
if os.getuid() == 0:  # root of the kernel's own user namespace (a root grader): become uid 65534, drop every cap
    libc = ctypes.CDLL(None, use_errno=True)
    def check(result, what):
        if result != 0:
            raise OSError(ctypes.get_errno(), what)
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last_cap = int(fh.read())
    for cap in range(last_cap + 1):
        check(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    check(libc.prctl(47, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid,) * 4:
    raise SystemExit(f"the kernel must run as {uid}, not {os.getuid()}")
for limit, value in ((resource.RLIMIT_NPROC, processes), (resource.RLIMIT_FSIZE, file_bytes),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
for fd in [int(name) for name in os.listdir("/proc/self/fd")]:  # bubblewrap leaks the --userns descriptor
    if fd > 2:
        try:
            os.close(fd)
        except OSError:
            pass
os.execv(command[0], command)
"""


class UnsandboxedWarning(RuntimeWarning):
    """Grading without bubblewrap: student code can reach every file the grader can."""


def bwrap_path() -> str | None:
    """Path of a working ``bwrap`` executable, or None."""
    return shutil.which("bwrap")


def bwrap_version(bwrap: str = "bwrap") -> tuple[int, ...]:
    """bubblewrap's version, e.g. ``(0, 8, 0)``; ``(0,)`` if it does not say."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    found = re.search(r"(\d+(?:\.\d+)+)", out)
    return tuple(int(p) for p in found.group(1).split(".")) if found else (0,)


def write_kernelspec(directory: Path) -> Path:
    """Write the ``dgm-sandbox`` kernelspec under ``directory/kernels/``; return ``directory``.

    Put ``directory`` on ``JUPYTER_PATH`` so that ``--Execute.kernel_name=dgm-sandbox`` finds it.
    """
    spec_dir = Path(directory) / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, str(Path(__file__).resolve()), "-f", "{connection_file}"],  # by path: see the top
        "display_name": "Python 3 (DGM sandboxed grading)",
        "language": "python",
        # bwrap does not pass SIGINT into the PID namespace: interrupt with a message instead,
        # which ipykernel turns into a KeyboardInterrupt from inside the sandbox.
        "interrupt_mode": "message",
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return Path(directory)


def setting(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """The integer setting ``DGM_SANDBOX_<name>`` of the environment, else ``default``.

    Raises:
        ValueError: if it is set but is not a positive integer.
    """
    raw = (os.environ if environ is None else environ).get(f"DGM_SANDBOX_{name}", "").strip()
    if not raw:
        return default
    value = int(raw)
    if value <= 0:
        raise ValueError(f"DGM_SANDBOX_{name} must be a positive integer, not {raw!r}")
    return value


def kernel_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kernel's whole environment: a minimal ``PATH``, ``HOME`` and the caches in ``/tmp``, ``C.UTF-8``,
    no user site, the launcher's ``OMP_NUM_THREADS`` and its ``DGM_*`` settings (but ``DGM_COURSE_ROOT``
    and ``DGM_STRIPPED_LIBRARY``, which are the grader's); nothing else of the launcher's."""
    environ = os.environ if environ is None else environ
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp", "IPYTHONDIR": "/tmp/.ipython",
           "MPLCONFIGDIR": "/tmp/.matplotlib", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
    if "OMP_NUM_THREADS" in environ:
        env["OMP_NUM_THREADS"] = environ["OMP_NUM_THREADS"]
    env.update({k: v for k, v in environ.items() if k.startswith("DGM_") and k not in _HIDDEN_SETTINGS})
    return env


def _memfd(name: str, data: bytes) -> int:
    """An inheritable memfd holding ``data``, read from its start (bubblewrap reads it to the end)."""
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    return fd


_UNSHARE = ("import ctypes, os, sys\n"
            "ok = ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0\n"  # CLONE_NEWUSER
            "os.write(1, b'1' if ok else b'0')\n"
            "sys.stdin.buffer.read()\n")


def host_uid(environ: Mapping[str, str] | None = None) -> int:
    """The host uid of this submission's kernel under a root grader: ``DGM_SANDBOX_HOST_UID`` (``dgm grade``
    gives each submission of a run its own, so that ``RLIMIT_NPROC``, which counts per host uid, is per
    submission: one kernel's fork bomb cannot starve a classmate graded beside it), else ``KERNEL_UID``.

    Raises:
        ValueError: if the setting is not a uid above 1000 and below 2**32 - 1.
    """
    environ = os.environ if environ is None else environ
    value = int(environ.get("DGM_SANDBOX_HOST_UID", KERNEL_UID))
    if not 1000 < value < 2**32 - 1:
        raise ValueError(f"DGM_SANDBOX_HOST_UID must be a uid above 1000 (an unprivileged one), not {value}")
    return value


def _kernel_userns(uid: int = KERNEL_UID) -> int:
    """An inheritable descriptor of a new user namespace where uid and gid 0 are root's (for bubblewrap's
    mounts) and ``KERNEL_UID`` is host ``uid`` (the kernel's). Only root can write such maps.

    Raises:
        OSError: if the namespace cannot be made.
    """
    helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _UNSHARE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        if helper.stdout.read(1) != b"1":
            raise OSError("cannot create a user namespace for the kernel")
        mapping = f"0 0 1\n{KERNEL_UID} {uid} 1\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as fh:
                fh.write(mapping)
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY)
    finally:
        helper.stdin.close()
        helper.stdout.close()
        helper.wait()
    os.set_inheritable(fd, True)
    return fd


def _hand_to_kernel(socket_dir: str, socket_name: str, sockets: list[str], uid: int = KERNEL_UID) -> None:
    """Under a root grader: give the kernel's host uid its socket folder and let it connect to the grader's
    sockets (their folder stays read-only in the sandbox and private to the grader outside).

    Raises:
        ValueError: if the socket folder holds anything but this kernel's sockets (it must be private).
    """
    strangers = [n for n in os.listdir(socket_dir) if not n.startswith(socket_name)]
    if strangers:
        raise ValueError(f"the kernel's socket folder {socket_dir} must be its own; it holds {strangers[:3]}")
    os.chown(socket_dir, uid, uid)
    for path in sockets:
        try:
            if Path(path).is_socket():
                os.chmod(path, 0o666)
        except OSError:
            pass


def _mount(kind: str, source: str, dest: str) -> list[str]:
    """A bind of ``source`` at ``dest``, its parents made ``0755`` first (bubblewrap 0.8 makes them ``0700``,
    which only root could cross)."""
    parent = os.path.dirname(dest)
    return (["--dir", parent] if parent != "/" else []) + [kind, source, dest]


def _covered(path: Path, mounts: list[Path]) -> bool:
    return any(path == m or m in path.parents for m in mounts)


def bwrap_command(connection_file: str, kernel_args: list[str], cwd: str, course_root: str | None,
                  bwrap: str = "bwrap", checker_socket: str | None = None, *, fds: list[int] | None = None,
                  command: list[str] | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The bubblewrap command line that runs ipykernel for ``connection_file`` in a throw-away ``cwd``.

    Opens the descriptors that bubblewrap reads (the seccomp filter, a minimal ``/etc/passwd`` and
    ``/etc/group``, the connection file, and under a root grader the kernel's user namespace), inheritable:
    exec the command, or pass them to ``subprocess`` with ``pass_fds``, then close them. Under a root
    grader it also hands the socket folder to host uid ``KERNEL_UID`` and makes ``checker_socket`` and the
    judge's socket (``DGM_JUDGE_SOCKET``) connectable. Order matters: later mounts go on top of earlier ones.

    Args:
        connection_file: the kernel's connection file (``ipc`` transport, absolute socket path).
        kernel_args: ipykernel's other arguments.
        cwd: the kernel's working folder, a fresh tmpfs at that path inside (never read back).
        course_root: the course; hidden by a tmpfs should it lie inside something the kernel sees.
        bwrap: the bubblewrap executable.
        checker_socket: the grader's checker socket; its folder is mounted read-only (so that the kernel
            cannot move the socket and put a relay of its own in its place).
        fds: the opened descriptors are appended to this list.
        command: run this in the sandbox instead of ipykernel (the tests' probes).
        environ: the launcher's environment (``os.environ``): settings, ``DGM_STRIPPED_LIBRARY``.

    Raises:
        ValueError: if the connection file does not use the ``ipc`` transport (a kernel without a
            network cannot be reached over TCP) or names a relative socket path, if the checker's socket
            shares the kernel's socket folder, or if that folder holds anything else.
        FileNotFoundError: if ``DGM_STRIPPED_LIBRARY`` is set but holds no ``dgmlib`` folder.
        RuntimeError: on a machine the seccomp filter does not know, or with bubblewrap older than 0.5
            (``--clearenv``, ``--perms``); before 0.7 the tmpfs folders have no size of their own (``--size``).
        OSError: if the kernel's user namespace cannot be made.
    """
    environ = os.environ if environ is None else environ
    raw = Path(connection_file).read_bytes()
    info = json.loads(raw)
    if info.get("transport") != "ipc" or not os.path.isabs(info.get("ip", "")):
        raise ValueError("the sandboxed kernel needs --KernelManager.transport=ipc and an absolute "
                         "--KernelManager.ip (dgm grade sets both)")
    socket_dir = str(Path(info["ip"]).parent)
    checker_dir = str(Path(checker_socket).parent) if checker_socket else None
    if checker_dir == socket_dir:
        raise ValueError("the checker's socket needs a folder of its own, apart from the kernel's sockets")
    stripped = environ.get("DGM_STRIPPED_LIBRARY")
    if stripped and not (Path(stripped) / "dgmlib" / "__init__.py").is_file():
        raise FileNotFoundError(f"DGM_STRIPPED_LIBRARY={stripped} holds no dgmlib package")
    filter_program = seccomp_program()
    connection_file = str(Path(connection_file).resolve())
    cwd = os.path.abspath(cwd)
    version = bwrap_version(bwrap)
    if version < (0, 5):
        raise RuntimeError(f"the sandbox needs bubblewrap 0.5 or later, not {'.'.join(map(str, version))}")
    size = ["--size", str(setting("TMPFS_MB", DEFAULT_TMPFS_MB, environ) * 2**20)] if version >= (0, 7) else []
    opened = fds if fds is not None else []
    root = os.geteuid() == 0
    if root:
        uid = host_uid(environ)
        _hand_to_kernel(socket_dir, Path(info["ip"]).name,
                        [p for p in (checker_socket, environ.get("DGM_JUDGE_SOCKET")) if p], uid)
        opened.append(_kernel_userns(uid))
        cmd = [bwrap, "--userns", str(opened[-1]), "--cap-drop", "ALL",
               *(a for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP") for a in ("--cap-add", cap))]
    else:
        cmd = [bwrap, "--unshare-user", "--uid", str(KERNEL_UID), "--gid", str(KERNEL_UID), "--cap-drop", "ALL"]
    cmd += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--new-session", "--die-with-parent"]
    opened.append(_memfd("dgm-seccomp", filter_program))
    cmd += ["--seccomp", str(opened[-1])]
    # the system, read-only
    seen: list[Path] = []
    for top in SYSTEM_FOLDERS:
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
            seen.append(Path(top))
    for path in ETC_FILES:
        if os.path.exists(path):
            cmd += _mount("--ro-bind", path, path)
    cmd += _mount("--ro-bind-try", "/sys/devices/system/cpu", "/sys/devices/system/cpu")  # torch's cpuinfo reads it
    for path, text in (("/etc/passwd", _PASSWD), ("/etc/group", _GROUP)):
        opened.append(_memfd("dgm-etc", text.encode()))
        cmd += ["--perms", "0444", "--ro-bind-data", str(opened[-1]), path]
    cmd += ["--perms", "1777", *size, "--tmpfs", "/tmp"]
    # the Python environment and dgmlib, read-only: nothing else of the folders they live in
    prefixes = sorted({Path(p) for p in (sys.prefix, sys.base_prefix)} |
                      {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)})
    for path in prefixes:
        if not _covered(path, seen):
            cmd += _mount("--ro-bind", str(path), str(path))
            seen.append(path)
    if course_root and _covered(Path(course_root).resolve(), seen):
        cmd += ["--tmpfs", str(Path(course_root).resolve())]
    package = Path(dgmlib.__file__).parent
    source = Path(stripped) / "dgmlib" if stripped else package
    for path in sorted({package.absolute(), package.resolve()}):
        if stripped or not _covered(path, seen):
            cmd += _mount("--ro-bind", str(source), str(path))
    # what is the kernel's own: its working folder, its sockets (read-write), the grader's sockets (read-only),
    # its connection file
    cmd += ["--perms", "1777", *size, "--tmpfs", cwd]
    if checker_dir:
        cmd += _mount("--ro-bind", checker_dir, checker_dir)
    opened.append(_memfd("dgm-connection", raw))
    cmd += [*_mount("--bind", socket_dir, socket_dir), "--perms", "0444", "--ro-bind-data", str(opened[-1]),
            connection_file, "--dev", "/dev",
            "--perms", "1777", *size, "--tmpfs", "/dev/shm",  # multiprocessing's semaphores (DataLoader)
            "--proc", "/proc", "--clearenv"]
    for key, value in sorted(kernel_environment(environ).items()):
        cmd += ["--setenv", key, value]
    cmd += ["--chdir", cwd, sys.executable, "-I", "-S", "-c", _ENTER, str(KERNEL_UID),
            str(setting("PROCESSES", DEFAULT_PROCESSES, environ)),
            str(setting("FILE_MB", DEFAULT_FILE_MB, environ) * 2**20),
            *(command or _kernel_command(connection_file, kernel_args))]
    return cmd


def _kernel_command(connection_file: str, kernel_args: list[str]) -> list[str]:
    """ipykernel with the output-limiting stream, sandboxed or not."""
    return [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file,
            "--IPKernelApp.outstream_class=dgmlib.grading.limits.LimitedOutStream", *kernel_args]


def join_cgroup(path: str | None) -> bool:
    """Move this process (and so the kernel it execs) into the cgroup ``path``; False if it cannot."""
    if not path:
        return False
    try:
        with open(Path(path) / "cgroup.procs", "w") as fh:
            fh.write(str(os.getpid()))
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Kernel launcher: apply the limits, join the submission's cgroup, then exec ipykernel inside bubblewrap."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-f" not in argv:
        raise SystemExit("usage: python sandbox.py -f CONNECTION_FILE [kernel args]")
    i = argv.index("-f")
    connection_file, kernel_args = argv[i + 1], argv[:i] + argv[i + 2:]
    cpu = setting("CPU_SECONDS", DEFAULT_CPU_SECONDS)
    mem = setting("MEMORY_MB", DEFAULT_MEMORY_MB) * 2**20
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cwd = os.environ.get("DGM_KERNEL_CWD") or os.getcwd()
    bwrap = bwrap_path()
    if bwrap is None:
        warnings.warn("bubblewrap (bwrap) is not installed: this submission runs WITHOUT a sandbox and can "
                      "read, change or delete every file the grader can. Grade on Linux with bubblewrap "
                      "(apt-get install bubblewrap) or on JupyterHub.", UnsandboxedWarning, stacklevel=1)
        if os.path.isdir(cwd):
            os.chdir(cwd)
        cmd = _kernel_command(connection_file, kernel_args)
    else:
        join_cgroup(os.environ.get("DGM_SANDBOX_CGROUP"))  # where there is none, the rlimits still hold
        cmd = bwrap_command(connection_file, kernel_args, cwd, os.environ.get("DGM_COURSE_ROOT"), bwrap,
                            os.environ.get("DGM_CHECKER_SOCKET"))
    # The kernel's own stdout/stderr (not the notebook's outputs) are discarded: a flood there
    # must not fill the grader's pipes.
    sink = os.open(os.environ.get("DGM_SANDBOX_KERNEL_LOG", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
