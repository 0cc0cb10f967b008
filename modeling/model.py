"""Infini-attention GPT on megatron-core: GPTModel's embedding, layers and output, explicit memory."""

from __future__ import annotations

from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import make_viewless_tensor
from torch.utils.checkpoint import checkpoint

from modeling.config import InfiniTransformerConfig
from modeling.cross_entropy import vocab_parallel_cross_entropy
from modeling.layers import get_infini_block_spec, sums_gradient_over_tensor_parallel
from modeling.memory import InfiniMemory

LayerMemories = List[Optional[InfiniMemory]]


class InfiniGPTModel(GPTModel):
    """megatron-core GPTModel whose layers are Infini-attention layers (``get_infini_layer_spec``).

    ``forward(input_ids, labels, memory, reset)`` runs one window of ``n_segments * segment_length``
    tokens. ``memory`` is a list with one entry per layer *of this pipeline stage* (None = empty
    memory); each entry is an ``InfiniMemory(M [b, g_local, d_k, d_v], z [b, g_local, d_k])`` in
    float32 holding, per batch row, the heads this TP rank owns. The new list comes back beside the
    output; the model keeps no memory of its own, so the caller decides what carries over (and
    whether to detach). Works as any pipeline stage (pre_process / post_process).

    With ``config.sequence_parallel`` (megatron's sequence parallelism) the embedding scatters the
    window over the TP ranks along the sequence; norms and residuals run on [t / tp, b, h] slices, the
    column-parallel projections gather the sequence and the row-parallel ones scatter it again, and the
    output layer gathers it. The Infini memories are the same as without it (sharded by heads).

    With context parallelism (megatron's CP group of several ranks) input_ids, labels and reset are this
    rank's contiguous share of the window's segments; the memory in is the one at the window's start and
    the memory out the one after its end, the same on every rank of the group.
    """

    def __init__(
        self,
        config: InfiniTransformerConfig,
        vocab_size: int,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        rotary_base: int = 10000,
        parallel_output: bool = True,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(
            config=config,
            transformer_layer_spec=get_infini_block_spec(config, vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=config.infini_segment_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            vp_stage=vp_stage,
        )
        # RoPE positions restart in every segment and a context-parallel rank holds whole segments:
        # megatron's slicing of the positions over the CP ranks must not apply.
        self.rotary_pos_emb.cp_group = None
        tp_group = self.pg_collection.tp
        for name, param in self.named_parameters():
            if sums_gradient_over_tensor_parallel(name, param, config):
                # In backward, before the gradient reaches param.grad: ZeRO-2/3 take it from there for
                # their data-parallel reduction during backward, so it must be whole by then.
                param.register_hook(partial(_sum_over_group, group=tp_group))

    @property
    def layers(self):
        return self.decoder.layers

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        memory: Optional[LayerMemories] = None,
        reset: Optional[torch.Tensor] = None,
    ):
        """input_ids, labels: [b, t]; reset: bool [b, n_segments].

        Returns (output, new memory list). output: per-token loss [b, t] on the last stage with
        labels, logits [b, t, vocab/tp] without; hidden states [t, b, h] on other stages
        ([t / tp, b, h], this rank's slice, with sequence parallelism).
        """
        if memory is None:
            memory = [None] * len(self.layers)
        if len(memory) != len(self.layers):
            raise ValueError(f"memory has {len(memory)} entries for {len(self.layers)} local layers")

        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=None)
        else:
            hidden = self.decoder.input_tensor
        hidden = make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True)
        rotary = self.rotary_pos_emb(self.config.infini_segment_length)

        new_memory = []
        for layer, layer_memory in zip(self.layers, memory):
            if self.config.recompute_granularity == "full" and self.training:
                hidden, layer_memory = checkpoint(layer, hidden, rotary, layer_memory, reset, use_reentrant=False)
            else:
                hidden, layer_memory = layer(hidden, rotary, layer_memory, reset)
            new_memory.append(layer_memory)

        if not self.post_process:
            return hidden, new_memory
        hidden = self.decoder.final_layernorm(hidden)
        if labels is None:
            return self._logits(hidden).transpose(0, 1).contiguous(), new_memory
        chunk = self.config.infini_loss_chunk_tokens
        if not chunk or chunk >= labels.shape[1]:
            return self._loss(hidden, labels), new_memory
        return self._chunked_loss(hidden, labels, chunk), new_memory

    def _sequence_parallel_size(self) -> int:
        return self.pg_collection.tp.size() if self.config.sequence_parallel else 1

    def _chunked_loss(self, hidden, labels, chunk_tokens: int):
        """Per-token loss [b, t] computed chunk_tokens at a time, the logits recomputed in backward.

        With sequence parallelism hidden is this rank's slice of the window and the output layer
        gathers rows i..i+n of every rank's slice, i.e. n tokens at each of tp places of the window:
        the labels are taken in that order and the losses put back in window order.
        """
        ranks = self._sequence_parallel_size()
        lanes, local = labels.shape[0], hidden.shape[0]
        step = max(chunk_tokens // ranks, 1)
        labels_by_rank = labels.reshape(lanes, ranks, local)
        losses = [
            checkpoint(
                self._loss,
                hidden[i : i + step],
                labels_by_rank[:, :, i : i + step].reshape(lanes, -1),
                use_reentrant=False,
            ).view(lanes, ranks, -1)
            for i in range(0, local, step)
        ]
        return torch.cat(losses, dim=2).view(lanes, ranks * local)

    def _logits(self, hidden):
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits

    def _loss(self, hidden, labels):
        """Per-token loss [b, t] of hidden states [t, b, h]."""
        if self.config.infini_compile_loss:
            return vocab_parallel_cross_entropy(self._logits(hidden), labels, self.pg_collection.tp)
        return self.compute_language_model_loss(labels, self._logits(hidden))


def _sum_over_group(grad: torch.Tensor, group) -> torch.Tensor:
    summed = grad.clone()
    dist.all_reduce(summed, group=group)
    return summed


def build_model(
    config: InfiniTransformerConfig,
    vocab_size: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    tie_embeddings: bool = False,
    rotary_base: int = 10000,
    vp_stage: Optional[int] = None,
) -> InfiniGPTModel:
    return InfiniGPTModel(
        config,
        vocab_size,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tie_embeddings,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )


class ModelChunks(torch.nn.ModuleList):
    """A pipeline rank's model chunks (its virtual pipeline stages, ``vp_stage`` 0, 1, ...) in order: one
    module, so one optimizer and one DeepSpeed engine hold all of them. Parameter names start with the
    chunk index. ``forward(chunk, ...)`` runs that chunk's ``InfiniGPTModel.forward``."""

    def forward(self, chunk: int, *args, **kwargs):
        return self[chunk](*args, **kwargs)

    @property
    def layers(self) -> list:
        """Every local transformer layer, chunk by chunk."""
        return [layer for chunk in self for layer in chunk.layers]
