"""Stream a token sequence of any length through an Infini-attention model with constant memory.

``StreamingModel(model).feed(tokens)`` takes the next tokens of every row of a batch and returns
their logits; it may be called any number of times with any number of tokens. Whole segments go
through ``model.forward`` a window of ``window_segments`` segments at a time, carrying the
compressive memory (detached, no autograd). A partial segment at the end of what was fed is run
incrementally, without padding: its per-layer keys and values are cached (local attention of new
tokens reads them; the memory is only read), and when later tokens complete the segment its cached
keys and values are written into the memory exactly as the model would have. So one token at a
time (generation) costs one token through the layers plus attention over at most one segment, and
any split of a stream into ``feed`` calls gives the logits of one pass over the whole stream.

A model without the memory (``model.memory=false``) streams the same way and carries nothing: each
token sees the tokens before it in its own segment only.

``memory_ablated(model)`` forces every gate fully local for its duration: the model then sees
nothing beyond the current segment (the control for "is it the memory that does it").
``memory_ablated(model, heads=[(layer, head), ...])`` forces only those heads' gates local: which heads
the model's use of the memory depends on.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from modeling.cpu_compat import megatron_on_cpu
from modeling.infini_attention import apply_rotary, retrieve, scaled_sigma
from modeling.layers import InfiniCoreAttention
from modeling.memory import InfiniMemory, empty_memory, memory_dtype


def gates_by_layer(model) -> List[torch.nn.Parameter]:
    """Each layer's gate parameter [heads], in layer order (layers counted from 0); ValueError for a model
    without the memory (it has no gates)."""
    cores = sorted((m for m in model.modules() if isinstance(m, InfiniCoreAttention)), key=lambda m: m.layer_number)
    if not all(core.has_memory for core in cores):
        raise ValueError("the model has no memory to ablate (model.memory=false): it sees one segment already")
    return [core.gate for core in cores]


def check_heads(gates: List[torch.nn.Parameter], heads: Iterable[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """heads as a list of (layer, head) pairs, or ValueError naming the first that gates (per layer) lack."""
    heads = [(int(layer), int(head)) for layer, head in heads]
    for layer, head in heads:
        if not (0 <= layer < len(gates) and 0 <= head < gates[layer].numel()):
            raise ValueError(
                f"no head {layer}:{head} to ablate: the model has layers 0-{len(gates) - 1} "
                f"of heads 0-{gates[0].numel() - 1}"
            )
    return heads


def memory_ablated(model, heads: Optional[Iterable[Tuple[int, int]]] = None):
    """Gates at -inf (sigmoid = 0, exactly): attention is the local softmax only; restored on exit.
    Every head's, or only the (layer, head) pairs in heads (checked now: ValueError names one the model lacks)."""
    gates = gates_by_layer(model)
    return _gates_forced_local(gates, None if heads is None else check_heads(gates, heads))


@contextlib.contextmanager
def _gates_forced_local(gates: List[torch.nn.Parameter], heads: Optional[List[Tuple[int, int]]]):
    saved = [g.detach().clone() for g in gates]
    with torch.no_grad():
        if heads is None:
            for g in gates:
                g.fill_(float("-inf"))
        else:
            for layer, head in heads:
                gates[layer][head] = float("-inf")
    try:
        yield
    finally:
        with torch.no_grad():
            for g, s in zip(gates, saved):
                g.copy_(s)


class _SegmentCache(NamedTuple):
    """One layer's keys (RoPE-rotated, and raw for the memory write) and values of the current
    partial segment: [b, kv_heads, tokens so far, d]."""

    k_rotated: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def write_segment(
    memory: InfiniMemory, k: torch.Tensor, v: torch.Tensor, update: str, key_scale: Union[float, torch.Tensor] = 1.0
) -> InfiniMemory:
    """The memory after one whole segment of raw keys k and values v [b, g, n, d] (the core's rule,
    writing sigma(key_scale * k); key_scale a number or one per KV head [g])."""
    sk = scaled_sigma(k, key_scale)
    v = v.to(sk.dtype)
    if update == "linear":
        M = memory.M + sk.transpose(-1, -2) @ v
    else:
        M = memory.M + sk.transpose(-1, -2) @ (v - retrieve(sk, memory.M, memory.z))
    return InfiniMemory(M, memory.z + sk.sum(dim=2))


class StreamingModel:
    """Feeds a stream window by window; holds the memory of whole segments and the partial one.

    model: an ``InfiniGPTModel`` on one device holding every layer (TP = PP = 1). vocab_size: the
    real vocabulary (logits are sliced to it; the model's is padded). Everything runs under
    ``torch.no_grad()`` and ``megatron_on_cpu()``.
    """

    def __init__(self, model, vocab_size: Optional[int] = None, window_segments: int = 8):
        if not (model.pre_process and model.post_process):
            raise ValueError("StreamingModel needs the whole model on one device (one pipeline stage)")
        if window_segments < 1:
            raise ValueError(f"window_segments must be >= 1, got {window_segments}")
        self.model = model
        self.segment_length = model.config.infini_segment_length
        self.window = window_segments * self.segment_length
        self.vocab_size = vocab_size
        self.has_memory = model.config.infini_memory
        self.reset()

    def reset(self) -> None:
        """Start a new stream: empty memory, no partial segment."""
        self.memory: Optional[List[InfiniMemory]] = None
        self.cache: Optional[List[_SegmentCache]] = None
        self.position = 0

    def snapshot(self) -> tuple:
        """The stream's state. Its tensors are never changed in place, so ``restore`` continues from
        here whatever was fed in between (e.g. to score and to decode after one prefill)."""
        return self.memory, self.cache, self.position

    def restore(self, state: tuple) -> None:
        self.memory, self.cache, self.position = state

    @property
    def pending(self) -> int:
        """Tokens of the current partial segment."""
        return self.position % self.segment_length

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [b, n] to every row's stream; returns their logits [b, n, vocab] in float32."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [batch, n >= 1], got shape {tuple(tokens.shape)}")
        L, n = self.segment_length, tokens.shape[1]
        outputs, i = [], 0
        with megatron_on_cpu():
            if self.pending:
                i = min(L - self.pending, n)
                outputs.append(self._extend(tokens[:, :i]))
            whole_end = i + (n - i) // L * L
            for start in range(i, whole_end, self.window):
                chunk = tokens[:, start : min(start + self.window, whole_end)]
                logits, memory = self.model(chunk, memory=self.memory)
                if self.has_memory:
                    self.memory = [InfiniMemory(m.M.detach(), m.z.detach()) for m in memory]
                self.position += chunk.shape[1]
                outputs.append(logits)
            if whole_end < n:
                outputs.append(self._extend(tokens[:, whole_end:]))
        logits = torch.cat(outputs, dim=1)
        return logits[..., : self.vocab_size].float() if self.vocab_size else logits.float()

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [b, n] (n >= 1) a window at a time; only the last position's logits [b, vocab]
        are kept, so a prompt of any length needs memory for one window."""
        if tokens.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        for start in range(0, tokens.shape[1], self.window):
            logits = self.feed(tokens[:, start : start + self.window])
        return logits[:, -1]

    @torch.no_grad()
    def score(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [b, n - 1] of tokens[:, 1:] given what precedes them (in this stream and
        earlier feeds), fed a window at a time so no more than one window's logits exist."""
        logprobs = []
        for start in range(0, tokens.shape[1], self.window):
            chunk = tokens[:, start : start + self.window]
            logits = self.feed(chunk)
            targets = tokens[:, start + 1 : start + 1 + chunk.shape[1]]
            step = torch.log_softmax(logits[:, : targets.shape[1]], dim=-1)
            logprobs.append(step.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
        return torch.cat(logprobs, dim=1)

    def _extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run tokens [b, n] of the current segment (pending + n <= segment_length) incrementally."""
        model, L = self.model, self.segment_length
        start = self.pending
        b, n = tokens.shape
        if self.memory is None and self.has_memory:
            dtype = memory_dtype(next(model.parameters()).dtype)
            c = model.config
            self.memory = [
                empty_memory(b, c.num_query_groups, c.kv_channels, c.kv_channels, device=tokens.device, dtype=dtype)
                for _ in model.layers
            ]
        freqs = model.rotary_pos_emb(L)[start : start + n]
        hidden = model.embedding(input_ids=tokens, position_ids=None)
        cache = []
        for index, layer in enumerate(model.layers):
            previous = self.cache[index] if self.cache is not None and start else None
            memory = self.memory[index] if self.has_memory else None
            hidden, layer_cache = _layer_extend(layer, hidden, freqs, memory, previous)
            cache.append(layer_cache)
        self.position += n
        if self.pending:
            self.cache = cache
        else:
            if self.has_memory:
                update = model.config.infini_update
                self.memory = [
                    write_segment(m, c.k, c.v, update, layer.self_attention.core_attention.memory_scales()[0])
                    for m, c, layer in zip(self.memory, cache, model.layers)
                ]
            self.cache = None
        hidden = model.decoder.final_layernorm(hidden)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight)
        return logits.transpose(0, 1)


def _layer_extend(layer, hidden, freqs, memory: Optional[InfiniMemory], cache: Optional[_SegmentCache]):
    """``InfiniTransformerLayer.forward`` for the next tokens of a segment whose earlier keys and
    values are cached. hidden [n, b, H]; freqs: RoPE angles of the n positions in the segment; memory
    None for a layer without the memory."""
    attention = layer.self_attention
    residual = hidden
    query, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(hidden))
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, n, d]
    new = _SegmentCache(apply_rotary(k, freqs), k, v)
    if cache is not None:
        new = _SegmentCache(*(torch.cat([old, cur], dim=2) for old, cur in zip(cache, new)))
    b, h, n, d = q.shape
    g, total = new.k.shape[1], new.k.shape[2]
    keys, values = new.k_rotated, new.v
    if g != h:
        keys, values = keys.repeat_interleave(h // g, dim=1), values.repeat_interleave(h // g, dim=1)
    # New token i sits at position total - n + i of the segment and sees keys 0..that position.
    visible = torch.arange(total, device=q.device)[None, :] <= torch.arange(total - n, total, device=q.device)[:, None]
    local = F.scaled_dot_product_attention(apply_rotary(q, freqs), keys, values, attn_mask=visible)
    core = attention.core_attention
    if core.has_memory:
        sq = scaled_sigma(q, core.memory_scales()[1]).reshape(b, g, h // g, n, d)
        from_memory = retrieve(sq, memory.M.unsqueeze(2), memory.z.unsqueeze(2)).reshape(b, h, n, -1)
        weight = torch.sigmoid(core.gate.to(sq.dtype)).view(1, h, 1, 1)
        context = (weight * from_memory + (1.0 - weight) * local.to(sq.dtype)).to(q.dtype)
    else:
        context = local
    output, bias = attention.linear_proj(context.permute(2, 0, 1, 3).reshape(n, b, -1))
    with layer.bias_dropout_add_exec_handler():
        hidden = layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)(
            (output, bias), residual, layer.hidden_dropout
        )
    return layer._forward_mlp(hidden), new
