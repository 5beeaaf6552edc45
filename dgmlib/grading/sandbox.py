"""The sandboxed grading kernel: ipykernel inside bubblewrap.

Each submission's kernel sees the whole file system read-only, an empty tmpfs over the course
root (so the gradebook and the other students' folders are unreachable), and, writable, only its own
scratch folder (the kernel's working directory) and its private runtime folder for the kernel's
IPC sockets. It has no network (its own network namespace; the kernel talks over Unix sockets),
its own PID namespace, and limits on CPU time, memory and output size.

The kernelspec's argv is ``python .../dgmlib/grading/sandbox.py -f {connection_file}``, this file run by path so
that the launcher does not import ``dgmlib.grading`` (torch and every dgmlib module, about 2 s) only to exec
bubblewrap; settings come
from the environment that ``dgm grade`` sets: ``DGM_COURSE_ROOT``, ``DGM_SANDBOX_CPU_SECONDS``,
``DGM_SANDBOX_MEMORY_MB``, ``DGM_SANDBOX_OUTPUT_KB``. Where bubblewrap is missing (macOS,
Windows), the kernel runs unsandboxed after a loud warning.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import warnings
from pathlib import Path

import dgmlib

KERNEL_NAME = "dgm-sandbox"
DEFAULT_CPU_SECONDS = 1200
DEFAULT_MEMORY_MB = 6144
DEFAULT_OUTPUT_KB = 512


class UnsandboxedWarning(RuntimeWarning):
    """Grading without bubblewrap: student code can reach every file the grader can."""


def bwrap_path() -> str | None:
    """Path of a working ``bwrap`` executable, or None."""
    return shutil.which("bwrap")


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


def bwrap_command(connection_file: str, kernel_args: list[str], cwd: str, course_root: str | None,
                  bwrap: str = "bwrap", checker_socket: str | None = None) -> list[str]:
    """The bubblewrap command line that runs ipykernel for ``connection_file`` in ``cwd``.

    Order matters: later mounts go on top of earlier ones. The course root is hidden, then the
    submission's folder, the installed dgmlib (if it lives in the course root), the connection
    file (read-only), the folder of the kernel's IPC sockets and, read-only, the folder of the
    grader's checker socket (``checker_socket``; read-only so that the kernel cannot move the socket
    and put a relay of its own in its place) come back.

    Raises:
        ValueError: if the connection file does not use the ``ipc`` transport (a kernel without a
            network cannot be reached over TCP) or names a relative socket path.
    """
    info = json.loads(Path(connection_file).read_text())
    if info.get("transport") != "ipc" or not os.path.isabs(info.get("ip", "")):
        raise ValueError("the sandboxed kernel needs --KernelManager.transport=ipc and an absolute "
                         "--KernelManager.ip (dgm grade sets both)")
    socket_dir = str(Path(info["ip"]).parent)
    connection_file = str(Path(connection_file).resolve())
    hidden = [Path("/tmp")] + ([Path(course_root).resolve()] if course_root else [])
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        cmd += ["--tmpfs", str(path)]
    # What Python needs and the hiding covered (an editable dgmlib in a clone under /tmp or in the
    # course, a virtual environment there) comes back read-only; never an ancestor of a hidden folder.
    needed = {Path(dgmlib.__file__).resolve().parent, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    for path in sorted(needed):
        covered = any(h == path or h in path.parents for h in hidden)
        uncovers = any(path == h or path in h.parents for h in hidden)
        if covered and not uncovers:
            cmd += ["--ro-bind", str(path), str(path)]
    if checker_socket:
        checker_dir = str(Path(checker_socket).parent)
        if checker_dir == socket_dir:
            raise ValueError("the checker's socket needs a folder of its own, apart from the kernel's sockets")
        cmd += ["--ro-bind", checker_dir, checker_dir]
    cmd += ["--bind", cwd, cwd, "--bind", socket_dir, socket_dir, "--ro-bind", connection_file, connection_file,
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--unsetenv", "JPY_PARENT_PID",  # its pid means nothing in the new PID namespace
            "--setenv", "HOME", "/tmp", "--setenv", "IPYTHONDIR", "/tmp/.ipython",
            "--setenv", "MPLCONFIGDIR", "/tmp/.matplotlib", "--chdir", cwd,
            *_kernel_command(connection_file, kernel_args)]
    return cmd


def _kernel_command(connection_file: str, kernel_args: list[str]) -> list[str]:
    """ipykernel with the output-limiting stream, sandboxed or not."""
    return [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file,
            "--IPKernelApp.outstream_class=dgmlib.grading.limits.LimitedOutStream", *kernel_args]


def main(argv: list[str] | None = None) -> None:
    """Kernel launcher: apply the limits, then exec ipykernel inside bubblewrap."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-f" not in argv:
        raise SystemExit("usage: python sandbox.py -f CONNECTION_FILE [kernel args]")
    i = argv.index("-f")
    connection_file, kernel_args = argv[i + 1], argv[:i] + argv[i + 2:]
    cpu = int(os.environ.get("DGM_SANDBOX_CPU_SECONDS", DEFAULT_CPU_SECONDS))
    mem = int(os.environ.get("DGM_SANDBOX_MEMORY_MB", DEFAULT_MEMORY_MB)) * 2**20
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    bwrap = bwrap_path()
    if bwrap is None:
        warnings.warn("bubblewrap (bwrap) is not installed: this submission runs WITHOUT a sandbox and can "
                      "read, change or delete every file the grader can. Grade on Linux with bubblewrap "
                      "(apt-get install bubblewrap) or on JupyterHub.", UnsandboxedWarning, stacklevel=1)
        cmd = _kernel_command(connection_file, kernel_args)
    else:
        cmd = bwrap_command(connection_file, kernel_args, os.getcwd(), os.environ.get("DGM_COURSE_ROOT"), bwrap,
                            os.environ.get("DGM_CHECKER_SOCKET"))
    # The kernel's own stdout/stderr (not the notebook's outputs) are discarded: a flood there
    # must not fill the grader's pipes.
    sink = os.open(os.environ.get("DGM_SANDBOX_KERNEL_LOG", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
