"""The row-scheduled runtime of next-sentence generation.

Every row of a batch advances on its own. At each decoder step every unfinished row writes one
token of its current sentence; the rows whose sentence ended (and only those) are encoded and
take one backbone step together, and start their next sentence at the following step. No row
waits for the longest sentence of the batch, as it does in the lockstep loop
(:meth:`SentenceGenerationMixin._generate_sentences`, the reference path), where each round runs
as many decoder steps as the batch's longest sentence. (Rows whose sentence ended may wait a few
steps for each other, so that backbone steps run fuller: :func:`rows_per_backbone_step`.)

The state lives in preallocated buffers updated in place: the backbone's key/value cache over
sentence slots ([`SlotCache`], every row writing at its own slot), the Sentence Decoder's cache
over the tokens of a sentence ([`RowDecoderCache`], every row at its own position), the sentence
being written, masks and positions. With ``static=True`` (``cache_implementation="static"``)
every shape is fixed in advance: the slot cache holds every slot the call can fill, the backbone
step runs on the ready rows padded to a power of two (the encoder on sentences padded to a power
of two); so that `torch.compile` compiles the decoder step once and the backbone step once per
bucket (at most ``log2(batch) + 1`` graphs), without recompiling as generation proceeds. The
encoder, called once per backbone step with two shapes that vary, runs eagerly.
"""

from __future__ import annotations

import torch
from transformers import Cache, LogitsProcessorList
from transformers.cache_utils import CacheLayerMixin
from transformers.utils import logging

from .decoding import (
    DecodingResult,
    ban_empty_sentence,
    blank_token_scores,
    causal_key_mask,
    context_before,
    context_start,
    pick_next_token,
    running_text,
    stop_decision,
)
from .drafting import verify_draft

logger = logging.get_logger(__name__)
MAX_WAIT = 4
"""Decoder steps a row whose sentence ended waits at most for others to share its backbone step."""
GROWTH = 8
"""Free slot columns the eager runtime's backbone cache allocates ahead when it grows."""
ROW_ATTENTION = ("eager", "sdpa")
"""Backbone attention implementations the row-scheduled runtime can hand a per-row mask to."""


def rows_per_backbone_step(batch: int) -> int:
    """How many rows whose sentence ended the loop gathers for one backbone step (they wait for
    each other at most ``MAX_WAIT`` decoder steps). A backbone step for a few rows costs nearly
    what it costs for many where it is bound by reading the weights or launching kernels, so
    fewer, fuller steps are cheaper; but a waiting row writes nothing. A quarter of the batch:
    on the 2-core CPU, OPT-125M shape, batch 32, fp32 (benchmarks/RESULTS.md), 1 row gave 1.63x
    the token model's tokens/s, 4 rows 1.92x, 8 rows 2.14x, 16 rows 2.10x."""
    return max(1, batch // 4)


def _bucket(n: int, limit: int, smallest: int = 1) -> int:
    """The smallest power of two ``>= n`` (and ``>= smallest``), at most ``limit``."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, limit)


class _SlotLayer(CacheLayerMixin):
    """One backbone layer's keys and values, ``(rows, kv_heads, slots, head_dim)``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.owner.valid.shape[0], key_states.shape[1], self.owner.capacity)
        self.keys = key_states.new_zeros(shape + (key_states.shape[3],))
        self.values = value_states.new_zeros(shape + (value_states.shape[3],))
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:2] + (capacity,) + old.shape[3:])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, columns, width = self.owner.rows, self.owner.columns, self.owner.width
        if rows is None:  # the prompt: columns 0.. of every row
            length = key_states.shape[2]
            self.keys[: key_states.shape[0], :, :length] = key_states
            self.values[: key_states.shape[0], :, :length] = value_states
            return key_states, value_states
        self.keys[rows, :, columns] = key_states[:, :, 0]
        self.values[rows, :, columns] = value_states[:, :, 0]
        return self.keys[rows, :, :width], self.values[rows, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return self.owner.filled

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """The backbone's key/value cache over sentence slots when rows are scheduled independently:
    each row writes its next sentence at its own slot column (``rows`` and ``columns`` point the
    next step at them), and reads its columns ``[0, width)`` back under its own mask.

    With ``scratch``, one more row than ``batch`` takes the writes of the padding rows of a
    bucketed step (static shapes).

    Attributes:
        filled: the number of slot columns used so far (the longest row's).
        capacity: the columns allocated (grown as rows need more, unless static).
        valid: ``(rows, capacity)`` which columns of each row hold a slot.
        nbytes: the bytes its key and value buffers hold.
        slot_nbytes: the bytes of the slots the rows hold (without padding and free columns).
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, device, scratch: bool = False):
        self.batch, self.capacity, self.filled = batch, capacity, 0
        self.rows = self.columns = None
        self.width = capacity
        self.valid = torch.zeros(batch + int(scratch), capacity, dtype=torch.bool, device=device)
        if scratch:
            self.valid[batch, 0] = True  # the scratch row attends to something (no NaN)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled

    def reserve(self, columns: int, limit: int) -> None:
        """Hold at least ``columns`` slot columns: grown to ``GROWTH`` more (at most ``limit``) if short."""
        if columns <= self.capacity:
            return
        capacity = min(limit, columns + GROWTH)
        for layer in self.layers:
            if layer.is_initialized:
                layer.grow(capacity)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], capacity - self.capacity)], dim=1)
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)
        )

    @property
    def slot_nbytes(self) -> int:
        held = int(self.valid[: self.batch].sum())
        return self.nbytes * held // (self.valid.numel()) if self.nbytes else 0


class RowDecoderCache:
    """The Sentence Decoder's self-attention cache when every row writes at its own position:
    ``(batch, heads, width, head_dim)`` per layer, ``width`` at most ``max_sentence_len + 1``
    (plus the drafted tokens a verification step feeds past it, and the ``context_window - 1``
    columns of the context before the sentence, first); ``columns`` ``(batch, q)`` points a step
    of ``q`` tokens per row at where each row writes them (with ``rows``, only those rows take
    the step: ``columns`` is then ``(len(rows), q)``).

    Attributes:
        width: the columns allocated (grown as sentences need more, unless static).
        nbytes: the bytes its buffers hold.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, width: int, head_dim: int, dtype, device):
        shape = (batch, num_heads, width, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.width = width
        self.columns: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, columns: int, limit: int) -> None:
        """Hold at least ``columns`` columns: grown to ``GROWTH`` more (at most ``limit``) if short."""
        if columns <= self.width:
            return
        width = min(limit, columns + GROWTH)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = torch.cat([old, old.new_zeros(old.shape[:2] + (width - self.width,) + old.shape[3:])], dim=2)
        self.width = width

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(keys.shape[0], device=keys.device) if self.rows is None else self.rows
        keys[rows[:, None], :, self.columns] = key.transpose(1, 2)
        values[rows[:, None], :, self.columns] = value.transpose(1, 2)
        return (keys, values) if self.rows is None else (keys[rows], values[rows])


class RowSteps:
    """The three steps of the row-scheduled loop on preallocated state, as methods that
    `torch.compile` can capture: :meth:`decoder_step` (all rows, one token each, or one token and
    ``draft`` drafted ones), :meth:`encode` (finished sentences to vectors) and
    :meth:`backbone_step` (those vectors, one slot each, for the rows that finished); with
    ``draft > 0`` also the draft head's states of each row's sentence (:meth:`start_drafts`,
    :meth:`draft_logits`)."""

    def __init__(self, model, batch: int, slot_capacity: int, dtype, device, static: bool, draft: int = 0):
        vae = model.sentence_vae
        config = vae.config
        self.model, self.vae, self.batch, self.draft = model, vae, batch, draft
        self.width = config.max_sentence_len + 1  # BOS + the tokens a sentence can feed
        # The context's columns come first (its last token is a sentence's first input: context_start);
        # drafted tokens past a full sentence are fed, never kept.
        self.context_tokens = config.context_window
        self.window = max(config.context_window - 1, 0)
        self.cache_limit = self.window + self.width + draft
        heads = config.num_attention_heads
        self.decoder_cache = RowDecoderCache(
            config.num_decoder_layers,
            batch,
            heads,
            self.cache_limit if static else min(self.cache_limit, self.window + GROWTH + 1 + draft),
            config.hidden_size // heads,
            dtype,
            device,
        )
        self.context_valid = torch.ones(batch, self.window, dtype=torch.bool, device=device)
        backbone_config = model.config.backbone.get_text_config()
        self.slots = SlotCache(backbone_config.num_hidden_layers, batch, slot_capacity, device, scratch=static)
        self.eager_mask = model.model.attention_implementation == "eager"
        self.columns_index = torch.arange(self.cache_limit, device=device)
        self.draft_states = (
            torch.zeros(batch, self.width, config.hidden_size, dtype=dtype, device=device) if draft else None
        )
        self.draft_chunk = min(self.width, 2 * draft)

    # ------------------------------------------------------------------ decoder
    def decoder_step(self, tokens: torch.Tensor, positions: torch.Tensor, conditioning) -> torch.Tensor:
        """Feed ``tokens`` ``(batch, q)`` at positions ``positions, positions + 1, ..`` of each
        row's sentence (``positions``: ``(batch,)``); the next-token logits after each,
        ``(batch, q, vocab)`` in float32. ``conditioning``: each row's `DecoderConditioning`."""
        vae = self.vae
        at = positions[:, None] + self.columns_index[: tokens.shape[1]]
        mask = causal_key_mask(at + self.window, self.decoder_cache.width, self.key_valid())
        self.decoder_cache.columns = at + self.window
        # Drafted tokens past a full sentence get its last position: their logits are never used.
        embeds = vae.decoder_token_embeddings()(tokens)
        hidden = vae.decoder(embeds, at.clamp(max=self.width - 1), mask, conditioning, self.decoder_cache)
        return vae.lm_head(hidden).float()

    def key_valid(self, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Which decoder cache columns hold a key of each row (of ``rows``, default all): without
        context columns all (``None``); with them, those the row's text filled, and every column
        after them (the causal mask hides what the sentence has not written yet)."""
        if not self.window:
            return None
        valid = self.context_valid if rows is None else self.context_valid[rows]
        return torch.cat([valid, valid.new_ones(valid.shape[0], self.decoder_cache.width - self.window)], dim=1)

    def context_prefill(
        self, rows: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor], conditioning
    ) -> torch.Tensor:
        """Feed each of ``rows`` the context of the sentence it starts (``(ids, valid)``, both
        ``(len(rows), context_window)``, from :func:`~sentence_lm.decoding.context_before`): all
        but its last token at positions ``-(context_window - 1)..-1``, into the first columns of
        the decoder cache; the other rows are untouched. ``conditioning``: those rows'
        `DecoderConditioning`. Returns the rows' first decoder inputs, the context's last tokens
        (BOS where there is none; see :func:`~sentence_lm.decoding.context_start`), which take
        the cache's following column."""
        (ids, valid), start = context_start(context, self.vae.config.bos_token_id)
        if not self.window:  # a one-token context: its token is the first input, nothing more
            return start
        self.context_valid[rows] = valid
        vae, cache = self.vae, self.decoder_cache
        columns = self.columns_index[: self.window]
        cache.rows, cache.columns = rows, columns.expand(len(rows), -1)
        embeds = vae.decoder_token_embeddings()(ids)
        mask = causal_key_mask(columns, cache.width, self.key_valid(rows))
        vae.decoder(embeds, (columns - self.window)[None, :], mask, conditioning, cache)
        cache.rows = None
        return start

    def decoder_prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, conditioning) -> torch.Tensor:
        """Feed ``[BOS, prefix..]`` ``(batch, q)`` (right-padded, ``lengths`` real tokens per row)
        at positions ``0..``; the logits after each row's last real token."""
        vae = self.vae
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        columns = positions + self.window  # after the context (context_prefill), if any
        self.decoder_cache.columns = columns.expand(tokens.shape[0], -1)
        mask = causal_key_mask(columns, self.decoder_cache.width, self.key_valid())
        embeds = vae.decoder_token_embeddings()(tokens)
        hidden = vae.decoder(embeds, positions[None, :], mask, conditioning, self.decoder_cache)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return vae.lm_head(hidden[rows, lengths - 1]).float()

    # ------------------------------------------------------------------ draft head
    def start_drafts(self, rows: torch.Tensor, states: torch.Tensor) -> None:
        """The draft head's states of every position of the sentences that ``rows`` start from
        backbone states ``states`` ``(b, hidden)``."""
        vae = self.vae
        memory = vae.decoder.memory(states.to(self.draft_states.dtype))
        self.draft_states[rows] = vae.parallel_readout(memory, self.width)

    def draft_logits(self, rows: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The draft head's logits ``(len(rows), draft_chunk, vocab)`` (float32) for sentence
        indices ``starts, starts + 1, ..`` of ``rows`` (past the sentence's end: its last index).
        One call drafts ``draft_chunk`` (twice ``draft``) indices, so that a row needs new drafts
        every few passes only: the output layer's weights are read once for all of them."""
        at = (starts[:, None] + self.columns_index[: self.draft_chunk]).clamp(max=self.width - 1)
        return self.vae.lm_head(self.draft_states[rows[:, None], at]).float()

    # ------------------------------------------------------------------ encoder
    def encode(self, sentences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.vae.encode_as_given(sentences, mask)

    # ------------------------------------------------------------------ backbone
    def _run_backbone(self, inputs: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The backbone on ``inputs`` ``(b, q, hidden)`` with a prepared ``(b, q, k)`` key mask
        (boolean for sdpa, additive for eager) and position ids ``(b, q)``, writing to the slot
        cache; the last query's states ``(b, hidden)``."""
        mask = valid[:, None]
        if self.eager_mask:
            mask = torch.where(mask, 0.0, torch.finfo(inputs.dtype).min).to(inputs.dtype)
        return self.model.model.backbone_forward(inputs, mask, positions, self.slots).last_hidden_state[:, -1]

    def backbone_step(
        self, rows: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, width: int
    ) -> torch.Tensor:
        """Append one slot per row in ``rows`` (``vectors`` ``(b, hidden)`` at ``columns``, with
        backbone position ids ``positions``) and return the backbone's new states ``(b, hidden)``."""
        slots = self.slots
        slots.valid[rows, columns] = True
        slots.rows, slots.columns, slots.width = rows, columns, width
        return self._run_backbone(vectors[:, None], slots.valid[rows, None, :width], positions[:, None])

    def backbone_prefill(self, inputs: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        """The prompts' slots ``(batch, p, hidden)`` (left-padded, ``slot_mask``) into columns
        ``0..p-1``; the last slot's states ``(batch, hidden)``."""
        p = inputs.shape[1]
        slots = self.slots
        slots.valid[: self.batch, :p] = slot_mask
        slots.rows = slots.columns = None
        index = torch.arange(p, device=inputs.device)
        valid = slot_mask[:, None, :] & (index[None, None, :] <= index[None, :, None])  # (batch, q, k)
        valid = valid | (index[None, None, :] == index[None, :, None])  # padding slots see themselves
        state = self._run_backbone(inputs, valid, (slot_mask.long().cumsum(dim=1) - 1).clamp(min=0))
        slots.filled = p
        return state

    def buffers(self) -> list[torch.Tensor]:
        """The tensors the steps update in place (for CUDA graphs: addresses that stay put)."""
        layers = [t for layer in self.slots.layers if layer.is_initialized for t in (layer.keys, layer.values)]
        return [*self.decoder_cache.keys, *self.decoder_cache.values, *layers, self.slots.valid]


def compile_steps(steps: RowSteps, compile_config) -> None:
    """Replace the steps' methods by `torch.compile`d ones (settings from a `CompileConfig`;
    ``dynamic=None`` becomes ``False``: the shapes are bucketed already).

    The buffers the steps update in place are marked as static addresses, so that on CUDA the
    default ``mode="reduce-overhead"`` can capture the steps as CUDA graphs.

    Where compiling cannot work (dynamo unsupported on this platform, an unknown backend, or a
    backend that fails, e.g. no C++ compiler for inductor on a CPU), a warning says so and the
    steps run eagerly: the same results, without the speed-up."""
    options = compile_config.to_dict() if compile_config is not None else {}
    options = {k: v for k, v in options.items() if k in ("fullgraph", "dynamic", "backend", "mode", "options")}
    if options.get("dynamic") is None:
        options["dynamic"] = False
    if not torch._dynamo.is_dynamo_supported():
        logger.warning_once("torch.compile is not supported on this platform; generating without compiling.")
        return
    for buffer in steps.buffers():
        torch._dynamo.mark_static_address(buffer)
    for name in ("decoder_step", "backbone_step"):
        eager = getattr(steps, name)
        try:
            compiled = torch.compile(eager, **options)
        except torch._dynamo.exc.InvalidBackend as err:
            logger.warning_once(f"torch.compile cannot use this compile_config ({err}); generating without compiling.")
            return
        setattr(steps, name, _falls_back(steps, name, compiled, eager))


def _falls_back(steps: RowSteps, name: str, compiled, eager):
    """``compiled``, which puts ``eager`` in its place (with a warning) if its backend fails."""

    def call(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            logger.warning_once(
                f"torch.compile failed ({type(err.inner_exception).__name__}: {err.inner_exception}); "
                "generating without compiling."
            )
            setattr(steps, name, eager)
            return eager(*args)

    return call


def generate_rows(
    model,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    max_new: int,
    min_new: int,
    do_sample: bool,
    processors: LogitsProcessorList | None,
    streamer,
    pad_token_id: int,
    stopping_criteria=None,
    output_scores: bool = False,
    output_logits: bool = False,
    static: bool = False,
    compile_config=None,
    draft_tokens: int = 0,
) -> tuple:
    """The next-sentence loop with rows scheduled independently (see the module docstring); the
    same contract as the lockstep loop (:meth:`SentenceGenerationMixin._generate_sentences`),
    returning a `DecodingResult` whose ``cache`` is a [`SlotCache`], ``decoder_cache`` a
    [`RowDecoderCache`], with the decoder passes each row took. ``compile_config`` (with
    ``static``): compile the steps with these settings. The rows whose sentence ended wait (at most
    ``MAX_WAIT`` decoder steps, and never when no other row is writing) until
    :func:`rows_per_backbone_step` of them take their backbone step together.

    ``draft_tokens > 0`` (the model's SentenceVAE has a draft head, its ``parallel_readout``):
    each decoder pass feeds a row's last token followed by the ``draft_tokens`` tokens the draft
    head reads for the next sentence indices from the sentence's backbone state, and the row
    keeps, in order, every token its own logits choose while the drafted token before it was the
    one chosen (:func:`~sentence_lm.drafting.verify_draft`: exact for greedy decoding, speculative
    sampling's acceptance rule when sampling). Processors, stopping criteria, the streamer and
    the scores see each kept token as they would without drafts: the text is the same for greedy
    decoding, and sampled from the same distribution."""
    pad = pad_token_id
    batch, device = input_ids.shape[0], input_ids.device
    vae, base = model.sentence_vae, model.model
    config = vae.config
    eos, bos, max_len = config.eos_token_id, config.bos_token_id, config.max_sentence_len
    limit = model.config.max_position_embeddings

    # The prompt: closed sentences feed the backbone, an unfinished last one is the decoder's prefix.
    prompt = base.prompt_slots(input_ids, mask)
    in_prefix, inputs, slot_mask = prompt.in_prefix, prompt.inputs, prompt.slot_mask
    prompt_slots = slot_mask.shape[1]
    most_slots = prompt_slots + max_new
    if limit is not None:
        most_slots = min(most_slots, max(limit, prompt_slots))
    capacity = most_slots if static else min(most_slots, prompt_slots + GROWTH)
    dtype = vae.decoder_token_embeddings().weight.dtype
    steps = RowSteps(model, batch, capacity, dtype, device, static, draft_tokens)
    state = steps.backbone_prefill(inputs, slot_mask)  # (eager: prompts of any length; it allocates the slot cache)
    if static and compile_config is not None:
        compile_steps(steps, compile_config)

    # Per-row state. `sentence` holds the sentence being written (prefix first), for the encoder.
    rows_all = torch.arange(batch, device=device)
    prefix_len = in_prefix.sum(dim=1)
    sentence = torch.full((batch + 1, max_len), config.pad_token_id, dtype=torch.long, device=device)
    prefix_column = in_prefix.long().cumsum(dim=1) - 1
    sentence[rows_all[:, None].expand_as(in_prefix)[in_prefix], prefix_column[in_prefix]] = input_ids[in_prefix]
    sentence_len = torch.cat([prefix_len, prefix_len.new_zeros(1)])
    slot_column = slot_mask.new_full((batch,), prompt_slots - 1, dtype=torch.long)
    slot_count = slot_mask.sum(dim=1)  # real slots per row (backbone positions)
    written = torch.full((batch, max_new + 1), -1, dtype=torch.long, device=device)
    count = torch.zeros(batch, dtype=torch.long, device=device)
    sentences_written = torch.zeros(batch, dtype=torch.long, device=device)
    done = count >= max_new
    stopped = stop_decision(model.stop_head(state), do_sample, ~done & ~prompt.is_open & ~prompt.ends_turn & (count >= min_new))
    done |= stopped
    conditioning = vae.decoder.conditioning(state.to(dtype)).to(dtype)
    if draft_tokens:
        steps.start_drafts(rows_all, state)
        # Each row's drafted chunk: tokens (and, when sampling, the distributions they were drawn
        # from) for sentence indices drafted_from..drafted_to - 1 (kept on the host).
        chunk = torch.zeros(batch, steps.draft_chunk, dtype=torch.long, device=device)
        chunk_probs = (
            torch.zeros(batch, steps.draft_chunk, config.vocab_size, device=device) if do_sample else None
        )
        drafted_from = torch.zeros(batch, dtype=torch.long)
        drafted_to = torch.zeros(batch, dtype=torch.long)
    scores = logits_out = None
    if output_scores:
        scores = blank_token_scores(batch, max_new + 1, config.vocab_size, pad, device)
    if output_logits:
        logits_out = blank_token_scores(batch, max_new + 1, config.vocab_size, pad, device)

    # The first decoder step feeds [BOS, prefix..] (right-padded) at positions 0..
    first = torch.full((batch, 1 + int(prefix_len.max())), config.pad_token_id, dtype=torch.long, device=device)
    first[:, 0] = bos
    if first.shape[1] > 1:
        first[:, 1:] = sentence[:batch, : first.shape[1] - 1]
    steps.decoder_cache.reserve(steps.window + first.shape[1], steps.cache_limit)
    starts = torch.full_like(rows_all, bos)  # each row's first decoder input of its next sentence
    if steps.context_tokens:  # the first sentence's context: the prompt before its unfinished part
        ends = torch.full_like(rows_all, input_ids.shape[1])
        context = context_before(input_ids, mask & ~in_prefix, rows_all, ends, steps.context_tokens)
        first[:, 0] = starts[:] = steps.context_prefill(rows_all, context, conditioning)
    logits = steps.decoder_prefill(first, prefix_len + 1, conditioning)[:, None]
    drafts = draft_probs = None
    # Kept on the host (decided from what each step reports, no further synchronisation): where
    # each row's last decoder input went, and how many steps each row whose sentence ended has
    # waited for its backbone step (-1: not waiting).
    position = prefix_len.cpu()
    waited = torch.full((batch,), -1)
    waiting = torch.zeros_like(done)  # on the device: sentence ended, backbone step to come
    token = torch.zeros(batch, dtype=torch.long, device=device)  # each row's last token (fed next)
    passes = torch.zeros(batch, dtype=torch.long, device=device)
    min_ready = rows_per_backbone_step(batch)
    host_done = done.cpu()
    while not bool(host_done.all()):
        # One decoder pass: logits after the fed token and after each drafted one. A row takes the
        # token its logits choose at each column, as long as the drafted tokens before were chosen.
        live = ~done & ~waiting
        passes += live.long()
        wrote = torch.zeros_like(count)
        for j in range(logits.shape[1]):
            raw = logits[:, j]
            chosen = ban_empty_sentence(raw, sentence_len[:batch], eos)
            if processors is not None:
                chosen = processors(running_text(input_ids, written, count, pad), chosen)
            if drafts is not None and j < drafts.shape[1]:
                pick, accepted = verify_draft(chosen, drafts[:, j], draft_probs[:, j] if do_sample else None)
            else:
                pick, accepted = pick_next_token(chosen, do_sample), None
            token = torch.where(live, pick, token)
            is_eos = (pick == eos) & live
            writes = live & ~is_eos
            column = torch.where(writes, count, max_new)
            written.scatter_(1, column[:, None], torch.where(writes, pick, -1)[:, None])
            if scores is not None:
                scores[rows_all, column] = torch.where(writes[:, None], chosen, scores[rows_all, column])
            if logits_out is not None:
                logits_out[rows_all, column] = torch.where(writes[:, None], raw, logits_out[rows_all, column])
            if streamer is not None and bool(writes[0]):
                streamer.put(pick[:1].cpu())
            count += writes.long()
            wrote += writes.long()
            sentence_column = torch.where(writes, sentence_len[:batch], max_len - 1)
            sentence[torch.where(writes, rows_all, batch), sentence_column] = pick  # (others: the scratch row)
            sentence_len[:batch] += writes.long()
            finished = is_eos | (writes & ((sentence_len[:batch] >= max_len) | (count >= max_new)))
            halted = torch.zeros_like(finished)
            if stopping_criteria is not None and bool(writes.any()):
                halted = stopping_criteria(running_text(input_ids, written, count, pad), chosen) & writes
                finished |= halted
            # The rows whose sentence ended: count it, and end the text or feed the backbone. (An empty
            # sentence, which only a processor that forces the end-of-sentence token can make, ends the text.)
            empty = sentence_len[:batch] == 0
            sentences_written += (finished & ~empty).long()
            done |= halted | (finished & ((count >= max_new) | empty))
            if limit is not None:
                done |= finished & (slot_count + 1 >= limit)
            waiting |= finished & ~done
            if accepted is None:
                break
            live = live & accepted & ~finished
            if not bool(live.any()):
                break
        flags = torch.cat([waiting, done, wrote]).cpu()  # the pass's one synchronisation
        is_waiting, host_done, host_wrote = flags[:batch].bool(), flags[batch : 2 * batch].bool(), flags[2 * batch :]
        waited = torch.where(is_waiting, waited + 1, -1)
        ready = torch.nonzero(is_waiting).flatten()
        writing_left = bool((~is_waiting & ~host_done).any())
        if 0 < ready.numel() < min_ready and int(waited.max()) < MAX_WAIT and writing_left:
            ready = ready[:0]  # they wait for more rows to end their sentences
        restart = torch.zeros(batch, dtype=torch.bool)
        if ready.numel():
            b = ready.numel()
            rows = ready.to(device)
            lengths = sentence_len[rows]
            if static:
                size = _bucket(b, batch)
                rows = torch.cat([rows, rows.new_full((size - b,), batch)])
                sentence_width = _bucket(int(lengths.max()), max_len, smallest=8)
            else:
                sentence_width = int(lengths.max())
            ids = sentence[rows, :sentence_width]
            keep = torch.arange(sentence_width, device=device)[None, :] < sentence_len[rows][:, None]
            keep[:, 0] = True  # the scratch row's empty sentence: one padding token, no NaN
            vectors = steps.encode(ids, keep)
            row_index = rows.clamp(max=batch - 1)
            columns = torch.where(rows < batch, slot_column[row_index] + 1, 0)
            needed = int(columns.max()) + 1
            steps.slots.filled = max(steps.slots.filled, needed)
            if not static:
                steps.slots.reserve(needed, most_slots)
            slot_width = steps.slots.capacity if static else needed
            positions = torch.where(rows < batch, slot_count[row_index], 0)
            new_state = steps.backbone_step(rows, columns, positions, vectors.to(inputs.dtype), slot_width)[:b]
            rows = rows[:b]
            slot_column[rows] += 1
            slot_count[rows] += 1
            stop = stop_decision(model.stop_head(new_state), do_sample, ~done[rows] & (count[rows] >= min_new))
            stopped[rows] |= stop
            done[rows] |= stop
            conditioning.assign(rows, vae.decoder.conditioning(new_state.to(dtype)))
            if draft_tokens:
                steps.start_drafts(rows, new_state)
            sentence_len[rows] = 0
            waiting[rows] = False
            host_done = done.cpu()
            restart[ready] = ~host_done[ready]
            waited[ready] = -1
            if steps.context_tokens and bool(restart.any()):  # each new sentence reads the text before it
                rows = torch.nonzero(restart).flatten().to(device)
                text = torch.cat([input_ids, written.clamp(min=0)], dim=1)
                real = torch.cat([mask, written >= 0], dim=1)
                context = context_before(text, real, rows, torch.full_like(rows, text.shape[1]), steps.context_tokens)
                starts[rows] = steps.context_prefill(rows, context, conditioning.select(rows))
        # Rows that go on feed their last token after the tokens they wrote (a restarted row: BOS,
        # or its context's last token, at position 0; a waiting row and a finished one stay where they are).
        moved = (position + host_wrote).clamp(max=max_len)
        position = torch.where(restart, 0, torch.where(is_waiting | host_done, position, moved))
        if bool(host_done.all()):
            break
        at = position.to(device)
        feed = torch.where(restart.to(device), starts, token)[:, None]
        if draft_tokens:
            # Rows whose drafted chunk does not reach `draft_tokens` past their position draft a new one.
            redraft = torch.nonzero(~host_done & (restart | ((position + draft_tokens).clamp(max=steps.width) > drafted_to)))
            if redraft.numel():
                redraft = redraft.flatten()
                rows = redraft.to(device)
                chunk_logits = steps.draft_logits(rows, at[rows])
                if do_sample:
                    probs = chunk_logits.softmax(dim=-1)
                    chunk_probs[rows] = probs
                    chunk[rows] = torch.multinomial(probs.flatten(0, 1), 1).view(len(rows), -1)
                else:
                    chunk[rows] = chunk_logits.argmax(dim=-1)
                drafted_from[redraft] = position[redraft]
                drafted_to[redraft] = (position[redraft] + steps.draft_chunk).clamp(max=steps.width)
            index = ((position - drafted_from)[:, None] + torch.arange(draft_tokens)).clamp(0, steps.draft_chunk - 1)
            index = index.to(device)
            drafts = chunk.gather(1, index)
            draft_probs = chunk_probs[rows_all[:, None], index] if do_sample else None
            feed = torch.cat([feed, drafts], dim=1)
        steps.decoder_cache.reserve(steps.window + int(position.max()) + feed.shape[1], steps.cache_limit)
        logits = steps.decoder_step(feed, at, conditioning)
    width = int(count.max()) if batch else 0
    return DecodingResult(
        new_tokens=written[:, :width],
        cache=steps.slots,
        num_sentences=sentences_written,
        stopped=stopped,
        decoder_cache=steps.decoder_cache,
        scores=scores[:, :width] if scores is not None else None,
        logits=logits_out[:, :width] if logits_out is not None else None,
        decoder_passes=passes,
    )
