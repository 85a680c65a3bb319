"""What the benchmark scripts share: their command line's frame, the thread count they run with, the rows of a
two-contender table, and the output (the markdown table printed, optionally JSON and markdown files)."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number >= ``minimum`` (steps, rounds, seeds): a bad value is one usage
    error naming the flag, not a statistics error after the run."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its module docstring's first paragraph as the description, the rest kept as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def with_threads(threads: Optional[int], run: Callable[[], T]) -> T:
    """``run()`` with ``torch.set_num_threads(threads)`` (a benchmark's ``--threads``; None: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def contender_rows(result: Dict[str, Any],
                   contenders: Sequence[Tuple[str, str]]) -> Iterator[Tuple[str, Dict[str, Any], bool]]:
    """``(title, measurements, first)`` per contender of one result, for a table that shows the shared cells
    (label, ratios) on the first contender's row only.

    Args:
        result: one configuration's result, holding each contender's measurements under its key.
        contenders: ``(key, title)`` per contender, the reference last (``(("mmm", "mmm"), ("hf", "HF"))``).
    """
    for i, (key, title) in enumerate(contenders):
        yield title, result[key], i == 0


def emit(table: str, payload: Any, json_path: Optional[str] = None, markdown_path: Optional[str] = None) -> None:
    """Print ``table``; write ``payload`` as JSON and ``table`` as markdown where paths are given.

    Args:
        table: the markdown table.
        payload: JSON-able result.
        json_path: where to write the JSON (None = don't).
        markdown_path: where to write the markdown (None = don't).
    """
    print()
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table + "\n")


def machine_info() -> Dict[str, Any]:
    """CPU model, threads, GPU name and library versions of this run."""

    def version(pkg: str) -> Optional[str]:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "xformers": version("xformers"), "transformers": version("transformers"),
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def report_header(report: Dict[str, Any]) -> List[str]:
    """The first markdown lines of a suite report: its title and the machine it ran on."""
    m = report["machine"]
    return [f"# mmm bench: {report['suite']}{' (quick)' if report['quick'] else ''}", "",
            f"{m['date']} · CPU {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads) · "
            f"GPU {m['gpu'] or 'none'} · torch {m['torch']}, xformers {m['xformers']}, "
            f"transformers {m['transformers']} · sizes: {report['sizes']}", ""]


def run_in_work_folder(prefix: str, work: Optional[Path], run: Callable[[Path], T], env: Dict[str, Any],
                       threads_before: int) -> T:
    """``run(folder)`` in ``work`` (or a temporary folder named ``prefix*``, removed after); then the torch thread
    count is restored to ``threads_before`` and ``env["load_average_end"]`` records the load the run ended at."""
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            result = run(Path(work) if work else Path(tmp))
    finally:
        torch.set_num_threads(threads_before)
    try:
        env["load_average_end"] = list(os.getloadavg())
    except OSError:
        pass
    return result


def accuracy_axis(ax: Any, chance: float, title: str) -> None:
    """A test-accuracy panel's common dressing: the chance line, a 0..1 axis, its label and title."""
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)


def save_panels(fig: Any, axes: Any, path: Path) -> None:
    """Legend on the first panel, tight layout, written to ``path`` as PNG, figure closed."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
