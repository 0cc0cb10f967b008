"""The Infini-attention memory a pipeline stage carries from one window of a lane to the next."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from modeling.memory import InfiniMemory


class CarriedMemory:
    """Per model chunk and microbatch slot (a fixed group of this rank's lanes), the memory of every
    layer of the chunk.

    Stored detached: gradients flow through the memory inside a window (full BPTT over its
    segments) and stop between windows. A slot that has not run yet holds None (empty memory).
    Resets inside the data zero a lane's memory where a new document starts, in the layers.
    """

    def __init__(self, num_slots: int, layers_per_chunk: List[int], device=None):
        self.num_slots = num_slots
        self.layers_per_chunk = list(layers_per_chunk)
        self.num_layers = sum(self.layers_per_chunk)
        # Where load_state_dict puts the memory (None: where the saved tensors are).
        self.device = device
        self._slots: List[List[Optional[List[InfiniMemory]]]] = self._empty()

    def _empty(self) -> List[List[Optional[List[InfiniMemory]]]]:
        return [[None] * self.num_slots for _ in self.layers_per_chunk]

    def get(self, chunk: int, slot: int) -> Optional[List[InfiniMemory]]:
        return self._slots[chunk][slot]

    def set(self, chunk: int, slot: int, memories: List[Optional[InfiniMemory]]) -> None:
        """The layers' memories after a window; a model without the memory returns None for every layer
        and the slot stays empty."""
        if len(memories) != self.layers_per_chunk[chunk]:
            raise ValueError(
                f"expected memory for the {self.layers_per_chunk[chunk]} layers of chunk {chunk}, got {len(memories)}"
            )
        if all(m is None for m in memories):
            self._slots[chunk][slot] = None
            return
        self._slots[chunk][slot] = [InfiniMemory(m.M.detach(), m.z.detach()) for m in memories]

    def max_norm(self) -> float:
        """Largest Frobenius norm of one head's M over lanes, heads and layers (0 when empty)."""
        norms = [m.M.flatten(2).norm(dim=-1).max() for chunk in self._slots for slot in chunk if slot for m in slot]
        return torch.stack(norms).max().item() if norms else 0.0

    def state_dict(self) -> Dict[str, object]:
        """Per local layer (chunk by chunk), M and z of all the rank's lanes in lane order ([lanes, g, d, dv] /
        [lanes, g, d])."""
        if any(slot is None for chunk in self._slots for slot in chunk):
            return {"layers": None}
        layers = []
        for chunk in self._slots:
            for layer in range(len(chunk[0])):
                layers.append(
                    {
                        "M": torch.cat([slot[layer].M for slot in chunk]).cpu(),
                        "z": torch.cat([slot[layer].z for slot in chunk]).cpu(),
                    }
                )
        return {"layers": layers}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        layers = state["layers"]
        if layers is None:
            self._slots = self._empty()
            return
        if len(layers) != self.num_layers:
            raise ValueError(f"saved memory has {len(layers)} layers, this rank has {self.num_layers}")
        lanes = layers[0]["M"].shape[0]
        if lanes % self.num_slots:
            raise ValueError(f"saved memory holds {lanes} lanes, not divisible into {self.num_slots} microbatches")
        per_slot = lanes // self.num_slots
        self._slots = []
        first = 0
        for count in self.layers_per_chunk:
            chunk_layers = layers[first : first + count]
            first += count
            self._slots.append(
                [
                    [
                        InfiniMemory(
                            layer["M"][s * per_slot : (s + 1) * per_slot].to(self.device),
                            layer["z"][s * per_slot : (s + 1) * per_slot].to(self.device),
                        )
                        for layer in chunk_layers
                    ]
                    for s in range(self.num_slots)
                ]
            )


def regather_memory(
    saved: List[dict],
    saved_tensor_size: int,
    saved_layers: List[List[int]],
    global_lanes: int,
    layers: List[int],
    lanes: List[int],
    tensor_rank: int,
    tensor_size: int,
) -> Dict[str, object]:
    """The carried memory of one rank of another layout, from the memory every rank of a checkpoint saved.

    ``saved``: per old rank, ``{"coordinates", "lane_ids", "memory"}`` (as in its rank state): the
    memory of its lanes, of its pipeline rank's layers (``saved_layers[pipeline rank]``: their global
    indices in local order), of the KV groups its TP rank owns (contiguous, ``groups / tp`` each).
    Returns, in ``CarriedMemory.state_dict`` form, global ``layers`` for
    ``lanes`` (in that order) and the KV groups of ``tensor_rank`` of ``tensor_size``. Every
    (layer, lane, group) must be saved exactly once.
    """
    if any(s["memory"]["layers"] is None for s in saved):
        return {"layers": None}
    saved_groups = saved[0]["memory"]["layers"][0]["M"].shape[1]
    groups = saved_groups * saved_tensor_size
    if groups % tensor_size:
        raise ValueError(f"the memory's {groups} KV groups do not split over {tensor_size} tensor-parallel ranks")
    mine = slice(tensor_rank * groups // tensor_size, (tensor_rank + 1) * groups // tensor_size)
    out = []
    for layer in layers:
        stage = next(stage for stage, held in enumerate(saved_layers) if layer in held)
        local = saved_layers[stage].index(layer)
        holders = [s for s in saved if s["coordinates"]["pipeline"] == stage]
        sample = holders[0]["memory"]["layers"][local]["M"]
        M = torch.zeros(global_lanes, groups, *sample.shape[2:], dtype=sample.dtype)
        z = torch.zeros(global_lanes, groups, sample.shape[2], dtype=sample.dtype)
        covered = torch.zeros(global_lanes, groups, dtype=torch.int64)
        for s in holders:
            rows = torch.tensor(s["lane_ids"])
            cols = slice(s["coordinates"]["tensor"] * saved_groups, (s["coordinates"]["tensor"] + 1) * saved_groups)
            M[rows, cols] = s["memory"]["layers"][local]["M"]
            z[rows, cols] = s["memory"]["layers"][local]["z"]
            covered[rows, cols] += 1
        if not bool((covered == 1).all()):
            lane, group = (covered != 1).nonzero()[0].tolist()
            raise ValueError(
                f"the saved memory of layer {layer} holds lane {lane}, KV group {group} "
                f"{int(covered[lane, group])} times, not once"
            )
        rows = torch.tensor(lanes)
        out.append({"M": M[rows, mine].clone(), "z": z[rows, mine].clone()})
    return {"layers": out}
