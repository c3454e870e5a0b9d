"""What the OOM killer sees: a process's peak resident memory. Torch-free, so the on-device
runtime's measurements read it the same way as training's."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM of its own address space, because
    ru_maxrss also carries the parent's peak across fork/exec (vfork makes it the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory again from what it holds now (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM), so that the next peak read is one phase's, not setup's.
    Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
