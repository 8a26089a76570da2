"""What the benchmarks say about the machine they ran on (imported by the bench scripts, run as scripts)."""
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def status_kb(field: str) -> float:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the peak-RSS mark to the current RSS (Linux: /proc/self/clear_refs); returns the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """The process's peak RSS in MB since start or the last `reset_peak_rss`."""
    return status_kb("VmHWM") / 1024
