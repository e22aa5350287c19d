"""SentenceVAE: a Sentence Encoder (sentence -> one vector) and a Sentence Decoder (vector ->
sentence), over packed sentences (all sentences of a batch in one ``(n, max_len)`` tensor)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.utils import ModelOutput

from .checkpointing import SafeCheckpointMixin
from .configuration_sentence_vae import SentenceVAEConfig
from .cross_entropy import output_layer_nll
from .decoding import ban_empty_sentence, blank_token_scores, causal_key_mask, context_start, pick_next_token
from .segmentation import build_boundary_table, segment_sentences
from .validation import check_attention_mask, check_budget, check_token_ids, logit_positions


GROUP_LENGTH_RATIO = 4 / 3
"""Sentences share a length group while the group's longest is at most this many times theirs."""

GROUP_MAX_TOKENS = 4096
"""Most padded tokens in one length group: bounds the transient memory of encoding a long prompt's
sentences (its encoder feed-forward materialises ``tokens x ffn_dim`` at once)."""

GROUP_MIN_TOKENS = 1024
"""Sentences that fill at most this many padded tokens run as one group: too little work for
padding to matter, and one call per layer is faster than several."""


def length_groups(lengths: list[int], max_tokens: int = GROUP_MAX_TOKENS) -> list[tuple[list[int], int]]:
    """Packed sentences grouped by length, longest first: ``[(rows, width)]`` where ``width`` is
    the longest of ``rows``. A group takes sentences while its longest is at most
    :data:`GROUP_LENGTH_RATIO` times theirs and it holds at most ``max_tokens`` padded tokens,
    so padding costs at most a third more work than the sentences themselves (against up to
    ``max_len / mean length`` times when every sentence is padded to the longest of the batch).
    Sentences that fill at most :data:`GROUP_MIN_TOKENS` padded tokens form one group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if order and len(order) * lengths[order[0]] <= GROUP_MIN_TOKENS:
        return [(order, lengths[order[0]])]
    groups, start = [], 0
    while start < len(order):
        width = lengths[order[start]]
        stop = start + 1
        while (
            stop < len(order)
            and lengths[order[stop]] * GROUP_LENGTH_RATIO >= width
            and (stop + 1 - start) * max(width, 1) <= max_tokens
        ):
            stop += 1
        groups.append((order[start:stop], width))
        start = stop
    return groups


def run_by_length(fn, lengths: torch.Tensor, min_width: int = 1) -> torch.Tensor:
    """``fn(rows, width)`` over the :func:`length_groups` of packed sentences of ``lengths``
    (``rows`` an index tensor, ``width`` at least ``min_width``), its per-row results put back in
    row order; one call on every row when a single group holds them all."""
    groups = length_groups(lengths.tolist())
    if len(groups) <= 1:
        return fn(slice(None), max(groups[0][1] if groups else 0, min_width))
    order = torch.tensor([row for rows, _ in groups for row in rows], device=lengths.device)
    results = [fn(torch.tensor(rows, device=lengths.device), max(width, min_width)) for rows, width in groups]
    return torch.cat(results)[torch.argsort(order)]


def sinusoidal_positions(position_ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Fixed sine/cosine embeddings of ``position_ids``, shape ``position_ids.shape + (dim,)``."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=position_ids.device) / half)
    angles = position_ids.unsqueeze(-1).float() * freq
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)


def make_norm(config: SentenceVAEConfig) -> nn.Module:
    """A norm over the hidden size of the kind ``config.norm`` names."""
    if config.norm == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class RotaryPositions(nn.Module):
    """Rotary position angles (RoPE, Llama's layout) for the self-attention of
    ``position_embedding="rotary"``, applied by `transformers`' ``apply_rotary_pos_emb``."""

    def __init__(self, config: SentenceVAEConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, both ``(n, q, head_dim)``, of ``position_ids`` ``(n, q)`` (``n`` may be 1)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device) / self.head_dim
        angles = position_ids.unsqueeze(-1).float() * self.theta**-exponents
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class SentencePositions(nn.Module):
    """Position embeddings of tokens within a sentence, added to the token embeddings (learned
    table or sinusoidal; nothing with rotary positions, which the attention applies); with a
    ``context_window``, a negative position ``-d`` is the context token ``d`` tokens before the
    sentence's first input (a learned table of its own, ``context_window - 1`` rows, except with
    rotary positions: they tell the context's tokens apart as a token model's tell the tokens of
    its text apart)."""

    def __init__(self, config: SentenceVAEConfig):
        super().__init__()
        self.dim = config.hidden_size
        self.kind = config.position_embedding
        self.table = nn.Embedding(config.max_sentence_len + 1, config.hidden_size) if self.kind == "learned" else None
        columns = config.context_window - 1  # the context's last token is the first input (context_start)
        self.context = nn.Embedding(columns, config.hidden_size) if columns > 0 and self.kind != "rotary" else None

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        inside = position_ids.clamp(min=0) if self.context is not None else position_ids
        if self.kind == "rotary":  # (a 0-dim zero: it broadcasts)
            embeddings = torch.zeros((), dtype=dtype, device=position_ids.device)
        elif self.kind == "sinusoidal":
            embeddings = sinusoidal_positions(inside, self.dim, dtype)
        else:
            embeddings = self.table(inside).to(dtype)
        if self.context is None:
            return embeddings
        before = self.context((-position_ids - 1).clamp(0, self.context.num_embeddings - 1)).to(dtype)
        return torch.where((position_ids < 0)[..., None], before, embeddings)


class SentenceAttention(nn.Module):
    """Multi-head attention (self or cross) on ``torch``'s fused scaled-dot-product kernel."""

    def __init__(self, config: SentenceVAEConfig, layer_idx: int | None = None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        projected_keys_values: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``projected_keys_values``: ``(n, k, 2 * hidden)`` keys and values already projected
        (from :meth:`project_keys_values`), instead of projecting ``key_value_states``.
        ``rotary``: the new inputs' rotary angles (self-attention only; cached keys keep theirs)."""
        query = self._heads(self.q_proj(hidden_states))
        if projected_keys_values is None:
            source = hidden_states if key_value_states is None else key_value_states
            key, value = self._heads(self.k_proj(source)), self._heads(self.v_proj(source))
        else:
            key, value = (self._heads(x) for x in projected_keys_values.chunk(2, dim=-1))
        if rotary is not None:
            query, key = apply_rotary_pos_emb(query, key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(hidden_states.shape)
        return self.out_proj(out)

    def project_keys_values(self, source: torch.Tensor) -> torch.Tensor:
        """Keys and values of ``source`` ``(n, k, hidden)`` as one ``(n, k, 2 * hidden)`` tensor."""
        return torch.cat([self.k_proj(source), self.v_proj(source)], dim=-1)


class FeedForward(nn.Module):
    def __init__(self, config: SentenceVAEConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)
        self.gate_proj = nn.Linear(config.hidden_size, config.ffn_dim) if config.gated_ffn else None
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)
        self.act = ACT2FN[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.fc2(self.act(self.fc1(x)))
        return self.fc2(self.act(self.gate_proj(x)) * self.fc1(x))


class SentenceEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm Transformer encoder layer: bidirectional self-attention, feed-forward.
    Checkpointed (its activations recomputed in the backward pass) after
    ``model.activation_checkpointing_enable()``."""

    def __init__(self, config: SentenceVAEConfig):
        super().__init__()
        self.self_attn = SentenceAttention(config)
        self.self_attn_layer_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.final_layer_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(
            self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, rotary=rotary)
        )
        return hidden_states + self.dropout(self.ffn(self.final_layer_norm(hidden_states)))


class SentenceDecoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm Transformer decoder layer: causal self-attention (cacheable),
    cross-attention to the sentence vector, feed-forward. Checkpointed after
    ``model.activation_checkpointing_enable()`` when it runs with gradients in training mode (then
    without a cache: `GradientCheckpointingLayer` drops a ``cache`` passed by keyword)."""

    def __init__(self, config: SentenceVAEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SentenceAttention(config, layer_idx=layer_idx)
        self.self_attn_layer_norm = make_norm(config)
        self.cross_attn = SentenceAttention(config)
        self.cross_attn_layer_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.final_layer_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        memory: torch.Tensor,
        cross: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``memory``: ``(n, m, H)`` the sentence vector as the decoder reads it (see
        :meth:`SentenceDecoder.memory`); ``cross``: what this layer's cross-attention needs of it,
        computed once per sentence (:meth:`cross_attention_state`), or ``None`` to attend to
        ``memory`` at every position (exact attention dropout in training); ``rotary``: the
        inputs' rotary angles, with ``position_embedding="rotary"``."""
        hidden_states = hidden_states + self.dropout(
            self.self_attn(
                self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, cache=cache, rotary=rotary
            )
        )
        if cross is None or memory.shape[1] > 1:
            cross = self.cross_attn(
                self.cross_attn_layer_norm(hidden_states), key_value_states=memory, projected_keys_values=cross
            )
        hidden_states = hidden_states + self.dropout(cross)
        return hidden_states + self.dropout(self.ffn(self.final_layer_norm(hidden_states)))

    def cross_attention_state(self, memory: torch.Tensor) -> torch.Tensor:
        """What this layer's cross-attention needs of memory ``(n, m, H)``, computed once per sentence.

        With one memory vector (``m = 1``) cross-attention attends to a single key, whose softmax
        weight is exactly 1 whatever the query: the output is ``out_proj(v_proj(memory))`` at
        every decoder position, returned as ``(n, 1, H)`` and added to every position instead of
        being recomputed per token (without attention dropout: not in training with it). With
        ``m > 1`` the attention depends on the query: its keys and values, ``(n, m, 2H)``."""
        attn = self.cross_attn
        if memory.shape[1] == 1:
            return attn.out_proj(attn.v_proj(memory))
        return attn.project_keys_values(memory)


@dataclass
class DecoderConditioning:
    """What the Sentence Decoder reads of each row's sentence vector (from
    :meth:`SentenceDecoder.conditioning`), so that it is computed once per sentence, not per token.

    Attributes:
        memory: ``(n, m, H)`` what cross-attention attends to (see :meth:`SentenceDecoder.memory`).
        cross: per decoder layer, what its cross-attention needs of ``memory`` (see
            :meth:`SentenceDecoderLayer.cross_attention_state`); ``None``: attend to ``memory``
            at every position (exact attention dropout in training).
        inputs: with ``condition_inputs``, the ``(n, 1, H)`` term added to every decoder input
            (:meth:`SentenceDecoder.input_condition`); else ``None``.
    """

    memory: torch.Tensor
    cross: list[torch.Tensor] | None = None
    inputs: torch.Tensor | None = None

    def select(self, rows: torch.Tensor | slice) -> "DecoderConditioning":
        """The conditioning of ``rows`` only."""
        return DecoderConditioning(
            self.memory[rows],
            None if self.cross is None else [c[rows] for c in self.cross],
            None if self.inputs is None else self.inputs[rows],
        )

    def assign(self, rows: torch.Tensor, other: "DecoderConditioning") -> None:
        """Put ``other`` (one row per entry of ``rows``) in place of ``rows``, in place."""
        self.memory[rows] = other.memory.to(self.memory.dtype)
        for mine, theirs in zip(self.cross or [], other.cross or [], strict=True):
            mine[rows] = theirs.to(mine.dtype)
        if self.inputs is not None:
            self.inputs[rows] = other.inputs.to(self.inputs.dtype)

    def to(self, dtype: torch.dtype) -> "DecoderConditioning":
        return DecoderConditioning(
            self.memory.to(dtype),
            None if self.cross is None else [c.to(dtype) for c in self.cross],
            None if self.inputs is None else self.inputs.to(dtype),
        )


class SentenceEncoder(nn.Module):
    """Token embeddings + positions -> encoder layers -> fusion into one vector -> LayerNorm."""

    def __init__(self, config: SentenceVAEConfig):
        super().__init__()
        self.fusion = config.fusion
        self.embed_positions = SentencePositions(config)
        self.rotary = RotaryPositions(config) if config.position_embedding == "rotary" else None
        self.layers = nn.ModuleList(SentenceEncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.layer_norm = make_norm(config)
        self.fusion_weight = nn.Linear(config.hidden_size, 1) if config.fusion == "learnable" else None
        self.output_layer_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        hidden = self.dropout(inputs_embeds + self.embed_positions(positions, inputs_embeds.dtype))
        rotary = self.rotary(positions[None], hidden.dtype) if self.rotary is not None else None
        key_mask = attention_mask[:, None, None, :]
        for layer in self.layers:
            hidden = layer(hidden, key_mask, rotary)
        hidden = self.layer_norm(hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.fusion == "learnable":
            scores = self.fusion_weight(hidden).masked_fill(~attention_mask.unsqueeze(-1), float("-inf"))
            fused = (scores.softmax(dim=1) * hidden).sum(dim=1)
        elif self.fusion == "sum":
            fused = (hidden * mask).sum(dim=1)
        else:
            fused = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return self.output_layer_norm(fused)


class SentenceDecoder(nn.Module):
    """Token embeddings + positions -> decoder layers attending to one sentence vector -> LayerNorm."""

    def __init__(self, config: SentenceVAEConfig):
        super().__init__()
        self.embed_positions = SentencePositions(config)
        self.rotary = RotaryPositions(config) if config.position_embedding == "rotary" else None
        self.num_memory_vectors = config.num_memory_vectors
        self.memory_proj = (
            nn.Linear(config.hidden_size, config.num_memory_vectors * config.hidden_size)
            if config.num_memory_vectors > 1
            else None
        )
        self.input_proj = nn.Linear(config.hidden_size, config.hidden_size) if config.condition_inputs else None
        if self.input_proj is not None:
            self.input_proj.starts_at_zero = True  # a new decoder starts as one without it
        self.layers = nn.ModuleList(SentenceDecoderLayer(config, i) for i in range(config.num_decoder_layers))
        self.layer_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        conditioning: DecoderConditioning,
        cache=None,
    ) -> torch.Tensor:
        """
        Args:
            inputs_embeds: ``(n, q, H)`` token embeddings of the new decoder inputs.
            position_ids: ``(n, q)`` (``n`` may be 1) positions of the new inputs within their sentence.
            attention_mask: ``(n, 1, q, k)`` boolean mask over every key, cached ones first
                (:func:`~sentence_lm.decoding.causal_key_mask`); ``None`` when every query sees
                every key.
            conditioning: the sentence vectors as the decoder reads them (:meth:`conditioning`).
            cache: self-attention cache, updated in place.
        """
        hidden = self.dropout(inputs_embeds + self.embed_positions(position_ids, inputs_embeds.dtype))
        if conditioning.inputs is not None:
            hidden = hidden + conditioning.inputs
        rotary = self.rotary(position_ids, hidden.dtype) if self.rotary is not None else None
        for i, layer in enumerate(self.layers):
            cross = None if conditioning.cross is None else conditioning.cross[i]
            hidden = layer(hidden, attention_mask, conditioning.memory, cross, cache=cache, rotary=rotary)
        return self.layer_norm(hidden)

    def conditioning(self, sentence_vectors: torch.Tensor, precompute: bool = True) -> DecoderConditioning:
        """What the decoder reads of sentence vectors ``(n, H)``; with ``precompute``, each layer's
        cross-attention state computed once per sentence (see
        :meth:`SentenceDecoderLayer.cross_attention_state`)."""
        memory = self.memory(sentence_vectors)
        return DecoderConditioning(
            memory,
            [layer.cross_attention_state(memory) for layer in self.layers] if precompute else None,
            self.input_condition(sentence_vectors) if self.input_proj is not None else None,
        )

    def memory(self, sentence_vectors: torch.Tensor) -> torch.Tensor:
        """What the layers cross-attend to: sentence vectors ``(n, H)`` as ``(n, m, H)``, the
        vector itself when ``num_memory_vectors`` is 1, else ``memory_proj``'s ``m`` vectors."""
        if self.memory_proj is None:
            return sentence_vectors.unsqueeze(1)
        return self.memory_proj(sentence_vectors).view(sentence_vectors.shape[0], self.num_memory_vectors, -1)

    def input_condition(self, sentence_vectors: torch.Tensor) -> torch.Tensor:
        """What ``condition_inputs`` adds to every input of a sentence, ``(n, 1, H)``. The vector
        is scaled to norm ~1 first (a LayerNorm-ed one has norm ~sqrt(H)): Adam moves each weight
        by about the learning rate per step, so the output would otherwise move sqrt(H) times as
        fast as the token embeddings it is added to."""
        return self.input_proj(sentence_vectors * sentence_vectors.shape[-1] ** -0.5).unsqueeze(1)


class DraftHead(nn.Module):
    """The draft head: every position of a sentence read from its sentence vector at once,
    without the tokens before it. A learned query per position cross-attends over the decoder's
    memory vectors, then a feed-forward block and a LayerNorm; the output layer turns the states
    into token logits. Generation drafts sentences with it (``draft_tokens``,
    :mod:`sentence_lm.drafting`); stage 1 can train it as an auxiliary loss
    (``SentenceVAEConfig.parallel_readout_weight``). A SentenceVAE holds it as
    ``parallel_readout``, the name its checkpoints store it under."""

    def __init__(self, config: SentenceVAEConfig):
        super().__init__()
        self.queries = nn.Embedding(config.max_sentence_len + 1, config.hidden_size)
        self.attn = SentenceAttention(config)
        self.attn_layer_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.final_layer_norm = make_norm(config)
        self.layer_norm = make_norm(config)

    def forward(self, memory: torch.Tensor, steps: int) -> torch.Tensor:
        """States ``(n, steps, H)`` of positions ``0..steps-1`` from memory ``(n, m, H)``."""
        queries = self.queries.weight[:steps].to(memory.dtype).expand(memory.shape[0], steps, -1)
        hidden = queries + self.attn(self.attn_layer_norm(queries), key_value_states=memory)
        hidden = hidden + self.ffn(self.final_layer_norm(hidden))
        return self.layer_norm(hidden)


class SentenceDecoderCache:
    """Key/value cache of the Sentence Decoder's self-attention, written in place.

    One ``(n, heads, capacity, head_dim)`` key and value buffer per layer, with the same
    ``update`` contract as `DynamicCache` but no growth by concatenation at every step: the
    buffers start at ``initial_width`` columns and double (up to ``max_width``) when a sentence
    outgrows them. Rows whose sentence is finished are dropped with :meth:`select`.

    Attributes:
        nbytes: the most bytes its buffers held at once.
    """

    def __init__(
        self,
        num_layers: int,
        n: int,
        num_heads: int,
        max_width: int,
        head_dim: int,
        dtype,
        device,
        initial_width: int | None = None,
    ):
        width = max_width if initial_width is None else min(max_width, initial_width)
        shape = (n, num_heads, width, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.max_width = max_width
        self.nbytes = self._held()

    def _held(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def _resize(self, layer_idx: int, rows: torch.Tensor | None, width: int) -> None:
        filled = self.lengths[layer_idx]
        for buffers in (self.keys, self.values):
            old = buffers[layer_idx]
            source = old[:, :, :filled] if rows is None else old[:, :, :filled].index_select(0, rows)
            new = old.new_empty((source.shape[0], old.shape[1], width, old.shape[3]))
            new[:, :, :filled] = source
            buffers[layer_idx] = new

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        capacity = self.keys[layer_idx].shape[2]
        if end > capacity:
            self._resize(layer_idx, None, min(self.max_width, max(end, 2 * capacity)))
            self.nbytes = max(self.nbytes, self._held())
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (an index tensor), in that order."""
        for i in range(len(self.keys)):
            self._resize(i, rows, self.keys[i].shape[2])


@dataclass
class SentenceVAEOutput(ModelOutput):
    """Output of [`SentenceVAEModel.forward`].

    Attributes:
        loss: the reconstruction loss (cross-entropy, or focal loss when ``focal_gamma > 0``) over
            every sentence token and the end-of-sentence token; plus ``bag_of_words_weight`` times
            ``bag_of_words_loss`` and ``parallel_readout_weight`` times ``parallel_readout_loss``
            when the config has those auxiliary losses.
        logits: ``(n, max_len + 1, vocab)`` decoder logits; step ``j`` predicts token ``j`` of
            the sentence and step ``len`` the end-of-sentence token (no meaning after it). ``None`` in
            training mode unless asked for (see ``logits_to_keep``).
        sentence_vectors: ``(n, hidden)`` encodings of the sentences.
        reconstruction_loss: with an auxiliary loss, the reconstruction part of ``loss``
            (without one, ``loss`` is the reconstruction loss and this is ``None``).
        bag_of_words_loss: with ``bag_of_words_weight > 0``, the mean NLL of the sentence's tokens
            from its vector alone (see `SentenceVAEModel.bag_of_words_loss`); else ``None``.
        parallel_readout_loss: with ``parallel_readout_weight > 0``, the mean NLL of every
            target (tokens and end) read by the :class:`DraftHead`; else ``None``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    sentence_vectors: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    bag_of_words_loss: torch.Tensor | None = None
    parallel_readout_loss: torch.Tensor | None = None


@dataclass
class SentenceDecodeOutput(ModelOutput):
    """Output of [`SentenceVAEModel.decode`].

    Attributes:
        sequences: ``(n, max_written)`` tokens written after the prefix, right-padded with
            ``pad_token_id``; the end-of-sentence token is not included.
        lengths: ``(n,)`` number of tokens written per row.
        ended: ``(n,)`` whether the row ended with the end-of-sentence token (``False``: cut by
            the length budget).
        cache: the decoder's self-attention cache (a [`SentenceDecoderCache`], when
            ``use_cache``); its ``nbytes`` is the memory it held.
        stopped: ``(n,)`` rows that ``stopping_criteria`` stopped (at any step of this call).
        scores: with ``output_scores``, ``(n, max_written, vocab)`` processed scores of each
            written token (aligned with ``sequences``); a position without a token holds
            ``-inf`` everywhere except ``0`` at ``pad_token_id``.
        logits: with ``output_logits``, the raw decoder logits of each written token, laid out
            as ``scores``.
    """

    sequences: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    ended: torch.Tensor | None = None
    cache: "SentenceDecoderCache | None" = None
    stopped: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def focal_mean(nll: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Mean of per-token NLLs ``nll``; focal loss ``(1 - p) ** gamma * nll`` when ``gamma > 0``."""
    if gamma > 0:
        nll = (1 - torch.exp(-nll)).pow(gamma) * nll
    return nll.mean()


class SentenceVAEPreTrainedModel(SafeCheckpointMixin, PreTrainedModel):
    """Weight initialisation and loading for SentenceVAE models."""

    config_class = SentenceVAEConfig
    config: SentenceVAEConfig
    base_model_prefix = "sentence_vae"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # its encoder and decoder layers are GradientCheckpointingLayers
    # Its attention always runs on torch's scaled_dot_product_attention (one query per step, short
    # sentences), whatever the setting: in a SentenceLM, `attn_implementation` picks the backbone's.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SentenceVAEModel):
            module.boundary_table.zero_()
        if getattr(module, "starts_at_zero", False):
            module.weight.zero_()
            module.bias.zero_()


class SentenceVAEModel(SentenceVAEPreTrainedModel):
    """The SentenceVAE: encodes packed sentences into one vector each and writes sentences back
    from vectors.

    Inputs are *packed sentences*: ``input_ids`` of shape ``(n, max_len)``, one sentence per
    row, right-padded, without BOS/EOS; ``max_len <= config.max_sentence_len``. Use
    [`SentenceTokenizer`] and [`pack_sentences`] to get them from text.

    The model also holds the sentence-boundary table of its tokenizer (a ``uint8`` buffer saved
    with the weights), so that :meth:`segment` cuts token ids into sentences without the
    tokenizer. Set it once with :meth:`set_boundary_table`.
    """

    def __init__(self, config: SentenceVAEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.decoder_embed_tokens = (
            None
            if config.share_embeddings
            else nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        )
        self.encoder = SentenceEncoder(config)
        self.decoder = SentenceDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bag_of_words_proj = (
            nn.Linear(config.hidden_size, config.hidden_size) if config.bag_of_words_weight > 0 else None
        )
        self.parallel_readout = DraftHead(config) if config.parallel_readout_weight > 0 else None
        self.register_buffer("boundary_table", torch.zeros(config.vocab_size, dtype=torch.uint8))
        source = "embed_tokens.weight" if config.share_embeddings else "decoder_embed_tokens.weight"
        self._tied_weights_keys = {"lm_head.weight": source}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def freeze_token_embeddings(self) -> None:
        """Keep the token embeddings and the output layer fixed in training (they hold most of a
        small SentenceVAE's parameters: no gradient, no optimizer state, and the output layer's
        weight-gradient matmul is skipped)."""
        for module in (self.embed_tokens, self.decoder_embed_tokens, self.lm_head):
            if module is not None:
                module.requires_grad_(False)

    def decoder_token_embeddings(self) -> nn.Embedding:
        """The token embeddings the Sentence Decoder reads: the encoder's (``share_embeddings``) or its own."""
        return self.embed_tokens if self.decoder_embed_tokens is None else self.decoder_embed_tokens

    # ----------------------------------------------------------------------------- vocabulary
    def _resize_token_embeddings(
        self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True, tokenizer=None
    ) -> nn.Embedding:
        """What `resize_token_embeddings` (the `transformers` method, on this model or on a
        SentenceLM holding it) does to the vocabulary; it then re-ties ``lm_head``.

        Resizes the token embeddings, ``lm_head`` and, when ``share_embeddings=False``, the
        decoder's own embeddings; sets ``config.vocab_size``; and resizes the boundary table.
        Rows of new ids in the boundary table come from ``tokenizer`` (by default the tokenizer
        attached as ``model.tokenizer``, if any: see :meth:`resize_boundary_table`). A size
        that would drop the padding, BOS or EOS id raises a ``ValueError`` before anything changes.
        """
        size = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        special = {
            name: getattr(self.config, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")
        }
        dropped = {name: value for name, value in special.items() if value >= size}
        if dropped:
            named = ", ".join(f"the {key[: -len('_token_id')]} token id is {value}" for key, value in dropped.items())
            raise ValueError(
                f"Cannot resize the token embeddings to {size} tokens: {named}, outside the new vocabulary, and "
                f"the model needs {'it' if len(dropped) == 1 else 'them'}. Resize to at least "
                f"{max(dropped.values()) + 1} tokens (usually `model.resize_token_embeddings(len(tokenizer))`), "
                f"or first point the special ids at ids below {size} "
                f"(`model.config.{next(iter(dropped))} = ...`, and the tokenizer's)."
            )
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.weight.shape[0]
        if self.decoder_embed_tokens is not None and self.decoder_embed_tokens.weight.shape[0] != size:
            old = self.decoder_embed_tokens
            new = self._get_resized_embeddings(old, size, mean_resizing=mean_resizing)
            new.requires_grad_(old.weight.requires_grad)
            self.decoder_embed_tokens = new
        self.resize_boundary_table(size, tokenizer if tokenizer is not None else getattr(self, "tokenizer", None))
        self.config.vocab_size = size
        return embeddings

    def resize_boundary_table(self, size: int, tokenizer=None) -> None:
        """Give the boundary table ``size`` rows (``resize_token_embeddings`` calls this).

        Rows of the ids kept are unchanged. A new id gets the flags ``tokenizer`` gives it (its
        ``boundary_table`` for a `SentenceTokenizer`, else :func:`build_boundary_table`), or 0
        (*not a boundary*: the token neither ends a sentence nor trails one) when there is no
        tokenizer, the tokenizer does not have that id, or the model has no table yet (an empty
        table stays empty, so :meth:`segment` still asks for :meth:`set_boundary_table`). Added
        special tokens (chat markers) get 0 either way: special tokens are never boundaries.
        """
        old = self.boundary_table
        table = torch.zeros(size, dtype=old.dtype, device=old.device)
        kept = min(size, old.shape[0])
        table[:kept] = old[:kept]
        if tokenizer is not None and size > kept and bool(old.any()):
            flags = getattr(tokenizer, "boundary_table", None)
            if not isinstance(flags, torch.Tensor):
                flags = build_boundary_table(tokenizer)
            end = min(size, flags.shape[0])
            if end > kept:
                table[kept:end] = flags[kept:end].to(table.device, table.dtype)
        self.boundary_table = table

    # ----------------------------------------------------------------------------- segmentation
    def set_boundary_table(self, tokenizer_or_table) -> None:
        """Store the sentence-boundary table of a tokenizer (or a table from
        :func:`build_boundary_table`) so that :meth:`segment` needs no tokenizer."""
        table = (
            tokenizer_or_table
            if isinstance(tokenizer_or_table, torch.Tensor)
            else build_boundary_table(tokenizer_or_table)
        )
        if table.shape[0] > self.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {table.shape[0]} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; build the model with vocab_size >= len(tokenizer), or grow it with "
                "`model.resize_token_embeddings(len(tokenizer))`."
            )
        self.boundary_table.zero_()
        self.boundary_table[: table.shape[0]] = table.to(self.boundary_table.device, torch.uint8)

    def segment(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_closed: bool = False,
        breaks: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sentence index of every token (``-1`` where ``attention_mask`` is 0), and with
        ``return_closed`` whether each text's last sentence is closed; ``breaks``: masked
        positions after which a sentence ends; see :func:`segment_sentences`."""
        if not bool(self.boundary_table.any()):
            raise ValueError(
                "This model has no sentence-boundary table yet; call "
                "`model.set_boundary_table(tokenizer)` with the tokenizer it was trained with."
            )
        return segment_sentences(
            input_ids, self.boundary_table, self.config.max_sentence_len, attention_mask, return_closed, breaks
        )

    # ----------------------------------------------------------------------------- encoder
    def _check_sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        check_token_ids(input_ids, self.config.vocab_size)
        mask = check_attention_mask(attention_mask, input_ids)
        if input_ids.shape[0] == 0:
            raise ValueError("Got an empty batch of sentences (input_ids.shape[0] == 0); pass at least one.")
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError(
                f"Sentence(s) {torch.nonzero(lengths == 0).flatten().tolist()} are empty (no unmasked token); "
                "every sentence needs at least one token."
            )
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError(
                "Packed sentences must be right-padded: each attention_mask row must be 1s then 0s "
                "(left or inner padding would shift positions and misplace the EOS target); use `pack_sentences`."
            )
        if int(lengths.max()) > self.config.max_sentence_len:
            raise ValueError(
                f"A sentence has {int(lengths.max())} tokens but max_sentence_len is "
                f"{self.config.max_sentence_len}; cut sentences with `segment_sentences` first."
            )
        return mask

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode packed sentences ``(n, max_len)`` into sentence vectors ``(n, hidden)``.

        Sentences run in groups of similar length (see :func:`length_groups`), each padded to
        its own longest rather than to the longest of all; the vectors do not depend on it."""
        mask = self._check_sentences(input_ids, attention_mask)
        return self._encode(input_ids, mask)

    def _encode(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1)
        embeds = self.embed_tokens(input_ids[:, : int(lengths.max())])  # one lookup: one embedding gradient
        return run_by_length(lambda rows, width: self.encoder(embeds[rows, :width], mask[rows, :width]), lengths)

    def encode_as_given(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder on sentences ``(n, width)`` as they are laid out, in one call: no input
        checks and no length groups. For generation loops, which encode sentences they built
        themselves, in shapes they choose (fixed ones, when compiled)."""
        return self.encoder(self.embed_tokens(input_ids), attention_mask)

    # ----------------------------------------------------------------------------- decoder
    def teacher_forced_states(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        sentence_vectors: torch.Tensor,
        word_dropout: float = 0.0,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decoder output states ``(n, max_len + 1, hidden)`` when it is fed ``BOS + sentence``
        (``lm_head`` turns them into logits); they mean nothing past each sentence's end step.
        With ``word_dropout``, each fed token after BOS is replaced by the padding token with that
        probability (stage-1 training, see ``SentenceVAEConfig.word_dropout``). ``context``:
        ``(ids, mask)``, both ``(n, context_window)``, the tokens before each sentence (left-padded,
        see :func:`context_before`), which the decoder reads first (``config.context_window``), the
        last of them in BOS's place (:func:`~sentence_lm.decoding.context_start`), the others in
        ``context_window - 1`` columns before it.

        Sentences run in groups of similar length, as in :meth:`encode`. What cross-attention
        needs of the sentence vector is computed once per sentence (see
        :meth:`SentenceDecoderLayer.cross_attention_state`), unless attention dropout is on in
        training."""
        lengths = mask.sum(dim=1)
        width = input_ids.shape[1]
        bos = torch.full_like(input_ids[:, :1], self.config.bos_token_id)
        decoder_ids = torch.cat([bos, input_ids], dim=1)
        if word_dropout > 0:
            blanked = torch.rand(decoder_ids.shape, device=decoder_ids.device) < word_dropout
            blanked[:, 0] = False
            decoder_ids = decoder_ids.masked_fill(blanked, self.config.pad_token_id)
        key_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        window = 0
        if context is not None:
            (context_ids, context_mask), decoder_ids[:, 0] = context_start(context, self.config.bos_token_id)
            window = context_ids.shape[1]
            decoder_ids = torch.cat([context_ids.to(decoder_ids.dtype), decoder_ids], dim=1)
            key_mask = torch.cat([context_mask.to(key_mask.dtype), key_mask], dim=1)
        embeds = self.decoder_token_embeddings()(decoder_ids)  # one lookup: one embedding gradient
        vectors = sentence_vectors.to(embeds.dtype)
        exact_cross = self.training and self.config.attention_dropout > 0
        conditioning = None if exact_cross else self.decoder.conditioning(vectors)
        positions = torch.arange(-window, width + 1, device=input_ids.device)
        columns = torch.arange(window + width + 1, device=input_ids.device)

        def run(rows: torch.Tensor | slice, group_width: int) -> torch.Tensor:
            steps = window + group_width + 1
            group_embeds = embeds[rows, :steps]
            states = self.decoder(
                group_embeds,
                positions[:steps].expand(group_embeds.shape[0], steps),
                causal_key_mask(columns[:steps], steps, key_mask[rows, :steps]),
                self.decoder.conditioning(vectors[rows], precompute=False) if exact_cross else conditioning.select(rows),
            )
            return F.pad(states[:, window:], (0, 0, 0, width - group_width))

        return run_by_length(run, lengths, min_width=0)

    def output_nll(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-step NLL ``(n,)`` (float32) of ``targets`` from decoder states ``(n, hidden)``:
        :func:`~sentence_lm.cross_entropy.output_layer_nll` on ``lm_head``'s weight (no logits
        kept; ``config.loss_chunk_size`` rows at a time), or cross-entropy of ``lm_head``'s own
        output when it is not a plain bias-free ``nn.Linear`` (an adapter or quantized layer)."""
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:
            return output_layer_nll(states, head.weight, targets, self.config.loss_chunk_size)
        return F.cross_entropy(head(states).float(), targets, reduction="none")

    def bag_of_words_loss(self, sentence_vectors: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean NLL of every sentence token under one softmax per sentence read from its vector
        alone (``bag_of_words_proj``, then the output layer); see ``SentenceVAEConfig.bag_of_words_weight``."""
        log_probs = self.lm_head(self.bag_of_words_proj(sentence_vectors)).float().log_softmax(dim=-1)
        return -log_probs.gather(1, input_ids)[mask].mean()

    def draft_head_nll(self, sentence_vectors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target NLL (float32) of the :class:`DraftHead` at every step that has a target
        in ``targets`` ``(n, steps)`` (from :meth:`reconstruction_targets`)."""
        states = self.parallel_readout(self.decoder.memory(sentence_vectors), targets.shape[1])
        has_target = targets != -100
        return self.output_nll(states[has_target], targets[has_target])

    def teacher_forced_logits(
        self, input_ids: torch.Tensor, mask: torch.Tensor, sentence_vectors: torch.Tensor
    ) -> torch.Tensor:
        """Decoder logits ``(n, max_len + 1, vocab)`` when it is fed ``BOS + sentence``."""
        return self.lm_head(self.teacher_forced_states(input_ids, mask, sentence_vectors))

    def reconstruction_targets(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Targets ``(n, max_len + 1)``: the sentence, then EOS, then ``-100``."""
        lengths = mask.sum(dim=1)
        targets = torch.cat([torch.where(mask, input_ids, -100), torch.full_like(input_ids[:, :1], -100)], dim=1)
        targets[torch.arange(len(lengths), device=targets.device), lengths] = self.config.eos_token_id
        return targets

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        **kwargs,
    ) -> SentenceVAEOutput | tuple:
        """Encode packed sentences and reconstruct them with teacher forcing.

        Args:
            input_ids: ``(n, max_len)`` packed sentences, right-padded.
            attention_mask: ``(n, max_len)``, 1 on real tokens.
            logits_to_keep: whether to return the decoder's logits: by default (``None``) in
                evaluation mode and not in training mode, where the loss is computed from the
                decoder states directly (:func:`~sentence_lm.cross_entropy.output_layer_nll`:
                the output layer runs on the steps that have a target only, and no
                ``(n, max_len + 1, vocab)`` tensor is built); ``0`` always, an empty tensor
                never.

        Returns:
            [`SentenceVAEOutput`] with the reconstruction loss, the logits (see above) and the vectors.
        """
        mask = self._check_sentences(input_ids, attention_mask)
        width = int(mask.sum(dim=1).max())
        input_ids, mask = input_ids[:, :width].long(), mask[:, :width]
        keep = logit_positions(logits_to_keep, self.training, width + 1, positions_supported=False)
        vectors = self._encode(input_ids, mask)
        word_dropout = self.config.word_dropout if self.training else 0.0
        states = self.teacher_forced_states(input_ids, mask, vectors, word_dropout)
        targets = self.reconstruction_targets(input_ids, mask)
        has_target = targets != -100
        if keep is None:
            logits, nll = None, self.output_nll(states[has_target], targets[has_target])
        else:  # the output layer once: the loss from the logits returned
            logits = self.lm_head(states)
            nll = F.cross_entropy(logits[has_target].float(), targets[has_target], reduction="none")
        loss = focal_mean(nll, self.config.focal_gamma)
        reconstruction = bag_of_words = readout = None
        if self.bag_of_words_proj is not None or self.parallel_readout is not None:
            reconstruction = loss
        if self.bag_of_words_proj is not None:
            bag_of_words = self.bag_of_words_loss(vectors, input_ids, mask)
            loss = loss + self.config.bag_of_words_weight * bag_of_words
        if self.parallel_readout is not None:
            readout = self.draft_head_nll(vectors, targets).mean()
            loss = loss + self.config.parallel_readout_weight * readout
        output = SentenceVAEOutput(
            loss=loss,
            logits=logits,
            sentence_vectors=vectors,
            reconstruction_loss=reconstruction,
            bag_of_words_loss=bag_of_words,
            parallel_readout_loss=readout,
        )
        return output if return_dict is not False else output.to_tuple()

    @torch.no_grad()
    def decode(
        self,
        sentence_vectors: torch.Tensor,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        max_new_tokens: int | torch.Tensor | None = None,
        do_sample: bool = False,
        logits_processor: LogitsProcessorList | None = None,
        use_cache: bool = True,
        history: torch.Tensor | None = None,
        stopping_criteria=None,
        output_scores: bool = False,
        output_logits: bool = False,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SentenceDecodeOutput:
        """Write one sentence per vector, all rows at once.

        Args:
            sentence_vectors: ``(n, hidden)`` vectors (from :meth:`encode` or a SentenceOPT).
            prefix_ids: optional ``(n, p)`` tokens each sentence must start with, *left*-padded;
                the decoder continues them. They are not repeated in the output.
            prefix_mask: ``(n, p)`` mask of ``prefix_ids`` (1 on real tokens).
            max_new_tokens: budget per row (an int or an ``(n,)`` tensor); the decoder also stops
                once a sentence holds ``max_sentence_len`` tokens, prefix included. A sentence
                without prefix gets at least one token before its end-of-sentence token.
            do_sample: sample from the processed distribution instead of taking the argmax.
            logits_processor: library logits processors/warpers (temperature, top-k, top-p,
                repetition penalty...) applied to each step's ``(n, vocab)`` scores. They see the
                running text as ``input_ids``: ``history`` followed by the tokens written so far
                in this sentence, ``(n, history_len + step)``, for all ``n`` rows at every step
                (a row that is not writing any more has ``pad_token_id`` in its new columns and
                zero scores, and what the processors make of it is ignored). The decoder's own
                inputs (BOS, prefix) are internal.
            use_cache: keep a key/value cache of the decoder's self-attention (same tokens,
                less work); ``False`` recomputes the whole prefix at every step.
            history: ``(n, h)`` token ids the processors see before this sentence's new tokens
                (for a SentenceLM: the prompt and the text written so far, left-padded); by
                default the prefix (``prefix_ids``, left-padded).
            stopping_criteria: a callable ``(input_ids, scores) -> (n,)`` bool tensor, checked
                after every written token on the same ``input_ids`` (now including that token)
                and processed scores as ``logits_processor``; a writing row it stops ends its
                sentence with that token, and every row it stops is reported in ``stopped``.
            output_scores: return the processed scores of each written token (``scores``).
            output_logits: return the raw logits of each written token (``logits``).
            context: ``(ids, mask)``, both ``(n, context_window)``: the tokens of the text before
                each sentence (left-padded, :func:`~sentence_lm.decoding.context_before`), which
                the decoder reads first (``config.context_window``), the last of them in BOS's
                place (:func:`~sentence_lm.decoding.context_start`); they are not written.

        Returns:
            [`SentenceDecodeOutput`].
        """
        if sentence_vectors.dim() != 2 or sentence_vectors.shape[1] != self.config.hidden_size:
            raise ValueError(
                f"sentence_vectors must have shape (n, {self.config.hidden_size}), got "
                f"{tuple(sentence_vectors.shape)}."
            )
        n, device = sentence_vectors.shape[0], sentence_vectors.device
        check_budget(max_new_tokens, n)
        if prefix_ids is None:
            prefix_ids = torch.empty(n, 0, dtype=torch.long, device=device)
        check_token_ids(prefix_ids, self.config.vocab_size, "prefix_ids")
        if prefix_ids.shape[0] != n:
            raise ValueError(f"prefix_ids has {prefix_ids.shape[0]} rows but there are {n} sentence vectors.")
        prefix_mask = check_attention_mask(prefix_mask, prefix_ids)
        prefix_len = prefix_mask.sum(dim=1)
        pad, eos = self.config.pad_token_id, self.config.eos_token_id
        if bool((prefix_mask[:, 1:].int() < prefix_mask[:, :-1].int()).any()):
            raise ValueError("prefix_ids must be left-padded: in every row, padding first and real tokens last.")
        if history is None:
            history = torch.where(prefix_mask, prefix_ids, pad)
        elif history.dim() != 2 or history.shape[0] != n:
            raise ValueError(f"history must have shape ({n}, history_len), got {tuple(history.shape)}.")
        history = history.to(device=device, dtype=torch.long)
        budget = torch.as_tensor(
            self.config.max_sentence_len if max_new_tokens is None else max_new_tokens, device=device
        ).expand(n)
        budget = torch.minimum(budget, self.config.max_sentence_len - prefix_len).clamp(min=0)

        # Left-padded decoder inputs [pad.., BOS, prefix.., written..] in preallocated buffers, so
        # that every row's last column is real; column `first + j` holds the j-th written token.
        rows = torch.arange(n, device=device)
        first = prefix_ids.shape[1] + 1
        steps = int(budget.max()) if n else 0
        total = first + steps
        tokens = torch.full((n, total), pad, dtype=torch.long, device=device)
        key_mask = torch.ones(n, total, dtype=torch.bool, device=device)
        tokens[:, 1:first] = prefix_ids
        key_mask[:, 0] = False
        key_mask[:, 1:first] = prefix_mask
        tokens[rows, first - 1 - prefix_len] = self.config.bos_token_id
        key_mask[rows, first - 1 - prefix_len] = True
        positions = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0, max=self.config.max_sentence_len)
        if context is not None:  # the context's columns first, at positions -window..-1 (window: context_window - 1)
            (context_ids, context_mask), tokens[rows, first - 1 - prefix_len] = context_start(
                context, self.config.bos_token_id
            )
            window = context_ids.shape[1]
            tokens = torch.cat([context_ids.to(tokens.dtype), tokens], dim=1)
            key_mask = torch.cat([context_mask.bool(), key_mask], dim=1)
            positions = torch.cat([torch.arange(-window, 0, device=device).expand(n, window), positions], dim=1)
            first, total = first + window, total + window
        # Without padding (no prefix, or prefixes of one length) one-query steps need no mask.
        padded = not bool(key_mask[:, :first].all())

        embed_tokens = self.decoder_token_embeddings()
        dtype = embed_tokens.weight.dtype
        conditioning = self.decoder.conditioning(sentence_vectors.to(dtype), precompute=not self.training)
        cache = None
        if use_cache:
            num_heads = self.config.num_attention_heads
            cache = SentenceDecoderCache(
                self.config.num_decoder_layers,
                n,
                num_heads,
                total,
                self.config.hidden_size // num_heads,
                dtype,
                device,
                initial_width=first + 16,  # most sentences are shorter; longer ones grow it
            )
        written = torch.full((n, steps), pad, dtype=torch.long, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        ended = torch.zeros(n, dtype=torch.bool, device=device)
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        vocab = self.config.vocab_size
        kept_scores = kept_logits = None
        if output_scores or output_logits:
            kept_scores = blank_token_scores(n, steps, vocab, pad, device) if output_scores else None
            kept_logits = blank_token_scores(n, steps, vocab, pad, device) if output_logits else None

        # The loop works on the rows still writing (`active`, their indices into the n rows) and
        # drops a row as soon as its sentence is finished.
        active = rows
        active_lengths = lengths.clone()
        active_budget, active_prefix_len = budget, prefix_len

        def keep_rows(keep: torch.Tensor) -> None:
            nonlocal active, active_lengths, active_budget, active_prefix_len, tokens, key_mask, positions, conditioning
            active, active_lengths = active[keep], active_lengths[keep]
            active_budget, active_prefix_len = active_budget[keep], active_prefix_len[keep]
            tokens, key_mask, positions = tokens[keep], key_mask[keep], positions[keep]
            conditioning = conditioning.select(keep)
            if cache is not None:
                cache.select(keep)

        if steps and bool((budget == 0).any()):
            keep_rows(torch.nonzero(budget > 0).squeeze(1))
        fed = 0
        for step in range(steps):
            if active.shape[0] == 0:
                break
            end = first + step
            new = slice(fed if use_cache else 0, end)
            mask = None
            if padded or end - new.start > 1:
                mask = causal_key_mask(torch.arange(new.start, end, device=device), end, key_mask[:, :end])
            hidden = self.decoder(embed_tokens(tokens[:, new]), positions[:, new], mask, conditioning, cache)
            logits = self.lm_head(hidden[:, -1]).float()
            raw_logits = logits
            fed = end
            if step == 0:  # later steps follow a written token
                logits = ban_empty_sentence(logits, active_prefix_len, eos)
            all_rows = active.shape[0] == n
            running = None
            if logits_processor is not None or stopping_criteria is not None:
                # Every row's running text so far; processors see all n rows, in order.
                running = torch.cat([history, written[:, :step]], dim=1)
            if logits_processor is not None:
                full = logits if all_rows else logits.new_zeros(n, logits.shape[1]).index_copy_(0, active, logits)
                full = logits_processor(running, full)
                logits = full if all_rows else full[active]
            next_tokens = pick_next_token(logits, do_sample)
            is_eos = next_tokens == eos
            written[:, step].index_copy_(0, active, torch.where(is_eos, pad, next_tokens))
            active_lengths += (~is_eos).long()
            tokens[:, end] = next_tokens
            finished = is_eos | (active_lengths >= active_budget)
            if kept_scores is not None or kept_logits is not None:
                kept = active[~is_eos]
                column = active_lengths[~is_eos] - 1
                if kept_scores is not None:
                    kept_scores[kept, column] = logits[~is_eos]
                if kept_logits is not None:
                    kept_logits[kept, column] = raw_logits[~is_eos]
            if stopping_criteria is not None and not bool(is_eos.all()):
                # Checked after each token of the text (an end-of-sentence token adds none).
                if all_rows:
                    full_scores = logits
                else:
                    full_scores = logits.new_zeros(n, logits.shape[1]).index_copy_(0, active, logits)
                halt = stopping_criteria(torch.cat([history, written[:, : step + 1]], dim=1), full_scores)
                stopped |= halt
                finished |= halt[active] & ~is_eos
            if bool(finished.any()):
                done_rows = active[finished]
                lengths[done_rows] = active_lengths[finished]
                ended[done_rows] = is_eos[finished]
                keep_rows(torch.nonzero(~finished).squeeze(1))
        width = int(lengths.max()) if n else 0
        return SentenceDecodeOutput(
            sequences=written[:, :width],
            lengths=lengths,
            ended=ended,
            cache=cache,
            stopped=stopped,
            scores=kept_scores[:, :width] if kept_scores is not None else None,
            logits=kept_logits[:, :width] if kept_logits is not None else None,
        )
