"""Architecture descriptions: the types and constructor arguments of a compact model's modules, as plain data.

A compact model (see :mod:`autocompress.compaction`) differs from the model it came from only in the
shapes / types of some leaf modules (narrower Conv2d / BatchNorm2d / Linear, ColumnConv2d /
ColumnLinear). :func:`describe_architecture` writes those modules' types and constructor arguments as plain
data; :func:`apply_architecture` rebuilds them inside a freshly created base model, after which
``load_state_dict(strict=True)`` fills in the weights (docs/ARCHITECTURE.md "Checkpoints"). Only the
module types listed here are ever built, so applying a description runs no code named by a file.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .columns import ColumnConv2d, ColumnConvNd, ColumnLinear
from .errors import UserError
from .multihead import SplitMultiheadAttention, unnest
from .padded_norm import PaddedGroupNorm, PaddedLayerNorm

FORMAT = "autocompress-architecture"
#: the newest description version this reads: 2 added ``"attributes"``; a description without them is written as 1,
#: which autocompress 0.5 reads too
VERSION = 2


def _conv_args(m: nn.modules.conv._ConvNd) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


def _transposed_args(m: nn.modules.conv._ConvTransposeNd) -> dict:
    args = _conv_args(m)
    args["output_padding"] = list(m.output_padding)
    return args


def _norm_args(m: nn.modules.batchnorm._NormBase) -> dict:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _recurrent_args(m: nn.RNNBase) -> dict:
    return {"input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers, "bias": m.bias,
            "batch_first": m.batch_first, "dropout": m.dropout, "bidirectional": m.bidirectional}


#: module type -> (constructor arguments as plain data). Only these types are described / rebuilt.
_DESCRIBERS: dict[type, Callable[[nn.Module], dict]] = {
    nn.Conv1d: _conv_args,
    nn.Conv2d: _conv_args,
    nn.Conv3d: _conv_args,
    nn.ConvTranspose1d: _transposed_args,
    nn.ConvTranspose2d: _transposed_args,
    nn.ConvTranspose3d: _transposed_args,
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    nn.BatchNorm1d: _norm_args,
    nn.BatchNorm2d: _norm_args,
    nn.BatchNorm3d: _norm_args,
    nn.InstanceNorm1d: _norm_args,
    nn.InstanceNorm2d: _norm_args,
    nn.InstanceNorm3d: _norm_args,
    nn.LayerNorm: lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                             "elementwise_affine": m.elementwise_affine, "bias": m.bias is not None},
    nn.GroupNorm: lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps,
                             "affine": m.affine},
    nn.PReLU: lambda m: {"num_parameters": m.num_parameters},
    nn.LSTM: lambda m: {**_recurrent_args(m), "proj_size": m.proj_size},
    nn.GRU: lambda m: _recurrent_args(m),
    nn.RNN: lambda m: {**_recurrent_args(m), "nonlinearity": m.nonlinearity},
    nn.Embedding: lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                             "padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
                             "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse},
    ColumnConv2d: ColumnConv2d.config,
    ColumnConvNd: ColumnConvNd.config,
    ColumnLinear: ColumnLinear.config,
    PaddedLayerNorm: PaddedLayerNorm.config,
    PaddedGroupNorm: PaddedGroupNorm.config,
    SplitMultiheadAttention: SplitMultiheadAttention.config,
}
_TYPES = {cls.__name__: cls for cls in _DESCRIBERS}


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in list(module.named_parameters(recurse=False))
            + list(module.named_buffers(recurse=False))}


def describable(module: nn.Module) -> bool:
    """Whether ``module``'s type is one a description rebuilds from constructor arguments."""
    return type(module) in _DESCRIBERS


#: the module attribute naming the int attributes compaction set to a narrowed width
#: (:func:`autocompress.compaction.width_attributes`): a description records and restores them
WIDTH_ATTRIBUTES = "_autocompress_width_attributes"


def mark_width_attribute(module: nn.Module, attr: str) -> None:
    """Record that ``module.<attr>`` holds a narrowed width (a description then keeps its value)."""
    setattr(module, WIDTH_ATTRIBUTES, tuple(sorted({*getattr(module, WIDTH_ATTRIBUTES, ()), attr})))


def width_attribute_values(model: nn.Module) -> dict[str, dict[str, int]]:
    """Module name -> {attribute: value} of the attributes :func:`mark_width_attribute` marked in ``model``."""
    return {name: {attr: getattr(module, attr) for attr in vars(module)[WIDTH_ATTRIBUTES]}
            for name, module in model.named_modules() if WIDTH_ATTRIBUTES in vars(module)}


def _apply_attributes(module: nn.Module, name: str, values: object) -> None:
    """Set a description's ``"attributes"`` entry of module ``name``.

    Raises:
        UserError: the entry does not name existing int attributes with reasonably sized int values.
    """
    if not isinstance(values, dict) or not all(
            type(getattr(module, key, None)) is int and type(value) is int and 0 <= value <= MAX_DIMENSION
            for key, value in values.items()):
        raise UserError(f"the architecture's attributes of {name!r} cannot be set (not int attributes of it)",
                        "the file is damaged or was not written by autocompress")
    for key, value in values.items():
        setattr(module, key, value)
        mark_width_attribute(module, key)


def _entry(module: nn.Module) -> dict | None:
    describer = _DESCRIBERS.get(type(module))
    return None if describer is None else {"type": type(module).__name__, "args": describer(module)}


def _parameter_shapes(module: nn.Module, reference: nn.Module, name: str) -> dict:
    """Entry for a module of another type whose own parameters changed shape (free per-channel parameters
    pruned with their channels): the shapes of its parameters, which :func:`apply_architecture` gives it
    in place.

    Raises:
        UserError: one of its buffers changed shape too (it could not be rebuilt).
    """
    params = dict(module.named_parameters(recurse=False))
    old, new = _shapes(reference), _shapes(module)
    if any(key not in params for key in set(old) | set(new) if old.get(key) != new.get(key)):
        raise UserError(f"module {name!r} ({type(module).__name__}) changed the shape of a buffer and cannot be "
                        "described for saving", f"exclude the layers coupled to {name} from pruning (ignored layers)")
    return _own_parameters(module)


def _own_parameters(module: nn.Module) -> dict:
    """A ``"Parameters"`` entry: the shapes of ``module``'s own parameters (not its children's)."""
    return {"type": "Parameters", "args": {"shapes": {k: list(p.shape) for k, p in
                                                      module.named_parameters(recurse=False)}}}


def _resize_parameters(module: nn.Module, name: str, args: object) -> None:
    """Give ``module``'s parameters the shapes of a ``"Parameters"`` entry (values come from the state dict), and a
    LayerNorm subclass over one dimension the ``normalized_shape`` of its weight.

    Raises:
        UserError: the entry is not a mapping of existing parameter names to reasonably sized shapes.
    """
    shapes = args.get("shapes") if isinstance(args, dict) else None
    params = dict(module.named_parameters(recurse=False)) if isinstance(module, nn.Module) else {}
    if not isinstance(shapes, dict) or not all(
            key in params and isinstance(shape, list) and all(isinstance(v, int) and 0 <= v <= MAX_DIMENSION
                                                              for v in shape) for key, shape in shapes.items()):
        raise UserError(f"the architecture entry of {name!r} cannot be built (bad parameter shapes)",
                        "the file is damaged or was not written by autocompress")
    for key, shape in shapes.items():
        setattr(module, key, nn.Parameter(params[key].new_empty(shape), requires_grad=params[key].requires_grad))
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and "weight" in shapes:
        module.normalized_shape = tuple(shapes["weight"])  # a subclass (LayerNorm2d) over its kept channels


def describe_architecture(model: nn.Module, reference: nn.Module | None = None) -> dict:
    """Plain-data description of ``model``'s leaf modules (types and constructor arguments).

    Args:
        model: a (compact) model.
        reference: the model it was compacted from (same module names). When given, only modules whose
            type or arguments differ from the reference's are described; otherwise every module of a
            describable type (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, BatchNorm1d/2d/3d,
            InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, PReLU, ColumnConv2d, ColumnConvNd, ColumnLinear,
            PaddedLayerNorm, PaddedGroupNorm) is, and every other module's own parameters by shape (a
            ``"Parameters"`` entry: free per-channel parameters such as a layer scale shrink with the channels they
            scale).

    Returns:
        ``{"format": "autocompress-architecture", "version": 1, "modules": {name: {"type": str,
        "args": dict}}}`` (only str / int / float / bool / list / dict / None values); where compaction set int
        attributes to a narrowed width (a width the forward writes into a shape, such as torchvision's
        ``VisionTransformer.hidden_dim``: :func:`mark_width_attribute`), version 2 with ``"attributes": {name:
        {attribute: value}}``.

    Raises:
        UserError: a module of another type has buffers whose shapes differ from the reference's (it
            could not be rebuilt). One whose own parameters changed shape (free per-channel parameters) is
            described as ``{"type": "Parameters", "args": {"shapes": {parameter: shape}}}``.
    """
    ref_modules = dict(reference.named_modules()) if reference is not None else {}
    modules: dict[str, dict] = {}
    for name, module in model.named_modules():
        entry = _entry(module) if name else None
        ref = ref_modules.get(name)
        if entry is None:
            if ref is not None and _shapes(ref) != _shapes(module):
                modules[name] = _parameter_shapes(module, ref, name)
            elif reference is None and next(module.parameters(recurse=False), None) is not None:
                modules[name] = _own_parameters(module)  # e.g. a layer scale: nothing tells whether it shrank
            continue
        if reference is None or ref is None or _entry(ref) != entry:
            modules[name] = entry
    attributes = width_attribute_values(model)
    if not attributes:
        return {"format": FORMAT, "version": 1, "modules": modules}
    return {"format": FORMAT, "version": VERSION, "modules": modules, "attributes": attributes}


#: the largest size any recorded constructor argument may have (a damaged or hostile file could otherwise
#: ask for terabytes of weights)
MAX_DIMENSION = 1 << 20


def _too_large(args: dict) -> bool:
    """Whether a recorded argument is a number (or a list of numbers) beyond :data:`MAX_DIMENSION`."""
    values = [v for value in args.values() for v in (value if isinstance(value, (list, tuple)) else [value])]
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > MAX_DIMENSION for v in values)


def apply_architecture(model: nn.Module, description: dict) -> nn.Module:
    """Replace ``model``'s modules by freshly built ones as described by :func:`describe_architecture`.

    ``model`` is a freshly created base model (e.g. ``create_model(name, **kwargs)``); it is changed in
    place and returned, ready for ``load_state_dict(strict=True)`` (new modules are initialised with
    PyTorch defaults on the device / dtype of the module they replace).

    Raises:
        UserError: the description is not an autocompress architecture, is from a newer version, names a
            module the model lacks, or uses an unknown module type.
    """
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise UserError("the checkpoint's architecture entry is not an autocompress architecture description",
                        "re-save the compact model with autocompress")
    if not isinstance(description.get("version"), int) or description["version"] > VERSION:
        raise UserError(f"architecture description version {description.get('version')!r} is newer than "
                        f"this autocompress reads ({VERSION})", "upgrade autocompress")
    for name, entry in description.get("modules", {}).items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, attr) if name else model
        except AttributeError as exc:
            raise UserError(f"the architecture describes module {name!r}, which the base model lacks",
                            "load it with the model name and options it was saved with") from exc
        if entry.get("type") == "Parameters":
            _resize_parameters(old, name, entry.get("args"))
            continue
        cls = _TYPES.get(entry.get("type"))
        if cls is None:
            raise UserError(f"unknown module type {entry.get('type')!r} for {name!r} in the architecture",
                            "upgrade autocompress")
        try:
            if not isinstance(entry.get("args"), dict) or _too_large(entry["args"]):
                raise TypeError("arguments are not a mapping of plain, reasonably sized values")
            new = cls(**entry["args"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"the architecture entry of {name!r} cannot be built ({type(exc).__name__}: "
                            f"{str(exc)[:120]})", "the file is damaged or was not written by autocompress"
                            ) from None
        tensors = list(old.parameters()) + list(old.buffers()) if isinstance(old, nn.Module) else []
        floats = [t for t in tensors if t.is_floating_point()]
        if floats:
            new = new.to(device=floats[0].device, dtype=floats[0].dtype)
        setattr(parent, attr, new)
    attributes = description.get("attributes", {})
    if not isinstance(attributes, dict):
        raise UserError("the architecture's attributes are not a mapping of module names",
                        "the file is damaged or was not written by autocompress")
    for name, values in attributes.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError as exc:
            raise UserError(f"the architecture sets attributes of module {name!r}, which the base model lacks",
                            "load it with the model name and options it was saved with") from exc
        _apply_attributes(module, name, values)
    unnest(model)
    return model


__all__ = ["FORMAT", "VERSION", "apply_architecture", "describable", "describe_architecture",
           "mark_width_attribute", "width_attribute_values"]
