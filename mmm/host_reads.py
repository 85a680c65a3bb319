"""Find, on the CPU, the calls that would make a CUDA training step wait for the device.

On a GPU, an op whose result the host must read (``.item()``, ``bool(t)``, ``.tolist()``), or whose
output size depends on values (``nonzero``, boolean-mask indexing, ``unique``,
``repeat_interleave`` without ``output_size``), blocks the host until the device has caught up, so
kernels stop queueing ahead. ``torch.cuda.set_sync_debug_mode("error")`` finds such calls, but
only on a GPU. :class:`HostReadDetector` finds them on any device: it is a ``TorchFunctionMode``
that records each such call made by Python code (calls inside torch's own kernels are not seen,
as on CUDA they would not be host reads either), with the innermost frame of ``mmm`` that made it
(or another library's line, such as Lightning's, and the ``mmm`` line that led there).

Use it where no GPU is available, e.g. ``mmm check-syncs`` (:mod:`mmm.train.step_reads`) and the
test suite, which run a training step of every pretraining config under it. Values a step reads from host-side
tensors on purpose (the packed layout's lengths, which stay on the host on every device) are
Python ints already and never reach the detector.
"""
from __future__ import annotations

import contextvars
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

_PACKAGE = str(Path(__file__).resolve().parent)  # .../mmm

# calls that read a device value on the host, whatever their arguments
_READS: Dict[Callable, str] = {
    torch.Tensor.item: "Tensor.item()",
    torch.Tensor.tolist: "Tensor.tolist()",
    torch.Tensor.numpy: "Tensor.numpy()",
    torch.Tensor.__bool__: "bool(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__index__: "tensor used as a Python int",
    torch.Tensor.nonzero: "nonzero (value-dependent size)",
    torch.nonzero: "nonzero (value-dependent size)",
    torch.argwhere: "argwhere (value-dependent size)",
    torch.Tensor.masked_select: "masked_select (value-dependent size)",
    torch.masked_select: "masked_select (value-dependent size)",
    torch.Tensor.unique: "unique (value-dependent size)",
    torch.unique: "unique (value-dependent size)",
    torch.unique_consecutive: "unique_consecutive (value-dependent size)",
    torch.equal: "torch.equal (returns a Python bool)",
    torch.allclose: "torch.allclose (returns a Python bool)",
    torch.bincount: "bincount (its size depends on the largest value)",
    torch.Tensor.bincount: "bincount (its size depends on the largest value)",
    torch.Tensor.cpu: "Tensor.cpu() (a copy to the host)",
    torch.is_nonzero: "torch.is_nonzero (returns a Python bool)",
    torch.Tensor.new_tensor: "Tensor.new_tensor(values) (a blocking copy on CUDA)",
}


_ON_HOST: contextvars.ContextVar[bool] = contextvars.ContextVar("mmm_on_host", default=False)


@contextmanager
def on_host() -> Iterator[None]:
    """Marks code that runs only while its tensors are on the host (e.g. a batch check made before
    the batch moves to a GPU): the detector does not record reads inside it."""
    token = _ON_HOST.set(True)
    try:
        yield
    finally:
        _ON_HOST.reset(token)


def _has_bool_tensor(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _conditional(func: Callable, args: Tuple, kwargs: Dict) -> Optional[str]:
    """The name of a host read that only some arguments of ``func`` make, or None."""
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 and _has_bool_tensor(args[1]):
        return "boolean-mask indexing (value-dependent size)"
    if func in (torch.Tensor.index_put, torch.Tensor.index_put_) and len(args) > 1 and _has_bool_tensor(tuple(args[1])):
        return "boolean-mask indexing (value-dependent size)"
    if func in (torch.Tensor.repeat_interleave, torch.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if func is torch.repeat_interleave else None)
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
    if func is torch.Tensor.to and "cpu" in (*[a for a in args[1:] if isinstance(a, str)], kwargs.get("device")):
        return "Tensor.to('cpu') (a copy to the host)"  # the string only: in a CPU run a tensor's device is the CPU too
    if func is torch.nn.functional.one_hot and (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1:
        return "one_hot without num_classes (its size depends on the largest value)"
    if func is torch.where and len(args) == 1 and not kwargs:
        return "torch.where(condition) (value-dependent size)"
    if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") not in (None, "cpu"):
        data = args[0] if args else kwargs.get("data")
        if not (isinstance(data, torch.Tensor) and data.device == torch.device(kwargs["device"])):
            return "Python values copied to a tensor's device (a blocking copy on CUDA)"
    return None


@dataclass(frozen=True)
class HostRead:
    """One call that would block the host on a CUDA device."""

    what: str  # the kind of read
    where: str  # "mmm/objectives/mlm.py:123 in forward", or the outermost frame outside torch when no mmm frame made it

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"


def _caller() -> str:
    """The innermost frame outside torch that made the read: an ``mmm`` line, or another library's line
    followed by the innermost ``mmm`` line that led to it (e.g. Lightning's logging, called from a fit)."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__ and "/torch/" not in f.filename]
    ours = [f for f in frames if f.filename.startswith(_PACKAGE)]
    mmm = (f"{Path(ours[-1].filename).relative_to(Path(_PACKAGE).parent)}:{ours[-1].lineno} in {ours[-1].name}"
           if ours else None)
    if not frames:
        return "<unknown>"
    inner = frames[-1]
    if ours and inner is ours[-1]:
        return mmm
    parts = Path(inner.filename).parts
    where = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else inner.filename
    return f"{where}:{inner.lineno} in {inner.name}" + (f", from {mmm}" if mmm else "")


class HostReadDetector(TorchFunctionMode):
    """Records every call, while active, that would read a device value on the host.

    Example::

        with HostReadDetector() as reads:
            loss = model(batch)
        assert not reads.found, reads.report()
    """

    def __init__(self, tag: Optional[Callable[[], Any]] = None) -> None:
        """Args:
            tag: called at each read; its values, in ``tags``, go with ``found`` (e.g. the trainer's step).
        """
        super().__init__()
        self.found: List[HostRead] = []
        self.tags: List[Any] = []
        self._tag = tag

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _READS.get(func) or _conditional(func, args, kwargs)
        if what is not None and not _ON_HOST.get():
            self.found.append(HostRead(what, _caller()))
            if self._tag is not None:
                self.tags.append(self._tag())
        return func(*args, **kwargs)

    def sites(self) -> List[HostRead]:
        """Each distinct (kind, place) once, in the order first met."""
        return list(dict.fromkeys(self.found))

    def report(self) -> str:
        if not self.found:
            return "no host reads"
        return "\n".join(f"  {r} ({self.found.count(r)}x)" for r in self.sites())

