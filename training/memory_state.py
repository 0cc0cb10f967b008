"""The Infini-attention memory a pipeline stage carries from one window of a lane to the next."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from modeling.infini_attention import InfiniMemory


class CarriedMemory:
    """Per microbatch slot (a fixed group of this rank's lanes), the memory of every local layer.

    Stored detached: gradients flow through the memory inside a window (full BPTT over its
    segments) and stop between windows. A slot that has not run yet holds None (empty memory).
    Resets inside the data zero a lane's memory where a new document starts, in the layers.
    """

    def __init__(self, num_slots: int, num_layers: int):
        self.num_slots = num_slots
        self.num_layers = num_layers
        self._slots: List[Optional[List[InfiniMemory]]] = [None] * num_slots

    def get(self, slot: int) -> Optional[List[InfiniMemory]]:
        return self._slots[slot]

    def set(self, slot: int, memories: List[InfiniMemory]) -> None:
        if len(memories) != self.num_layers:
            raise ValueError(f"expected memory for {self.num_layers} layers, got {len(memories)}")
        self._slots[slot] = [InfiniMemory(m.M.detach(), m.z.detach()) for m in memories]

    def max_norm(self) -> float:
        """Largest Frobenius norm of one head's M over lanes, heads and layers (0 when empty)."""
        norms = [m.M.flatten(2).norm(dim=-1).max() for slot in self._slots if slot for m in slot]
        return torch.stack(norms).max().item() if norms else 0.0

    def state_dict(self) -> Dict[str, object]:
        """Per layer, M and z of all the rank's lanes in lane order ([lanes, g, d, dv] / [lanes, g, d])."""
        if any(slot is None for slot in self._slots):
            return {"layers": None}
        layers = []
        for layer in range(self.num_layers):
            M = torch.cat([slot[layer].M for slot in self._slots]).cpu()
            z = torch.cat([slot[layer].z for slot in self._slots]).cpu()
            layers.append({"M": M, "z": z})
        return {"layers": layers}

    def load_state_dict(self, state: Dict[str, object], device=None) -> None:
        layers = state["layers"]
        if layers is None:
            self._slots = [None] * self.num_slots
            return
        if len(layers) != self.num_layers:
            raise ValueError(f"saved memory has {len(layers)} layers, this stage has {self.num_layers}")
        lanes = layers[0]["M"].shape[0]
        if lanes % self.num_slots:
            raise ValueError(f"saved memory holds {lanes} lanes, not divisible into {self.num_slots} microbatches")
        per_slot = lanes // self.num_slots
        self._slots = [
            [InfiniMemory(layer["M"][s * per_slot:(s + 1) * per_slot].to(device),
                          layer["z"][s * per_slot:(s + 1) * per_slot].to(device)) for layer in layers]
            for s in range(self.num_slots)
        ]
