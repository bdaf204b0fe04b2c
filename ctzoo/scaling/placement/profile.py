"""Profile a torch model into a :class:`~ctzoo.scaling.placement.graph.PlacementGraph`, and measure transfers.

BaechiPyTorch places at module level (notes section 4.4): here the forward graph comes from ``torch.fx`` with the
model's *basic blocks* as leaves -- modules that own parameters and have no parameterised children (a
``Conv2d``, a ``GroupNorm``), plus torch's own parameterless layers (``ReLU``, ``InstanceNorm2d``) and any module
named in ``leaf_modules``. Everything between them (``add``, ``cat``, the template segmenter's cosine attention
math) becomes ``function``/``method`` nodes; placeholders are ``input`` nodes and the result the ``output`` node.

Node names: a module call is its qualified name (``encoder.stem.conv``); a module called again (the template
segmenter's shared encoder levels) is ``name#2``, ``name#3``, ... in the same co-placement ``group`` when it has
parameters or buffers (they live on one device; a module without any, such as an ``InstanceNorm2d`` without
affine, runs each call where that call is placed); any other node keeps torch.fx's name (``add_3``, ``cat``).

Per node: forward seconds (median of ``rounds`` timed runs of the whole graph after ``warmup``), backward seconds
(the node rerun alone on its recorded inputs, ``torch.autograd.grad`` timed), ``permanent_bytes`` (own parameters
x4 when training: weights, gradients and AdamW's two moments; x1 for inference; buffers x1),
``temporary_bytes`` (when training: what autograd saves for its backward beyond its inputs and outputs,
measured with ``saved_tensors_hooks``), ``output_bytes``, and (training) ``saved_inputs`` -- the input nodes
whose tensors the node's backward saves, seen by the same hooks -- and ``saves_output``: the simulator holds an
output until the backward of a consumer that saved it, else only until that consumer's forward. The output node
counts as saving the graph's outputs (the loss reads them until the backward starts).
"""

from __future__ import annotations

import inspect
import operator
import platform
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only

from ctzoo.scaling.placement.graph import CommModel, Device, OpNode, PlacementError, PlacementGraph

__all__ = ["DEFAULT_COMM_SIZES", "ModuleTracer", "fit_comm_model", "fit_transfer_line", "is_basic_block",
           "measure_comm",
           "measure_transfers", "module_state", "node_names", "profile_model", "trace_model"]

#: Transfer sizes measure_comm times: 1 KiB to 16 MiB, a factor 4 apart.
DEFAULT_COMM_SIZES = tuple(2**k for k in range(10, 25, 2))
_KINDS = {"placeholder": "input", "output": "output", "call_module": "module", "call_function": "function",
          "call_method": "method", "get_attr": "function"}


# ------------------------------------------------------------------------------------------------ tracing


def is_basic_block(module: nn.Module) -> bool:
    """A module that owns parameters and has no parameterised children: the unit placement moves."""
    owns = next(module.parameters(recurse=False), None) is not None
    return owns and not any(next(child.parameters(), None) is not None for child in module.children())


class ModuleTracer(fx.Tracer):
    """torch.fx at module granularity: basic blocks, torch's parameterless layers and ``leaf_modules`` (qualified
    names) are leaves; every other module is traced through."""

    def __init__(self, leaf_modules: Collection[str] = ()) -> None:
        super().__init__()
        self.leaf_modules = frozenset(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaf_modules or is_basic_block(m)
                or super().is_leaf_module(m, module_qualified_name))


def trace_model(model: nn.Module, num_inputs: int, leaf_modules: Collection[str] = ()) -> fx.GraphModule:
    """``model``'s forward as a GraphModule whose first ``num_inputs`` parameters are its inputs; later parameters
    keep their defaults (the template segmenter's ``template_encoding=None``) and leave the graph.

    The GraphModule holds ``model``'s own children, parameters and buffers under their own names, so its
    ``state_dict`` has the same keys as ``model``'s. A model torch.fx cannot trace raises :class:`PlacementError`
    naming the module and why.
    """
    tracer = ModuleTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=_defaults_after(model, num_inputs))
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError... from inside model code
        where = _innermost_module(error, model)
        raise PlacementError(f"torch.fx cannot trace {type(model).__name__}{where}: {type(error).__name__}: "
                             f"{error}. Make that code traceable (no Python control flow on tensor values or "
                             "shapes; see torch.fx.wrap) or name the module in leaf_modules") from error
    _drop_fixed_inputs(graph, num_inputs)
    traced = fx.GraphModule(model, graph, class_name=f"Traced{type(model).__name__}")
    _adopt_module_tree(traced, model)
    return traced


def _defaults_after(model: nn.Module, num_inputs: int) -> dict[str, Any] | None:
    """``{name: default}`` of ``forward``'s parameters after the first ``num_inputs`` (they are not inputs)."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    later = [p for p in parameters[num_inputs:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in later if p.default is p.empty]
    if missing or len(parameters) < num_inputs:
        raise PlacementError(f"{type(model).__name__}.forward takes {[p.name for p in parameters]}; the "
                             f"{num_inputs} example input(s) leave {missing or 'too few'} without a value")
    return {p.name: p.default for p in later} or None


def _drop_fixed_inputs(graph: fx.Graph, num_inputs: int) -> None:
    """Remove the placeholders of the parameters after the inputs (fx baked their defaults into the graph) and
    fx's guards on them: they carry nothing."""
    for node in list(graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "placeholder"][num_inputs:]:
        graph.erase_node(node)
    graph.lint()


def _adopt_module_tree(traced: fx.GraphModule, model: nn.Module) -> None:
    """Give ``traced`` the whole of ``model``'s tree (GraphModule copies only what the graph calls), so that
    state dicts, ``train()`` and shared modules are exactly the model's."""
    for name in list(traced._modules):
        delattr(traced, name)
    for name, child in model.named_children():
        traced.add_module(name, child)
    for name, parameter in model.named_parameters(recurse=False):
        traced.register_parameter(name, parameter)
    for name, buffer in model.named_buffers(recurse=False):
        traced.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)


def _innermost_module(error: Exception, model: nn.Module) -> str:
    """`` (in module 'fusion.0', method attend)``: the deepest of ``model``'s modules the traceback passes through."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    traceback = error.__traceback__
    while traceback is not None:
        owner = traceback.tb_frame.f_locals.get("self")
        if id(owner) in names:
            found = (names[id(owner)], traceback.tb_frame.f_code.co_name)
        traceback = traceback.tb_next
    if found is None:
        return ""
    module, method = found
    return f" (in {f'module {module!r}' if module else 'the model itself'}, method {method})"


def node_names(traced: fx.GraphModule) -> dict[str, str]:
    """fx node name -> placement node name (see the module docstring), unique, in graph order."""
    names: dict[str, str] = {}
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            names[node.name] = node.target if calls[node.target] == 1 else f"{node.target}#{calls[node.target]}"
    taken = set(names.values())
    for node in traced.graph.nodes:
        if node.op != "call_module":
            name = node.name
            while name in taken:  # an fx name equal to a top-level module's name
                name += "_"
            names[node.name] = name
            taken.add(name)
    return {node.name: names[node.name] for node in traced.graph.nodes}  # in graph (topological) order


def module_state(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a module keeps between calls (parameters and buffers, its children's included): what ties its
    calls to one device. A module without any (``ReLU``, ``InstanceNorm2d`` without affine) runs wherever its
    inputs are."""
    return [*module.parameters(), *module.buffers()]


def module_groups(traced: fx.GraphModule, names: dict[str, str]) -> dict[str, str]:
    """Placement name -> group for module nodes that share parameters or buffers (a module called twice, tied
    weights): these live on one device. The group is its first node's name. The calls of a module without
    state stay ungrouped: each runs on its own call's device."""
    owner: dict[int, str] = {}  # parameter or buffer id -> group
    groups: dict[str, str] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module":
            continue
        state = [id(t) for t in module_state(traced.get_submodule(node.target))]
        group = next((owner[t] for t in state if t in owner), None)
        if group is not None:
            groups[names[node.name]] = groups[group] = group
        for t in state:
            owner.setdefault(t, group or names[node.name])
    return groups


# ---------------------------------------------------------------------------------------------- profiling


def _bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (nested lists, tuples, dicts)."""
    return sum(t.numel() * t.element_size() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


class _NodeTimer(fx.Interpreter):
    """Runs the graph node by node, timing each; with ``record`` it keeps each node's inputs and output."""

    def __init__(self, traced: fx.GraphModule, sync: Callable[[], None]) -> None:
        super().__init__(traced, garbage_collect_values=False)
        self.sync = sync
        self.seconds: dict[str, list[float]] = {n.name: [] for n in traced.graph.nodes}
        self.record = False
        self.calls: dict[str, tuple[tuple, dict]] = {}
        self.outputs: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.sync()
            start = time.perf_counter()
            result = getattr(self, n.op)(n.target, args, kwargs)
            self.sync()
            self.seconds[n.name].append(time.perf_counter() - start)
        if self.record:
            self.calls[n.name], self.outputs[n.name] = (args, kwargs), result
        return result


def _node_call(traced: fx.GraphModule, node: fx.Node) -> Callable[..., Any] | None:
    """The callable a compute node runs (None for inputs, output and attribute reads)."""
    if node.op == "call_module":
        return traced.get_submodule(node.target)
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return lambda self, *args, **kwargs: getattr(self, node.target)(*args, **kwargs)
    return None


def _backward_seconds(call: Callable[..., Any], args: tuple, kwargs: dict, parameters: list[torch.Tensor],
                      rounds: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``torch.autograd.grad`` through one node, rerun alone on fresh leaves of its inputs."""
    timings = []
    for run in range(warmup + rounds):
        leaves, fresh_args, fresh_kwargs = _fresh_leaves(args, kwargs)
        with torch.enable_grad():
            outputs = call(*fresh_args, **fresh_kwargs)
        wanted = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        inputs = [t for t in leaves + parameters if t.requires_grad]
        if not wanted or not inputs:
            return 0.0
        seeds = [torch.ones_like(t) for t in wanted]
        sync()
        start = time.perf_counter()
        torch.autograd.grad(wanted, inputs, seeds, allow_unused=True)
        sync()
        if run >= warmup:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _fresh_leaves(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], tuple, dict]:
    """Leaves that require grad for a node's floating-point inputs, and clones of them to call it with (an
    in-place layer, ``ReLU(inplace=True)``, may write into a clone, never into a leaf)."""
    leaves: list[torch.Tensor] = []

    def leaf(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        leaves.append(t.detach().requires_grad_())
        return leaves[-1].clone()

    fresh_args, fresh_kwargs = tree_map_only(torch.Tensor, leaf, (args, kwargs))
    return leaves, fresh_args, fresh_kwargs


@dataclass
class _Saves:
    """What autograd saves for one node's backward: ``extra_bytes`` beyond its inputs, outputs and parameters (a
    norm's normalised intermediate, a dropout mask...: its ``temporary_bytes``), whether it saves each tensor of
    its flattened ``(args, kwargs)`` (``inputs``) and whether it saves its own output."""

    extra_bytes: int
    inputs: list[bool]
    output: bool


def _autograd_saves(call: Callable[..., Any], args: tuple, kwargs: dict, parameters: list[torch.Tensor]) -> _Saves:
    """Run the node once under ``saved_tensors_hooks`` and see which storages its backward keeps. Its inputs and
    outputs are not counted in ``extra_bytes``: they are held as outputs, as long as a consumer saved them."""
    _, fresh_args, fresh_kwargs = _fresh_leaves(args, kwargs)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = call(*fresh_args, **fresh_kwargs)
    inputs = [_storage(t) for t in tree_flatten((fresh_args, fresh_kwargs))[0]]
    produced = {_storage(t) for t in tree_flatten(outputs)[0]} - {None}
    known = set(inputs) | produced | {_storage(t) for t in parameters}
    return _Saves(sum(nbytes for pointer, nbytes in saved.items() if pointer not in known),
                  [pointer in saved for pointer in inputs], bool(produced & saved.keys()))


def _storage(value: Any) -> int | None:
    return value.untyped_storage().data_ptr() if isinstance(value, torch.Tensor) else None


def _saved_sources(node: fx.Node, timer: _NodeTimer, saves: _Saves | None, names: dict[str, str]) -> list[str]:
    """The placement names of ``node``'s input nodes some of whose tensors the node's backward saves (matched by
    identity: a node's arguments are its input nodes' outputs). The output node saves every input (the loss
    reads the outputs until the backward starts); a node without a call (an input) saves none."""
    if node.op == "output":
        return [names[source.name] for source in node.all_input_nodes]
    if saves is None:
        return []
    flat = tree_flatten(timer.calls[node.name])[0]
    saved_ids = {id(value) for value, kept in zip(flat, saves.inputs) if kept and isinstance(value, torch.Tensor)}
    return [names[source.name] for source in node.all_input_nodes
            if {id(t) for t in tree_flatten(timer.outputs.get(source.name))[0]} & saved_ids]


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _permanent_bytes(traced: fx.GraphModule, node: fx.Node, seen: set[int], training: bool) -> int:
    """Bytes a node holds for the whole step: its parameters (x4 training: weights, grads, AdamW's two moments)
    and buffers, each counted once, at the first node that uses it."""
    if node.op == "call_module":
        module = traced.get_submodule(node.target)
        parameters, buffers = list(module.parameters()), list(module.buffers())
    elif node.op == "get_attr":
        value = operator.attrgetter(node.target)(traced)
        parameters, buffers = ([value], []) if isinstance(value, nn.Parameter) else ([], [value])
    else:
        return 0
    fresh = [t for t in parameters + buffers if id(t) not in seen]
    seen.update(id(t) for t in fresh)
    factor = 4 if training else 1
    return sum(_bytes(t) * (factor if isinstance(t, nn.Parameter) else 1) for t in fresh)


def profile_model(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], device_kind: str = "cpu",
                  rounds: int = 5, warmup: int = 2, training: bool = True, leaf_modules: Collection[str] = (),
                  name: str = "") -> PlacementGraph:
    """Profile ``model`` on ``example_inputs`` (``(B, ...)`` tensors, its forward's leading arguments) on a device
    of ``device_kind`` (``cpu`` or ``cuda``, where the model and inputs are moved for the run and the model is
    moved back). ``training``: train mode, backward times and optimiser state; else eval mode, forward only.
    The model's parameters and buffers are as before afterwards (batch-norm statistics are put back)."""
    device = torch.device("cuda" if device_kind == "cuda" else device_kind)
    home = next(model.parameters(), torch.empty(0)).device
    traced = trace_model(model, len(example_inputs), leaf_modules)
    names = node_names(traced)
    buffers = {k: b.detach().clone() for k, b in model.state_dict(keep_vars=True).items()
               if not isinstance(b, nn.Parameter)}
    was_training = model.training
    try:
        traced.to(device).train(training)
        inputs = tuple(t.to(device) for t in example_inputs)
        timer = _profile_forward(traced, inputs, rounds, warmup, training, _synchronizer(device))
        nodes = _graph_nodes(traced, timer, names, device, rounds, warmup, training)
    finally:
        model.load_state_dict(buffers, strict=False)  # batch-norm statistics as before profiling
        model.to(home).train(was_training)
    edges = [(names[source.name], names[node.name], nodes[source.name].output_bytes)
             for node in traced.graph.nodes for source in node.all_input_nodes]
    first = example_inputs[0] if example_inputs else torch.empty(0)
    meta = {"device_kind": device_kind, "rounds": rounds, "warmup": warmup, "torch": torch.__version__,
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "input_shapes": [list(t.shape) for t in example_inputs],
            "leaf_modules": sorted(leaf_modules),
            "parameter_bytes": sum(_bytes(p) for p in model.parameters())}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    return PlacementGraph(list(nodes.values()), edges, name or type(model).__name__,
                          int(first.shape[0]) if first.ndim else 1, list(first.shape), training, meta)


def _profile_forward(traced: fx.GraphModule, inputs: tuple[torch.Tensor, ...], rounds: int, warmup: int,
                     training: bool, sync: Callable[[], None]) -> _NodeTimer:
    """``warmup`` untimed and ``rounds`` timed runs of the whole graph; the last one records every node's call."""
    if rounds < 1:
        raise PlacementError(f"rounds must be at least 1, got {rounds}")
    timer = _NodeTimer(traced, sync)
    with torch.set_grad_enabled(training):
        for run in range(warmup + rounds):
            timer.record = run == warmup + rounds - 1
            timer.run(*inputs)
            if run < warmup:
                for timings in timer.seconds.values():
                    timings.clear()
    return timer


def _graph_nodes(traced: fx.GraphModule, timer: _NodeTimer, names: dict[str, str], device: torch.device,
                 rounds: int, warmup: int, training: bool) -> dict[str, OpNode]:
    """One :class:`OpNode` per fx node, keyed by the fx name, in graph (topological) order."""
    groups, seen, kind = module_groups(traced, names), set(), device.type
    sync = _synchronizer(device)
    nodes = {}
    for node in traced.graph.nodes:
        output = timer.outputs.get(node.name)
        output_bytes = _bytes(output) if node.op != "output" else 0
        backward = 0.0
        call = _node_call(traced, node)
        if training and call is not None:
            parameters = list(call.parameters()) if isinstance(call, nn.Module) else []
            args, kwargs = timer.calls[node.name]
            backward = _backward_seconds(call, args, kwargs, parameters, rounds, warmup, sync)
        saves = _autograd_saves(call, *timer.calls[node.name], parameters) if training and call is not None else None
        saved_inputs = _saved_sources(node, timer, saves, names) if training else None
        nodes[node.name] = OpNode(
            names[node.name], _KINDS[node.op], {kind: statistics.median(timer.seconds[node.name])},
            {kind: backward} if training else {}, _permanent_bytes(traced, node, seen, training),
            saves.extra_bytes if saves else 0, output_bytes, groups.get(names[node.name]), saved_inputs,
            bool(saves and saves.output))
    return nodes


# ------------------------------------------------------------------------------------------ communication


def measure_transfers(devices: Sequence[Device], sizes: Sequence[int] = DEFAULT_COMM_SIZES,
                      repeats: int = 10) -> dict[str, list[tuple[int, float]]]:
    """Fastest of ``repeats`` seconds (noise only ever adds time) to move ``n`` bytes for each ordered device-kind
    pair among ``devices`` (one device pair stands for its kinds): ``{"cpu->cuda": [(bytes, seconds), ...]}``.
    Between two devices of one torch device (logical CPUs) the copy is a ``clone()``, as a placed model makes it;
    else ``tensor.to(device)``."""
    pairs: dict[str, tuple[Device, Device]] = {}
    for source in devices:
        for target in devices:
            if source.name != target.name:
                pairs.setdefault(f"{source.kind}->{target.kind}", (source, target))
    points: dict[str, list[tuple[int, float]]] = {}
    for key, (source, target) in pairs.items():
        sync = _synchronizer(torch.device(target.torch_device)) if "cuda" in key else (lambda: None)
        move = _mover(source, target)
        points[key] = []
        for size in sizes:
            tensor = torch.empty(max(1, size // 4), dtype=torch.float32, device=source.torch_device).fill_(1.0)
            timings = []
            for _ in range(repeats + 1):  # the first is warm-up (allocator, CUDA context)
                sync()
                start = time.perf_counter()
                move(tensor)
                sync()
                timings.append(time.perf_counter() - start)
            points[key].append((tensor.numel() * 4, min(timings[1:])))
    return points


def _mover(source: Device, target: Device) -> Callable[[torch.Tensor], torch.Tensor]:
    if source.torch_device == target.torch_device:
        return torch.Tensor.clone
    return lambda tensor: tensor.to(target.torch_device)


def fit_comm_model(points: dict[str, list[tuple[int, float]]], notes: list[str] | None = None) -> CommModel:
    """``seconds = coef * bytes + intercept`` per pair, fitted by :func:`fit_transfer_line`; ``notes`` gets a line
    for each pair whose intercept had to be clamped."""
    pairs = {}
    for key, measured in points.items():
        sizes, seconds = np.array(measured, dtype=np.float64).T
        coef, intercept, clamped = fit_transfer_line(sizes, seconds)
        pairs[key] = (coef, intercept)
        if clamped and notes is not None:
            notes.append(f"transfers {key}: the fitted latency was far above the smallest measured copy "
                         f"({1e6 * seconds.min():.1f} us); it is clamped to that (noisy measurement?)")
    return CommModel(pairs)


def fit_transfer_line(sizes: np.ndarray, seconds: np.ndarray) -> tuple[float, float, bool]:
    """``(coef, intercept, clamped)``: a line through (bytes, seconds) that fits every point *relatively* (weights
    ``1 / seconds``: a 2 us copy counts as much as a 2 ms one, where plain least squares lets the large copies'
    noise set the intercept), refitted once without the points off it by more than half (a slow outlier: a
    page fault, another process). Both held at zero or above; the intercept, a copy's fixed cost, at most the
    smallest measured time (``clamped`` when it had to be)."""
    keep = np.ones(len(sizes), dtype=bool)
    for _ in range(2):
        weights = 1.0 / np.maximum(seconds[keep], 1e-12)
        design = np.stack([sizes[keep], np.ones(int(keep.sum()))], 1) * weights[:, None]
        (coef, intercept), *_ = np.linalg.lstsq(design, seconds[keep] * weights, rcond=None)
        coef, intercept = max(float(coef), 0.0), max(float(intercept), 0.0)
        relative = np.abs(coef * sizes + intercept - seconds) / np.maximum(seconds, 1e-12)
        outliers = relative > 0.5
        if not outliers.any() or (~outliers).sum() < 2 or (keep == ~outliers).all():
            break
        keep = ~outliers
    smallest = float(seconds.min()) if len(seconds) else 0.0
    return coef, min(intercept, smallest), intercept > smallest


def measure_comm(devices: Sequence[Device], sizes: Sequence[int] = DEFAULT_COMM_SIZES, repeats: int = 10,
                 meta: dict[str, Any] | None = None) -> CommModel:
    """Time real transfers between ``devices`` and fit a :class:`CommModel`; ``meta`` (a profile's
    :attr:`PlacementGraph.meta`) gets ``comm``: the measured points, the fitted model and ``notes`` (warnings of
    :func:`fit_comm_model`)."""
    unavailable = [d.name for d in devices if d.kind == "cuda" and not _cuda_present(d)]
    if unavailable:
        raise PlacementError(f"cannot measure transfers: {', '.join(unavailable)} not present here")
    points, notes = measure_transfers(devices, sizes, repeats), []
    comm = fit_comm_model(points, notes)
    if meta is not None:
        meta["comm"] = {"points": {k: [list(p) for p in v] for k, v in points.items()}, "model": comm.to_dict(),
                        "notes": notes}
    return comm


def _cuda_present(device: Device) -> bool:
    index = int(device.name.partition(":")[2] or 0)
    return torch.cuda.is_available() and index < torch.cuda.device_count()
