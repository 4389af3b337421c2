"""Analysis passes (tracing, counting, quick evaluation) must not disturb the model.

:func:`analysis_mode` puts a model in eval mode under ``torch.no_grad()`` and, on exit, restores every
module's train/eval flag and every buffer (BatchNorm running statistics and batch counters), even when the
body raised. The caller's model and example inputs are read here for every entry point too: the eager module a
wrapper holds (:func:`eager_module`), the checks of a model to prune (:func:`prunable_model`), the inputs as a
tuple of one batch size (:func:`example_tuple`, :func:`at_batch`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import UserError


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else its first buffer; a model holding neither: the CPU)."""
    tensor = next(model.parameters(), None)
    tensor = tensor if tensor is not None else next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def callers_class(module: nn.Module) -> bool:
    """Whether ``module``'s class is the caller's own: defined outside PyTorch, torchvision and autocompress, so
    nothing but its forward says what it computes."""
    return not type(module).__module__.startswith(("torch", "autocompress"))


def structure_digest(model: nn.Module) -> str:
    """SHA-256 of what a model is besides its weights: its printed form (layer types and their settings, such as a
    Dropout's ``p``) and the public scalar attributes of its modules of the caller's own classes
    (:func:`callers_class`: a ``drop_path`` rate a block keeps), which a forward in training
    mode may read."""
    own = [f"{name}.{key}={value!r}" for name, module in model.named_modules()
           if callers_class(module)
           for key, value in sorted(vars(module).items()) if not key.startswith("_") and key != "training"
           and _plain(value)]
    return hashlib.sha256("\n".join([repr(model), *own]).encode()).hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes and values of its ``state_dict``): it identifies the base model of
    a run and the weights a training phase started from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def _plain(value: Any) -> bool:
    """Whether ``value`` is a number, string, bool or None, or a tuple / list of them."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Restore each module's ``training`` flag and all buffers on exit (no eval / no_grad switch)."""
    modes = {name: module.training for name, module in model.named_modules()}
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield model
    finally:
        for name, module in model.named_modules():
            if name in modes:
                module.training = modes[name]
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in buffers and buffers[name].shape == buf.shape:
                    buf.copy_(buffers[name])


def _frozen_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer the caller froze: affine parameters all with ``requires_grad=False``
    (a frozen pretrained backbone)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and not any(
        p.requires_grad for p in module.parameters(recurse=False))


def trained_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers whose running statistics training and re-estimation may change: every one except those
    the caller froze (:func:`_frozen_norm`), which keep their statistics as the caller's own loop with them in eval
    mode would (:func:`train_mode`)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _frozen_norm(m)]


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, with the BatchNorm layers the caller froze (:func:`_frozen_norm`) in eval mode, so that
    training normalises with their running statistics and leaves them unchanged. Returns ``model``."""
    model.train()
    for m in model.modules():
        if _frozen_norm(m):
            m.eval()
    return model


@contextlib.contextmanager
def analysis_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode + ``torch.no_grad()`` for the body; mode and buffers restored afterwards."""
    with preserved_state(model), torch.no_grad():
        model.eval()
        yield model


def hooked_forward(model: nn.Module, inputs: tuple, hooks: dict[nn.Module, Callable],
                   pre_hooks: dict[nn.Module, Callable] | None = None) -> None:
    """One analysis forward of ``model(*inputs)`` (see :func:`analysis_mode`) with ``hooks[module]``
    registered as a forward hook ``fn(module, args, output)`` on each listed module (and ``pre_hooks[module]`` as a
    forward pre-hook ``fn(module, args)``), removed afterwards."""
    handles = [module.register_forward_pre_hook(fn) for module, fn in (pre_hooks or {}).items()]
    handles += [module.register_forward_hook(fn) for module, fn in hooks.items()]
    try:
        with analysis_mode(model):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()


def random_like(example: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A random input of ``batch`` items shaped like ``example``'s items (``[batch, *example.shape[1:]]``, its
    dtype and device) from ``generator``: :func:`random_inputs` in ``example``'s own range for numbers, and
    ``example``'s own items drawn at random for masks (booleans, and floats of two values or with infinities, such
    as an additive mask of 0 and -inf): masks keep their pattern, where a random one may mask every key of a row,
    whose attention (or a masked mean) is then NaN."""
    if example.dtype == torch.bool or _float_mask(example):
        items = torch.randint(0, max(example.shape[0], 1), (batch,), generator=generator)
        return example[items.to(example.device)] if example.dim() else example
    integer = not example.is_floating_point() and not example.is_complex()
    low, high = (int(example.min()), int(example.max())) if integer and example.numel() else (0, 0)
    return random_inputs((batch, *example.shape[1:]), example.dtype, generator, low, high).to(example.device)


def _float_mask(example: torch.Tensor) -> bool:
    """Whether floating ``example`` looks like a mask: non-finite values (an additive mask's -inf), or exactly two
    distinct values (0 / 1, 0 / -10000)."""
    if not example.is_floating_point() or not example.numel():
        return False
    return not bool(torch.isfinite(example).all()) or torch.unique(example).numel() == 2


def random_inputs(shape: tuple, dtype: torch.dtype, generator: torch.Generator, low: int = 0,
                  high: int = 0) -> torch.Tensor:
    """A random tensor of ``shape`` and ``dtype`` from ``generator``: standard normal for floats, integers in
    ``[low, high]`` (token ids an embedding reads), random values for booleans."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(low, high + 1, shape, generator=generator).to(dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a forward's ``output``, in order: a tensor, or tensors nested in tuples, lists, mappings (their
    values: a dict, Hugging Face's ``ModelOutput``), dataclass instances (their fields) and ``torch.distributions``
    objects (their parameters: a Normal's ``loc`` and ``scale``; a VAE's encoder, fresh user 81); anything else
    (None, a number, a string) holds none."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, torch.distributions.Distribution):
        inner = vars(output).get("base_dist")  # Independent, TransformedDistribution
        output = [getattr(output, name) for name in output.arg_constraints if name in vars(output)] + \
            ([inner] if inner is not None else [])
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = [getattr(output, field.name) for field in dataclasses.fields(output)]
    elif isinstance(output, Mapping):
        output = list(output.values())
    elif not isinstance(output, (tuple, list)):
        return []
    return [t for item in output for t in output_tensors(item)]


#: the fix for inputs whose batch is not axis 0
BATCH_FIRST = ("put the batch axis first in every input and in the batches (token ids [B, L]; batch_first=True for "
               "nn.LSTM / nn.GRU / nn.RNN, nn.TransformerEncoderLayer and nn.MultiheadAttention)")


def eager_module(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The eager ``nn.Module`` a wrapper of the caller's holds, and a line saying so (None when ``model`` is one):
    a ``torch.compile`` result (its ``_orig_mod``), ``nn.DataParallel`` or ``DistributedDataParallel`` (their
    ``.module``), unwrapped as often as nested. Pruning replaces layers and a compiled graph or a replicating
    wrapper would keep the old ones; the caller compiles or wraps the compressed model again."""
    wrappers = []
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            wrappers.append(("torch.compile", "_orig_mod"))
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            wrappers.append((type(model).__name__, "module"))
            model = model.module
        else:
            break
    if not wrappers:
        return model, None
    path = "model." + ".".join(attr for _, attr in wrappers)
    names = " and ".join(name for name, _ in wrappers)
    return model, (f"model is wrapped by {names}: compressing the {type(model).__name__} it holds ({path}); "
                   f"the compressed model is that eager module: apply {names} to it again")


def prunable_model(model: object, say: Callable[[str], None]) -> nn.Module:
    """The eager ``nn.Module`` that ``compress`` and ``prune`` work on: ``model`` itself or the module a wrapper holds
    (:func:`eager_module`, told to ``say``), checked before any work.

    Raises:
        UserError: ``model`` is not an ``nn.Module`` (a state dict), is TorchScript (``torch.jit.script`` / ``trace``:
            its layers cannot be replaced), or has its parameters or buffers on the meta device (shapes without
            values: built under ``torch.device("meta")`` and not loaded), which nothing can copy, run or prune, or a
            module holds a tensor with autograd history (the older ``weight_norm`` after a training step), which
            ``copy.deepcopy`` refuses.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"model is a {type(model).__name__}, not a torch.nn.Module", "pass the nn.Module")
    model, wrapped = eager_module(model)
    if wrapped is not None:
        say(wrapped)
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError(f"model is a TorchScript module ({type(model).__name__}: torch.jit.script / trace), "
                        "whose layers cannot be pruned", "pass the eager nn.Module it was made from, and script "
                        "or trace the compressed model afterwards")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise UserError("the model's parameters are on the meta device (shapes without values)",
                        "load its weights first: model.to_empty(device='cpu'), then model.load_state_dict(...)")
    computed = next((f"{name}.{attr}" if name else attr for name, module in model.named_modules()
                     for attr, value in vars(module).items()
                     if isinstance(value, torch.Tensor) and value.grad_fn is not None), None)
    if computed is not None:  # copy.deepcopy refuses such a tensor (a raw RuntimeError, fresh user 85)
        raise UserError(f"{computed} is a tensor its last forward computed with autograd history (the older "
                        "torch.nn.utils.weight_norm or spectral_norm keeps the weight so), which cannot be copied "
                        "and a computed weight cannot be pruned", "remove it before compressing, keeping the "
                        "function: torch.nn.utils.remove_weight_norm(layer) (or remove_spectral_norm)")
    return model


def example_tuple(example_inputs: torch.Tensor | tuple | list, what: str) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` (a tensor ``[B, ...]`` or a tuple / list of them) as a tuple of detached tensors of one
    batch size ``B >= 1`` (on their devices); ``what`` names the caller in the error (e.g. ``"ONNX export"``).

    Raises:
        UserError: not a tensor or a non-empty tuple / list of tensors with a batch axis, or tensors of different
            sizes on axis 0 (a sequence-first ``[L, B]`` tensor next to a ``[B, L]`` mask), or NaN / infinite values
            (fresh user 85: the refusal blamed the forward).
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(
            isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] >= 1 for t in inputs):
        fix = "pass e.g. torch.randn(1, 3, 32, 32), or a tuple of [B, ...] tensors"
        if isinstance(example_inputs, dict) or (isinstance(inputs, (tuple, list)) and any(
                isinstance(t, dict) for t in inputs)):  # fresh user 61: a forward that takes a dict
            fix = ("a model whose forward takes a dict needs a wrapper taking tensors, e.g. forward(self, image): "
                   "return self.model({'image': image}); compress the wrapper and pass the tensors")
        raise UserError(f"example_inputs of {what} must be a tensor [B, ...] or a tuple of them, with batch B >= 1",
                        fix)
    if len({t.shape[0] for t in inputs}) > 1:
        raise UserError(f"example_inputs of {what} {[list(t.shape) for t in inputs]} have different batch sizes "
                        "(axis 0)", BATCH_FIRST)
    if (bad := sum(int((~torch.isfinite(t)).sum()) for t in inputs if t.is_floating_point())):
        raise UserError(f"example_inputs of {what} hold {bad} NaN or infinite values (the model is traced and "
                        "checked on them)", "pass finite inputs, e.g. one item of a training batch")
    return tuple(t.detach() for t in inputs)


def unread_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> dict[int, set[int]]:
    """For each floating-point input of ``model`` with a dimension 1 (channels or features): the positions along it
    that no output depends on (input index -> positions), read from the gradient of a random projection of the
    outputs at 4 random samples shaped like ``inputs``' items (eval mode; mode, buffers and RNG restored). A
    position some output reads has a nonzero gradient there at almost every input; one no weight reads has none.
    Empty where the forward cannot differentiate its inputs (it works on them in place)."""
    generator = torch.Generator().manual_seed(seed)
    leaves = [random_like(x, 4, generator).requires_grad_(x.is_floating_point() and x.dim() >= 2) for x in inputs]
    wanted = [x for x in leaves if x.requires_grad]
    try:
        with analysis_mode(model), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            outputs = [t for t in output_tensors(model(*leaves)) if t.is_floating_point() and t.requires_grad]
            if not wanted or not outputs:
                return {}
            projection = sum((t * torch.randn(t.shape, generator=generator).to(t)).sum() for t in outputs)
            grads = torch.autograd.grad(projection, wanted, allow_unused=True)
    except Exception:  # noqa: BLE001 - a forward that works in place on its input cannot take one requiring grad
        return {}
    grads = iter(grads)
    found = {}
    for index, leaf in enumerate(leaves):
        if not leaf.requires_grad:
            continue
        grad = next(grads)
        reads = torch.zeros(leaf.shape[1]) if grad is None else \
            grad.detach().abs().transpose(0, 1).reshape(leaf.shape[1], -1).sum(1).cpu()
        if bool((reads == 0).any()):
            found[index] = set(torch.nonzero(reads == 0).flatten().tolist())
    return found


def at_batch(inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """Each input's first item repeated ``batch`` times (``[batch, ...]``, contiguous): latency is timed at batch 1
    and 64 from any example."""
    return tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() for t in inputs)
