"""Keep host memory that a step frees inside the process, for the next step to reuse.

XLA:CPU allocates a step's buffers with ``malloc`` and frees them when the step ends. glibc
hands large blocks straight back to the operating system (``mmap``/``munmap``, and trimming
the heap), so every step faults its working memory back in page by page, and on a ViT-B/16
step that kernel time is a large share of the step. With the settings below a typical step
takes no page fault once the heap has grown to the step's peak (over the first few steps);
benchmarks/README.md has the measurements. The process then keeps its peak host memory until
it exits, as accelerator allocators keep device memory.

The settings are glibc's (``mallopt``): one malloc arena, so that XLA's worker threads
allocate from the heap too (other arenas fall back to ``mmap`` for large blocks); no ``mmap``
for large blocks; no trimming of the heap. They apply to memory allocated afterwards by
threads started afterwards, so call :func:`keep_freed_memory` before JAX starts its backend
(the first ``jax.devices()`` or computation). ``python -m jprompt.main`` calls
:func:`keep_freed_memory_on_cpu_hosts`, which applies them only where JAX has no accelerator
plugin installed: on a GPU or TPU host the steps' memory is the device's, and one arena could
slow a many-threaded input pipeline.
"""

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings once; ``False`` where the C library has no ``mallopt`` (not glibc:
    macOS, musl), which then keeps its own behaviour."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)


def keep_freed_memory_on_cpu_hosts() -> bool:
    """:func:`keep_freed_memory` where JAX can only run on the CPU (no accelerator plugins)."""
    return not accelerator_plugins() and keep_freed_memory()


def accelerator_plugins() -> list[str]:
    """The JAX backend plugins (GPU, TPU...) installed beside jaxlib's CPU backend: the
    ``jax_plugins`` entry points JAX loads, and libtpu."""
    found = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    return found + (["libtpu"] if importlib.util.find_spec("libtpu") else [])
