"""Run a model as a :class:`~ctzoo.scaling.placement.graph.Plan` places it: BaechiPyTorch's "assigners" (notes
section 4.4), on torch.fx.

:func:`place_model` traces the model as :mod:`.profile` did (the same node names), moves each module's parameters
and buffers to its node's device, and puts a move of every input a node reads from another device in front of it
(one per tensor and device, reused by every consumer there); the outputs come back on the *home* device, where
the input nodes are placed. A module without parameters or buffers called several times (``InstanceNorm2d``
without affine) may have its calls on several devices: each runs where the plan puts it. Logical CPU devices
(``cpu:0``, ``cpu:1``) are all torch's ``cpu``: a move between two of them is a ``clone()``, so the mechanism
runs, and is tested, on a machine without GPUs.

The result, a :class:`PlacedModule`, computes what the model computes and trains (autograd follows the moves);
its ``state_dict`` has the model's keys, so checkpoints load into the unplaced model. Only the profiled call is
placed: ``placed.module`` is the model itself (DDP's name for it), now spread over the devices, and any other
method (``placed.group(...)``, ``placed.embed(...)``) runs the model's own code under :func:`follow_devices`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only

from ctzoo.scaling.placement.graph import Device, PlacementError, Plan, plan_mismatches
from ctzoo.scaling.placement.profile import _adopt_module_tree, _cuda_present, module_state, node_names, trace_model

__all__ = ["PlacedModule", "check_plan_for_run", "follow_devices", "move_to", "place_model"]


def move_to(value: Any, device: str, copy: bool) -> Any:
    """Every tensor in ``value`` on torch ``device``; ``copy``: a ``clone()`` where ``.to`` has nothing to move
    (two logical devices of one torch device), so that each logical device holds its own tensor."""
    def move(tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.to(device)
        return moved.clone() if copy and moved is tensor else moved

    return tree_map_only(torch.Tensor, move, value)


class _FollowDevices(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if len({t.device for t in tensors}) > 1:  # a parameter stays where the plan put it; the rest come to it
            target = next((t.device for t in tensors if isinstance(t, nn.Parameter)), tensors[0].device)
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(target), (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def follow_devices() -> Iterator[None]:
    """Within it, an op whose tensors lie on several devices runs where its parameter (else its first tensor)
    is: the model's own code then runs on placed modules (evaluation, decoding). Slower than the placed graph
    (each op may move its inputs), and a no-op where everything shares one torch device."""
    with _FollowDevices():
        yield


def _following_devices(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with follow_devices():
            return method(*args, **kwargs)

    return call


class PlacedModule(fx.GraphModule):
    """A model's profiled call with its nodes on the plan's devices (see the module docstring).

    ``forward(*inputs)``: the model's forward on its leading arguments (the example inputs' count), outputs on
    ``home``. ``module``: the model itself. :meth:`place_modules` moves the modules back where the plan puts them
    (after code that moved the whole model, e.g. an evaluation's ``model.to(device)``).
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, locations: dict[str, str], home: str,
                 plan: Plan) -> None:
        super().__init__(model, graph, class_name=f"Placed{type(model).__name__}")
        _adopt_module_tree(self, model)
        self.__dict__["_source"] = model  # not a submodule: state_dict keys stay the model's
        self.locations, self.home, self.plan = locations, home, plan
        self.place_modules()

    @property
    def module(self) -> nn.Module:
        return self.__dict__["_source"]

    def place_modules(self) -> PlacedModule:
        """Each placed module's parameters and buffers (and each tensor the graph reads directly) on its device."""
        for target, device in self.locations.items():
            owner_name, _, name = target.rpartition(".")
            owner = self.get_submodule(owner_name)
            value = getattr(owner, name)
            if isinstance(value, nn.Module):
                value.to(device)
            elif isinstance(value, nn.Parameter):
                value.data = value.data.to(device)  # the same Parameter: optimisers keep theirs
            else:
                setattr(owner, name, value.to(device))  # a buffer (or plain tensor attribute)
        return self

    def train(self, mode: bool = True) -> PlacedModule:
        self.module.training = mode  # the children are shared; the model's own flag is not a child's
        return super().train(mode)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("_source")
            if source is None or name.startswith("__"):
                raise
            value = getattr(source, name)
            return _following_devices(value) if inspect.ismethod(value) else value


def place_model(model: nn.Module, plan: Plan, example_inputs: tuple[torch.Tensor, ...]) -> PlacedModule:
    """``model`` run as ``plan`` places it; ``example_inputs`` say how many leading forward arguments are inputs
    (as when it was profiled). The model's modules move to their devices (the model is changed in place).

    :class:`PlacementError` when the plan does not fit the model (made for another model, or for other leaf
    modules), names a device its device list lacks, or a device this machine does not have.
    """
    traced = trace_model(model, len(example_inputs), _plan_leaves(model, plan))
    names = node_names(traced)
    _check_coverage(set(names.values()), plan)
    devices = _plan_devices(plan)
    node_device = {node: devices[plan.placement[names[node.name]]] for node in traced.graph.nodes}
    inputs = [node for node in traced.graph.nodes if node.op == "placeholder"]
    home = node_device[inputs[0]] if inputs else plan.devices[0]
    locations = _locations(traced, node_device, names)
    _insert_moves(traced.graph, node_device, home)
    return PlacedModule(model, traced.graph, locations, home.torch_device, plan)


def check_plan_for_run(plan: Plan, model: nn.Module, training: bool, batch_size: int | None = None,
                       input_shapes: list[list[int]] | None = None) -> list[str]:
    """Warnings for running ``model`` as ``plan`` places it (training or inference, at ``batch_size`` with
    ``input_shapes`` when known), after :func:`~ctzoo.scaling.placement.graph.plan_mismatches`; a mismatch that
    voids the plan's memory figures (an inference plan for training, another model's parameter bytes) is a
    :class:`PlacementError`."""
    actual = {"training": training, "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if batch_size is not None:
        actual["batch_size"] = batch_size
    if input_shapes is not None:
        actual["input_shapes"] = input_shapes
    errors, warnings = plan_mismatches(plan, actual)
    if errors:
        raise PlacementError(f"this plan{f' ({plan.model})' if plan.model else ''} does not fit this run: "
                             + "; ".join(errors))
    return warnings


def _plan_leaves(model: nn.Module, plan: Plan) -> set[str]:
    """Modules the plan places whole (a profile's ``leaf_modules``): its node names that are modules of ``model``."""
    modules = {name for name, _ in model.named_modules()}
    return {name.split("#")[0] for name in plan.placement} & modules


def _check_coverage(graph_names: set[str], plan: Plan) -> None:
    missing, extra = sorted(graph_names - plan.placement.keys()), sorted(plan.placement.keys() - graph_names)
    if not missing and not extra:
        return
    parts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})" for names, what in
             ((missing, "of the model's nodes are not in it"), (extra, "of its nodes are not in the model"))
             if names]
    model = f" ({plan.model})" if plan.model else ""
    raise PlacementError(f"this plan{model} was made for another model: {' and '.join(parts)}. Profile this "
                         "model and place it again (ctzoo place)")


def _plan_devices(plan: Plan) -> dict[str, Device]:
    """Device name -> Device for every device the plan uses; each must be listed and present here."""
    listed = {d.name: d for d in plan.devices}
    unknown = sorted(set(plan.placement.values()) - listed.keys())
    if unknown:
        raise PlacementError(f"the plan places nodes on unknown device(s) {', '.join(unknown)}: its devices are "
                             f"{', '.join(listed) or 'none'}")
    absent = sorted(name for name in set(plan.placement.values())
                    if listed[name].kind == "cuda" and not _cuda_present(listed[name]))
    if absent:
        raise PlacementError(f"the plan places nodes on {', '.join(absent)}, which this machine does not have "
                             f"(torch sees {torch.cuda.device_count()} CUDA device(s)): place the model again "
                             "for the devices here")
    return listed


def _locations(traced: fx.GraphModule, node_device: dict[fx.Node, Device], names: dict[str, str]) -> dict[str, str]:
    """Qualified name -> torch device of every called module with parameters or buffers and every directly read
    parameter or buffer. A module without state is left out: each of its calls runs on its own call's device,
    where :func:`_insert_moves` brings its inputs. A module with state whose calls the plan puts on different
    devices is an error (its parameters and buffers live in one place)."""
    placed: dict[int, tuple[str, Device]] = {}
    locations = {}
    for node, device in node_device.items():
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            if not module_state(module):
                continue
            first = placed.setdefault(id(module), (names[node.name], device))
            if first[1].name != device.name:
                raise PlacementError(f"the plan puts {first[0]} on {first[1].name} and {names[node.name]} on "
                                     f"{device.name}, but they share parameters or buffers: place them together "
                                     "(one group)")
        if node.op in ("call_module", "get_attr"):
            locations[node.target] = device.torch_device
    return locations


def _insert_moves(graph: fx.Graph, node_device: dict[fx.Node, Device], home: Device) -> None:
    """Before each node, a :func:`move_to` of every input produced on another logical device (or an input of the
    model: it may come from anywhere); the output goes to ``home``."""
    moves: dict[tuple[fx.Node, str], fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "placeholder":
            continue
        device = home if node.op == "output" else node_device[node]
        for source in node.all_input_nodes:
            crossing = node_device[source].name != device.name
            if not crossing and source.op != "placeholder":
                continue
            key = (source, device.name)
            if key not in moves:
                with graph.inserting_before(node):
                    moves[key] = graph.call_function(move_to, (source, device.torch_device, crossing))
            node.replace_input_with(source, moves[key])
    graph.lint()
