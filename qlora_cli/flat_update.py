"""One 8-bit AdamW update call for all of a parameter group's adapter tensors, instead of one call per tensor.

bitsandbytes' 8-bit optimizers update each tensor with its own call (`Optimizer2State.update_step`): for a 7-8B
model's r=16 adapter on its seven projections, 448 calls a step, each building its config dict, making the weight
and gradient contiguous and dispatching one kernel. That is most of the host's time for the optimizer step, and at the
end of a step the host's work is what the GPU waits for (docs/performance.md, eleventh session: ~10 ms idle at
each step's start).

The 8-bit update is blockwise: every block of 256 elements has its own scales (absmax) for its two states, and each
element's update reads only its own weight, gradient and states. So where every tensor's size is a multiple of 256,
one call over the tensors laid end to end computes the same weights and states, bit for bit, as the calls one by
one. Here each of a group's states (state1, state2, absmax1, absmax2) is one buffer for the tensors whose states
bitsandbytes pages (paged optimizers, >= 1e5 elements, on a GPU) and one for the others, and each tensor's state is
a view into them: `state_dict()` / `load_state_dict()` keep bitsandbytes' per-tensor layout (a loaded state is
copied into new buffers at the next step). A step gathers the gradients and the weights into one buffer each
(`torch.cat`), makes one update call, and copies the weights back with one `torch._foreach_copy_` (two calls a step
where some states are paged and some are not).

On an H200 (Llama-3-8B adapter, `scripts/bench_optimizer.py`): bitsandbytes' weights bit for bit, host time of a step
14.7 -> 5.4 ms (paged_adamw_8bit) and 14.8 -> 2.4 ms (adamw_bnb_8bit); the training step's speed did not change
measurably (docs/performance.md, fifteenth session).

Used by qlora's bitsandbytes optimizer step (`qlora_cli/reliability.py`, `without_per_parameter_sync`) for AdamW
("adam") with 8-bit blockwise states and no per-parameter overrides. Tensors that are not whole blocks, too small
for 8-bit states (bitsandbytes keeps 32-bit ones) or at another step than the rest update one by one as before; the
per-tensor path works on the same views.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

BLOCK = 256
"""Elements per absmax block of bitsandbytes' 8-bit blockwise optimizer states."""

PLAIN = (torch.Tensor, torch.nn.Parameter)
"""Tensor types laid end to end (not tensor subclasses such as FSDP2's sharded DTensors)."""

DEVICES = ("cuda",)
"""Where tensors are updated together. What it saves is kernel launches and their Python; on the CPU bitsandbytes'
update is a dozen torch operations over float32 copies of the states, which for one 42M-element group run at half
the speed of the per-tensor calls (their copies stay in the caches): `python scripts/bench_optimizer.py --device
cpu` measured 1,024 ms a step against 524 for a Mistral-7B adapter."""


@dataclass
class FlatStates:
    """A group's states in one buffer each, and the per-tensor views handed to bitsandbytes' state dict."""

    params: tuple[torch.Tensor, ...]
    state1: torch.Tensor
    state2: torch.Tensor
    absmax1: torch.Tensor
    absmax2: torch.Tensor
    views: tuple[torch.Tensor, ...]  # each tensor's state1 view: a state dict loaded since no longer holds them
    flat_params: tuple[torch.Tensor, ...]  # each tensor's weights as one dimension (a view: written in place)
    sizes: tuple[int, ...]


def uses_flat_update(optimizer: Any) -> bool:
    """AdamW with 8-bit blockwise states and no per-parameter overrides (bitsandbytes' GlobalOptimManager), unless
    the first attempt failed (`flat_update`)."""
    args = optimizer.args
    return (getattr(optimizer, "optimizer_name", None) == "adam" and args.optim_bits == 8 and not args.max_unorm > 0
            and not optimizer.mng.index2config and not optimizer.mng.pid2config
            and not getattr(optimizer, "qlora_flat_off", False))


def qualifies(optimizer: Any, p: torch.Tensor) -> bool:
    """A plain tensor with a gradient of its own dtype, a whole number of 256-element blocks and large enough for
    8-bit states (smaller tensors get 32-bit states)."""
    g = p.grad
    return (g is not None and type(p) in PLAIN and g.dtype == p.dtype and not p.numel() % BLOCK
            and p.numel() >= optimizer.args.min_8bit_size)


def paged(optimizer: Any, p: torch.Tensor) -> bool:
    """Whether bitsandbytes' `get_state_buffer` pages this tensor's states (CUDA managed memory): paged optimizers,
    on a GPU, from 1e5 elements. Tensors are laid end to end only with others paged alike, so the states stay
    where bitsandbytes puts them (in torch's memory or paged) and `qlora footprint` keeps counting them right."""
    return bool(optimizer.is_paged) and p.device.type == "cuda" and p.numel() >= 1e5


def _buffer(optimizer: Any, n: int, dtype: torch.dtype, device: torch.device, in_pages: bool) -> torch.Tensor:
    """Zeros, paged as bitsandbytes' `get_state_buffer` pages them."""
    if not in_pages:
        return torch.zeros(n, dtype=dtype, device=device)
    from bitsandbytes import functional as F

    buff = F.get_paged(n, dtype=dtype, device=device)
    F.fill(buff, 0)
    optimizer.page_mng.paged_tensors.append(buff)
    return buff


def flat_states(optimizer: Any, params: list[torch.Tensor]) -> FlatStates | None:
    """The group's states as one buffer each, made (or made again, after a state dict was loaded) so that every
    tensor's state is a view into them; None where the tensors' steps differ or they hold 2^31 elements or more
    (then they update one by one)."""
    params_key = tuple(params)
    flat = getattr(optimizer, "qlora_flat", {}).get(id(params[0]))
    if (flat is not None and len(flat.params) == len(params) and all(a is b for a, b in zip(flat.params, params))
            and all(optimizer.state[p].get("state1") is v for p, v in zip(params, flat.views))
            and all(v.data_ptr() == p.data_ptr() for p, v in zip(params, flat.flat_params))):
        return flat
    steps = {optimizer.state[p].get("step", 0) for p in params}
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    if len(steps) != 1 or n >= 2**31:  # bitsandbytes passes the element count as a 32-bit int
        return None
    device = params[0].device
    in_pages = paged(optimizer, params[0])
    state1 = _buffer(optimizer, n, torch.uint8, device, in_pages)
    state2 = _buffer(optimizer, n, torch.uint8, device, in_pages)
    absmax1 = torch.zeros(n // BLOCK, dtype=torch.float32, device=device)
    absmax2 = torch.zeros(n // BLOCK, dtype=torch.float32, device=device)
    if "dynamic" not in optimizer.name2qmap:
        optimizer.fill_qmap()
    qmap1 = optimizer.name2qmap["dynamic"] = optimizer.name2qmap["dynamic"].to(device)
    qmap2 = optimizer.name2qmap["udynamic"] = optimizer.name2qmap["udynamic"].to(device)
    (step,) = steps
    laid_out, offset = [], 0
    for p, size in zip(params, sizes):
        state, views = optimizer.state[p], {}
        blocks = slice(offset // BLOCK, (offset + size) // BLOCK)
        for key, buffer, qmap in (("state1", state1, qmap1), ("state2", state2, qmap2), ("absmax1", absmax1, None),
                                  ("absmax2", absmax2, None)):
            view = buffer[blocks] if qmap is None else buffer[offset:offset + size].view(p.shape)
            if getattr(buffer, "is_paged", False):  # bitsandbytes marks its paged tensors (CPU tensors to torch)
                view.is_paged, view.page_deviceid = True, buffer.page_deviceid
            if key in state:  # a state from earlier steps or a loaded checkpoint
                view.copy_(state[key].reshape(view.shape))
            views[key] = view
            if qmap is not None:
                views["q" + key.replace("state", "map")] = qmap
        laid_out.append(views)
        offset += size
    for p, views in zip(params, laid_out):  # only now, all made: the states change all or not at all
        state = optimizer.state[p]
        state["step"] = step  # bitsandbytes' key order: step, state1, qmap1, state2, qmap2, absmax1, absmax2
        state.update(views)
    views = [optimizer.state[p]["state1"] for p in params]
    flat = FlatStates(params_key, state1, state2, absmax1, absmax2, tuple(views),
                      tuple(p.detach().view(-1) for p in params), tuple(sizes))
    optimizer.qlora_flat = {**getattr(optimizer, "qlora_flat", {}), id(params[0]): flat}
    return flat


@torch.no_grad()
def flat_update(optimizer: Any, gindex: int, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Update those of `params` (a group's tensors) that `qualifies` with one blockwise call for the paged ones and
    one for the others, where there are at least two such tensors on one device in one dtype at the same step;
    returns the tensors it updated (the caller updates the others one by one)."""
    if not uses_flat_update(optimizer):
        return []
    params = [p for p in params if qualifies(optimizer, p)]
    if not params or len({(p.device, p.dtype) for p in params}) != 1 or params[0].device.type not in DEVICES:
        return []
    done = []
    for in_pages in (True, False):
        alike = [p for p in params if paged(optimizer, p) == in_pages]
        if len(alike) < 2:
            continue
        first = id(alike[0]) not in getattr(optimizer, "qlora_flat", {})
        try:
            flat = flat_states(optimizer, alike)
            if flat is not None:
                _update(optimizer, optimizer.get_config(gindex, 0, group), alike, flat)
                done += alike
        except Exception as error:  # a bitsandbytes version or device this was not checked on; its own path works
            if not first:
                raise
            warnings.warn(f"qlora could not update the adapter's tensors with one bitsandbytes call ({error!r}); "
                          "they update one by one, as bitsandbytes does", stacklevel=2)
            optimizer.qlora_flat_off = True
            break
    return done


def _update(optimizer: Any, config: dict, params: list[torch.Tensor], flat: FlatStates) -> None:
    from bitsandbytes import functional as F

    betas = config["betas"]
    step = optimizer.state[params[0]]["step"] + 1
    grads = torch._C._nn.flatten_dense_tensors([p.grad for p in params])  # torch.cat of the flattened tensors
    weights = torch.cat(flat.flat_params)
    F.optimizer_update_8bit_blockwise(
        optimizer.optimizer_name, grads, weights, flat.state1, flat.state2, betas[0], betas[1],
        betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0), config["eps"], step, config["lr"],
        optimizer.state[params[0]]["qmap1"], optimizer.state[params[0]]["qmap2"], flat.absmax1, flat.absmax2,
        config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"])
    torch._foreach_copy_(flat.flat_params, weights.split_with_sizes(flat.sizes))
    for p in params:
        optimizer.state[p]["step"] = step
