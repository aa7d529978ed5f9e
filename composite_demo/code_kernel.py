"""A real Jupyter kernel for the code interpreter, started with jupyter_client.

    with CodeKernel() as kernel:                 # a per-session working folder in the temp directory
        result = kernel.execute("print(1 + 1)")  # ExecutionResult(text="2\\n", images=[], error=None, ...)

The kernel spec is IPYKERNEL (default "python3": the spec ipykernel installs into this environment, so the kernel
runs the same Python as the demo, whatever else is in the user's Jupyter folders). Another kernel: install it (`python -m ipykernel install --user --name NAME` from the
Python it should run) and start the demo with IPYKERNEL=NAME; `jupyter kernelspec list` shows what exists.

Limits (model-written code runs here, on the machine of the user who started the demo):
- time: each call runs with a timeout (COMPOSITE_DEMO_CODE_TIMEOUT, default 30 s); past it the kernel is interrupted
  (and restarted if it does not stop);
- memory: the kernel's address space is capped (COMPOSITE_DEMO_CODE_MEMORY_MB, default 8192; 0 for none) where the
  platform allows it (Linux and other Unix with RLIMIT_AS): an allocation past it raises MemoryError in the cell;
- output: at most COMPOSITE_DEMO_MAX_OUTPUT characters of text (default 20000) and 8 figures are kept per call,
  and the result says how much was dropped.
Text output, errors (traceback without ANSI colours) and matplotlib figures (as PNG bytes; the kernel starts with
the inline backend) come back. A kernel that died is started again on the next call.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DEFAULT_TIMEOUT = float(os.environ.get("COMPOSITE_DEMO_CODE_TIMEOUT", "30"))
MEMORY_MB = int(os.environ.get("COMPOSITE_DEMO_CODE_MEMORY_MB", "8192"))
MAX_OUTPUT = int(os.environ.get("COMPOSITE_DEMO_MAX_OUTPUT", "20000"))
MAX_IMAGES = 8
# Run silently in each new kernel: the address-space cap (the kernel is a process of its own, so the demo is not).
LIMIT_MEMORY = """
try:
    import resource as _r
    _r.setrlimit(_r.RLIMIT_AS, ({limit}, _r.getrlimit(_r.RLIMIT_AS)[1]))
    del _r
except (ImportError, ValueError, OSError):
    pass
"""
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def kernel_name_from_env() -> str:
    return os.environ.get("IPYKERNEL", "").strip() or "python3"


def spec_manager(kernel_name: str):
    """Where to look the kernel up. "python3" is this environment's own (a "python3" in the user's Jupyter folder,
    perhaps another Python's, does not take its place); any other name is searched in all Jupyter folders."""
    from jupyter_client.kernelspec import KernelSpecManager

    if kernel_name == "python3":
        return KernelSpecManager(kernel_dirs=[os.path.join(sys.prefix, "share", "jupyter", "kernels")])
    return KernelSpecManager()


@dataclass
class ExecutionResult:
    text: str = ""
    images: list[bytes] = field(default_factory=list)  # PNG files
    error: str | None = None
    timed_out: bool = False
    restarted: bool = False  # the kernel died (or would not stop) and was started again: its variables are gone
    dropped_chars: int = 0  # text past MAX_OUTPUT, not kept
    dropped_images: int = 0

    def add_text(self, text: str) -> None:
        room = max(MAX_OUTPUT - len(self.text), 0)
        self.text += text[:room]
        self.dropped_chars += max(len(text) - room, 0)

    def add_image(self, png: bytes) -> None:
        if len(self.images) < MAX_IMAGES:
            self.images.append(png)
        else:
            self.dropped_images += 1

    def observation(self) -> str:
        """What the model is told about the run."""
        parts = [self.text.rstrip("\n")] if self.text.strip() else []
        if self.dropped_chars:
            parts.append(f"[output truncated: {self.dropped_chars} more characters were not kept]")
        parts += ["[Image]"] * len(self.images)
        if self.dropped_images:
            parts.append(f"[{self.dropped_images} more images were not kept]")
        if self.error:
            parts.append(self.error)
        return "\n".join(parts)


class KernelError(RuntimeError):
    pass


class CodeKernel:
    """One Jupyter kernel with its working folder; `execute` is serialised by a lock."""

    def __init__(self, kernel_name: str | None = None, workdir: str | None = None, timeout: float | None = None,
                 startup_timeout: float = 60.0, interrupt_grace: float = 5.0, memory_mb: int | None = None):  # fmt: skip
        self.kernel_name = kernel_name or kernel_name_from_env()
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="chatglm3-ci-")
        os.makedirs(self.workdir, exist_ok=True)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.startup_timeout = startup_timeout
        self.interrupt_grace = interrupt_grace
        self.memory_mb = MEMORY_MB if memory_mb is None else memory_mb
        self.km = self.kc = None
        self._ipc_dir: str | None = None
        self._lock = threading.RLock()
        self.closed = False

    # --- life cycle ---

    def start(self) -> CodeKernel:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import NoSuchKernel

        with self._lock:
            if self.closed:
                raise KernelError("this kernel was closed")
            if self.is_alive():
                return self
            self._stop()
            env = dict(os.environ, MPLBACKEND=INLINE_BACKEND, PYTHONUNBUFFERED="1")
            km = KernelManager(kernel_name=self.kernel_name, kernel_spec_manager=spec_manager(self.kernel_name))
            if os.name == "posix":  # Unix sockets in a private folder rather than TCP ports on localhost
                if self._ipc_dir is None:
                    self._ipc_dir = tempfile.mkdtemp(prefix="chatglm3-ipc-")
                km.transport, km.ip = "ipc", os.path.join(self._ipc_dir, "kernel")
            try:
                km.start_kernel(cwd=self.workdir, env=env)
            except NoSuchKernel:
                from jupyter_client.kernelspec import KernelSpecManager

                known = ", ".join(sorted(KernelSpecManager().find_kernel_specs())) or "none"
                raise KernelError(
                    f"no Jupyter kernel named {self.kernel_name!r} (IPYKERNEL); installed kernels: {known}. "
                    "Install ipykernel (bash scripts/setup.sh does) or set IPYKERNEL to one of them."
                ) from None
            kc = km.client()
            kc.start_channels()
            try:
                kc.wait_for_ready(timeout=self.startup_timeout)
            except RuntimeError as e:
                kc.stop_channels()
                km.shutdown_kernel(now=True)
                raise KernelError(f"the Jupyter kernel {self.kernel_name!r} did not start: {e}") from None
            self.km, self.kc = km, kc
            if self.memory_mb:
                kc.execute(LIMIT_MEMORY.format(limit=self.memory_mb * 2**20), silent=True, store_history=False)
                with contextlib.suppress(queue.Empty):
                    kc.get_shell_msg(timeout=self.startup_timeout)  # applied before any user code runs
            return self

    def is_alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def restart(self) -> None:
        """A fresh kernel in the same folder (variables are lost, files stay)."""
        with self._lock:
            self._stop()
            self.start()

    def _stop(self) -> None:
        kc, km, self.kc, self.km = self.kc, self.km, None, None
        if kc is not None:
            try:
                kc.stop_channels()
            except Exception:  # already gone
                pass
        if km is not None:
            try:
                km.shutdown_kernel(now=True)
            except Exception:  # a dead kernel cannot be asked to stop
                pass
            try:
                km.cleanup_resources()
            except Exception:
                pass

    def close(self) -> None:
        """Shut the kernel down and remove the working folder when this object made it."""
        with self._lock:
            self._stop()
            self.closed = True
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self._ipc_dir:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def __enter__(self) -> CodeKernel:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running code ---

    def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            result = ExecutionResult()
            if not self.is_alive():
                result.restarted = self.km is not None
                self.restart()
            self._drain()
            msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
            done = self._collect(msg_id, result, time.monotonic() + timeout)
            if done is None:  # the kernel died while running
                result.error = "The kernel died while running this code; it was restarted (variables are lost)."
                result.restarted = True
                self.restart()
                return result
            if not done:
                result.timed_out = True
                self.km.interrupt_kernel()
                stopped = self._collect(msg_id, result, time.monotonic() + self.interrupt_grace)
                result.error = f"Timeout: the code ran longer than {timeout:g} s and was interrupted."
                if not stopped:
                    result.error += " The kernel did not stop, so it was restarted (variables are lost)."
                    result.restarted = True
                    self.restart()
            self._drain()
            return result

    def _collect(self, msg_id: str, result: ExecutionResult, deadline: float) -> bool | None:
        """Read this execution's output into `result`: True at idle, False at the deadline, None if the kernel died."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                msg = self.kc.get_iopub_msg(timeout=min(remaining, 0.25))
            except queue.Empty:
                if not self.km.is_alive():
                    return None
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                result.add_text(content.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                if "image/png" in data:
                    result.add_image(base64.b64decode(data["image/png"]))
                elif "text/plain" in data:
                    result.add_text(data["text/plain"] + "\n")
            elif kind == "error":
                if content.get("ename") == "KeyboardInterrupt" and result.timed_out:
                    continue
                trace = strip_ansi("\n".join(content.get("traceback", [])))
                result.error = trace or f"{content.get('ename')}: {content.get('evalue')}"
            elif kind == "status" and content.get("execution_state") == "idle":
                return True

    def _drain(self) -> None:
        """Drop replies left from earlier runs."""
        for get in (self.kc.get_shell_msg, self.kc.get_iopub_msg):
            while True:
                try:
                    get(timeout=0)
                except queue.Empty:
                    break


class KernelPool:
    """Kernels per browser session, at most `max_kernels` (the least recently used one is closed past that)."""

    def __init__(self, max_kernels: int = 4, factory=CodeKernel):
        self.max_kernels = max_kernels
        self.factory = factory
        self._kernels: OrderedDict[str, CodeKernel] = OrderedDict()
        self._lock = threading.Lock()
        atexit.register(self.close_all)

    def get(self, key: str) -> CodeKernel:
        with self._lock:
            kernel = self._kernels.pop(key, None)
            if kernel is None or kernel.closed:
                kernel = self.factory()
            self._kernels[key] = kernel
            while len(self._kernels) > self.max_kernels:
                _, old = self._kernels.popitem(last=False)
                old.close()
            return kernel

    def close(self, key: str) -> None:
        with self._lock:
            kernel = self._kernels.pop(key, None)
        if kernel is not None:
            kernel.close()

    def close_all(self) -> None:
        with self._lock:
            kernels, self._kernels = list(self._kernels.values()), OrderedDict()
        for kernel in kernels:
            kernel.close()


_pool: KernelPool | None = None


def shared_pool() -> KernelPool:
    """The process's pool (the Streamlit page uses it; tests may replace it with `set_shared_pool`)."""
    global _pool
    if _pool is None:
        _pool = KernelPool(int(os.environ.get("COMPOSITE_DEMO_MAX_KERNELS", "4")))
    return _pool


def set_shared_pool(pool: KernelPool | None) -> None:
    global _pool
    _pool = pool
