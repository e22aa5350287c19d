"""SentenceLM: a Sentence-level LLM. The layers of any decoder-only `transformers` model (the
backbone) run over sentence vectors made by a SentenceVAE, one step per sentence; a stop head
decides where the text ends and the Sentence Decoder writes each next sentence from the
backbone's state."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, Cache, DynamicCache, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .checkpointing import SafeCheckpointMixin
from .configuration_sentence_lm import NEXT_VECTOR_TEMPERATURE, SentenceLMConfig, backbone_ffn_dim, backbone_width
from .configuration_sentence_vae import SentenceVAEConfig
from .causal_scores import causal_scores
from .decoding import CONTINUE, STOP, context_before
from .generation_sentence_lm import SentenceGenerationMixin
from .modeling_sentence_vae import SentenceVAEModel
from .quantization import Int8WeightOnlyConfig  # noqa: F401  (registers the int8 quantizer, in checkpoints too)
from .pretrained_layers import COPIED_LAYERS, copy_token_model_layers, layer_settings
from .segmentation import PackedSentences, pack_sentences, sentence_tokens
from .validation import check_attention_mask, check_forward_extras, check_teacher_inputs, check_token_ids, logit_positions

logger = logging.get_logger(__name__)


@dataclass
class SentenceLMModelOutput(ModelOutput):
    """Output of [`SentenceLMModel.forward`].

    Attributes:
        last_hidden_state: ``(batch, slots, hidden)`` backbone states, left-padded: the last
            ``1 + num_sentences[b]`` slots of row ``b`` are its start state and its sentences.
            The state at a slot predicts the sentence in the next slot (or the end of text).
            Padding slots hold zeros.
        slot_mask: ``(batch, slots)`` which slots hold the start state or a sentence (``True``)
            and which are padding: the mask of ``last_hidden_state`` and ``hidden_states``.
        sentence_vectors: ``(num_sentences, hidden)`` encodings of the packed sentences.
        packed: the batch's sentences, packed (see [`PackedSentences`]).
        cache: the backbone's key/value cache over sentence slots, when ``use_cache``.
        hidden_states: the backbone's states after its embedding and each layer, each
            ``(batch, slots, hidden)``, when ``output_hidden_states``; padding slots (see
            ``slot_mask``) hold zeros.
        attentions: the backbone's attention maps over sentence slots, one per layer, when
            ``output_attentions``.
        turn_ends: ``(batch, seq_len)`` the EOS tokens that end a turn (see
            [`SentenceLMModel.sentence_tokens`]): each closes the sentence before it, whose slot's
            stop decision is "stop" (``packed.closed_by(turn_ends)`` says which sentences).
    """

    last_hidden_state: torch.Tensor | None = None
    slot_mask: torch.Tensor | None = None
    sentence_vectors: torch.Tensor | None = None
    packed: PackedSentences | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    turn_ends: torch.Tensor | None = None


@dataclass
class PromptSlots:
    """A batch of prompts as generation reads them (:meth:`SentenceLMModel.prompt_slots`).

    Attributes:
        inputs: ``(batch, slots, hidden)`` backbone inputs, left-padded: the start state, then
            the vectors of each prompt's closed sentences.
        slot_mask: ``(batch, slots)`` which of them are real.
        in_prefix: ``(batch, seq_len)`` the tokens of each prompt's unfinished last sentence (no
            sentence end yet), which the Sentence Decoder continues.
        ends_turn: ``(batch,)`` prompts (left-padded) whose last token ends a turn: the stop
            decision after their last sentence is made (the turn ended there), so generation
            writes the next sentence without asking the stop head first.
    """

    inputs: torch.Tensor
    slot_mask: torch.Tensor
    in_prefix: torch.Tensor
    ends_turn: torch.Tensor

    @property
    def is_open(self) -> torch.Tensor:
        """``(batch,)`` prompts whose last sentence is unfinished."""
        return self.in_prefix.any(dim=1)


@dataclass
class SentenceLMCausalLMOutput(ModelOutput):
    """Output of [`SentenceLMForCausalLM.forward`].

    Attributes:
        loss: the training loss, ``(sentence NLL + stop_loss_weight * stop NLL) / num_tokens``:
            the negative log-likelihood of every sentence's tokens and its end-of-sentence
            token given the previous sentences, plus the stop decisions, per original token.
            With ``stop_loss_weight=1`` (the default) ``exp(loss)`` is a per-token perplexity
            of the whole text, comparable with a token model's on the same tokens.
        logits: ``(batch, seq_len, vocab)`` token-aligned logits as a token model's: the logit
            at position ``t`` predicts token ``t + 1``. Inside a sentence it is the Sentence
            Decoder's step; at the last token of a sentence it is the decoder's first step for
            the next sentence. Cross-entropy over these logits (``lm_loss``) leaves out the
            end-of-sentence and stop decisions, so it is lower than ``loss``.
        lm_loss: shifted cross-entropy of ``logits`` against ``labels`` (when given).
        sentence_loss: mean NLL per sentence token, end-of-sentence tokens included.
        end_loss: mean NLL per end-of-sentence token (one per sentence).
        stop_loss: mean NLL per stop decision (one per sentence plus one at the end of text).
        next_vector_loss: with ``config.next_vector_weight > 0``, the auxiliary loss between the
            backbone's state before each sentence (what the Sentence Decoder reads) and that
            sentence's vector from the encoder (in ``loss`` with that weight): the mean squared
            error per dimension, or InfoNCE over the batch's sentences
            (``config.next_vector_objective``, see [`next_vector_loss_of`]).
        teacher_top_k_loss: with ``teacher_top_k``, the cross-entropy of the Sentence Decoder's
            next-token distribution at each sentence token against the teacher's top-k
            distribution before that token (renormalised over its k tokens), minus the teacher's
            entropy: a KL divergence on the teacher's k tokens, averaged over the sentence tokens
            that follow a token of the text ([`top_k_distillation_loss`]). Not part of ``loss``
            (see :mod:`sentence_lm.cached_distillation`).
        hidden_state_loss: with ``teacher_hidden_states``, how far the backbone's state after each
            sentence is from the token model's state at that sentence's last token (what it
            predicts the next token from): the squared error relative to the target's squared
            norm, averaged over sentences ([`hidden_state_loss_of`]). Not part of ``loss``: a
            trainer adds it with its weight
            (:class:`~sentence_lm.hidden_state_distillation.HiddenStateDistillationTrainer`).
        nll: ``(batch,)`` total NLL of each text (sentence tokens, end-of-sentence tokens, stop
            decisions), in nats.
        num_tokens: ``(batch,)`` original tokens of each text (the leading BOS, padding and the
            EOS tokens that end a turn excluded: those are the start state and stop decisions).
        hidden_states, attentions: the backbone's, over sentence slots (see
            [`SentenceLMModelOutput`]), when ``output_hidden_states`` / ``output_attentions``;
            padding slots of ``hidden_states`` hold zeros.
        slot_mask: ``(batch, slots)``, with ``hidden_states``: which sentence slots are real
            (the start state and each sentence) and which are padding.
        sentence_nll: ``(batch,)`` each text's summed NLL of its sentence tokens and
            end-of-sentence tokens (``sentence_loss`` is their total over ``num_tokens +
            num_sentences`` targets).
        end_nll: ``(batch,)`` each text's summed NLL of its end-of-sentence tokens (part of
            ``sentence_nll``; ``end_loss`` is their total over ``num_sentences``).
        stop_nll: ``(batch,)`` each text's summed NLL of its stop decisions (``num_sentences +
            1`` of them; ``stop_loss`` is their total over that count). ``nll`` is
            ``sentence_nll + stop_nll``.
        num_sentences: ``(batch,)`` sentences of each text.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    sentence_loss: torch.Tensor | None = None
    end_loss: torch.Tensor | None = None
    stop_loss: torch.Tensor | None = None
    next_vector_loss: torch.Tensor | None = None
    teacher_top_k_loss: torch.Tensor | None = None
    hidden_state_loss: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    slot_mask: torch.Tensor | None = None
    sentence_nll: torch.Tensor | None = None
    end_nll: torch.Tensor | None = None
    stop_nll: torch.Tensor | None = None
    num_sentences: torch.Tensor | None = None


@dataclass
class NLLTerms:
    """Every NLL term of a batch of texts, as `SentenceLMForCausalLM.forward` computes them.

    Attributes:
        packed: the texts' sentences.
        token_nll: ``(num_sentences, max_len + 1)`` float32, the Sentence Decoder's NLL at each
            teacher-forced step (each token, then the end of sentence; 0 past it).
        has_target: ``(num_sentences, max_len + 1)`` the steps that have a target.
        stop_nll: ``(batch, slots)`` float32, the stop head's NLL at each slot (0 at padding).
        slot_mask: ``(batch, slots)`` the real slots.
        step_log_probs: ``(targets, vocab)`` the decoder's log-probabilities at the steps with a
            target, in order, when kept for the causal scores; else ``None``.
    """

    packed: PackedSentences
    token_nll: torch.Tensor
    has_target: torch.Tensor
    stop_nll: torch.Tensor
    slot_mask: torch.Tensor
    step_log_probs: torch.Tensor | None = None

    @functools.cached_property
    def sentence_nll(self) -> torch.Tensor:
        """``(batch,)`` each text's summed decoder NLL (sentence tokens and their ends)."""
        return self.per_text(self.token_nll.sum(1))

    @property
    def step_index(self) -> torch.Tensor:
        """``(num_sentences, max_len + 1)`` the row of each step in ``step_log_probs``."""
        return self.has_target.long().flatten().cumsum(0).view(self.has_target.shape) - 1

    def per_text(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sentence ``values`` ``(num_sentences,)`` summed per text, ``(batch,)``."""
        batch = self.packed.num_sentences.shape[0]
        dtype = torch.float32 if values.is_floating_point() else values.dtype
        return torch.zeros(batch, dtype=dtype, device=values.device).index_add_(0, self.packed.batch_index, values)

    def summary(self) -> dict:
        """The output fields that describe whole texts: per-text sums and batch means."""
        packed = self.packed
        end_steps = self.token_nll[torch.arange(len(packed.lengths), device=packed.lengths.device), packed.lengths]
        stop_nll = self.stop_nll.sum(1)
        return dict(
            sentence_loss=self.sentence_nll.sum() / self.has_target.sum(),
            end_loss=end_steps.mean(),
            stop_loss=self.stop_nll.sum() / self.slot_mask.sum(),
            nll=self.sentence_nll + stop_nll,
            num_tokens=self.per_text(packed.lengths),
            sentence_nll=self.sentence_nll,
            end_nll=self.per_text(end_steps),
            stop_nll=stop_nll,
            num_sentences=packed.num_sentences,
        )

    def loss(
        self,
        target: torch.Tensor | None,
        turn_ends: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None,
        stop_loss_weight: float,
    ) -> torch.Tensor:
        """``(sentence NLL + stop_loss_weight * stop NLL) / items`` over the terms the labelled
        tokens ``target`` keep (all without labels; see :func:`_counted_terms`); ``items`` is the
        labelled tokens (a labelled turn end, ``turn_ends``, counts as one), or
        ``num_items_in_batch`` when given."""
        packed = self.packed
        if target is None:
            sentence_sum, stop_sum = self.sentence_nll.sum(), self.stop_nll.sum()
            items = packed.lengths.sum()
        else:
            end_labelled = packed.closed_by(target & turn_ends)
            step_counted, slot_counted = _counted_terms(target, packed, self.slot_mask.shape, end_labelled)
            sentence_sum = (self.token_nll * step_counted).sum()
            stop_sum = (self.stop_nll * slot_counted).sum()
            items = (target & ((packed.token_sentence >= 0) | turn_ends)).sum()
        if num_items_in_batch is not None:
            items = num_items_in_batch
        return (sentence_sum + stop_loss_weight * stop_sum) / items


class NoTokenEmbeddings(nn.Module):
    """Takes the place of the backbone's token-embedding table, which a SentenceLM never reads
    (the backbone's inputs are sentence vectors), so that it costs no memory."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "A SentenceLM's backbone has no token embeddings: it reads sentence vectors (`inputs_embeds`). "
            "Call the SentenceLM itself with input_ids."
        )


class SentenceLMPreTrainedModel(SafeCheckpointMixin, PreTrainedModel):
    """Weight initialisation and loading for SentenceLM models. The backbone's own
    initialisation applies to the backbone; `_no_split_modules`, gradient checkpointing and the
    attention implementation follow it."""

    config_class = SentenceLMConfig
    config: SentenceLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SentenceLMModel):
            std = getattr(self.config.backbone, "initializer_range", None) or getattr(
                self.config.backbone, "init_std", 0.02
            )
            nn.init.normal_(module.start_embedding, std=std)
        elif isinstance(module, SentenceVAEModel):
            module.boundary_table.zero_()

    def _resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """`resize_token_embeddings` resizes the nested SentenceVAE's vocabulary (token
        embeddings, ``lm_head``, the decoder's own embeddings when ``share_embeddings=False``,
        ``config.sentence_vae.vocab_size`` and the boundary table, whose new rows come from the
        tokenizer attached as ``model.tokenizer``, else 0 = not a boundary); see
        `SentenceVAEModel._resize_token_embeddings`. Gradient checkpointing covers the
        SentenceVAE's layers too (they are `GradientCheckpointingLayer`s)."""
        return self.sentence_vae._resize_token_embeddings(
            new_num_tokens, pad_to_multiple_of, mean_resizing, tokenizer=getattr(self, "tokenizer", None)
        )


class SentenceLMModel(SentenceLMPreTrainedModel):
    """Sentence Encoder + a decoder-only backbone over sentence vectors.

    Token ids are cut into sentences with the SentenceVAE's boundary table (a leading BOS, as
    most tokenizers add, is the start-of-text state rather than a sentence), the sentences are
    encoded to vectors, and the backbone (``AutoModel.from_config(config.backbone)``) runs once
    over ``[start, s_0, s_1, ...]`` per text, on ``inputs_embeds``, with position ids that count
    real sentence slots.
    """

    def __init__(self, config: SentenceLMConfig):
        config.check_consistency()  # the config may have been changed since it was built
        super().__init__(config)
        self.sentence_vae = SentenceVAEModel(config.sentence_vae)
        self.start_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.backbone = AutoModel.from_config(config.backbone)
        self.backbone.set_input_embeddings(NoTokenEmbeddings())
        arguments = inspect.signature(self.backbone.forward).parameters
        if not {"inputs_embeds", "position_ids", "attention_mask"} <= set(arguments):
            raise ValueError(
                f"{type(self.backbone).__name__}.forward takes no `inputs_embeds`, `position_ids` and `attention_mask`; "
                "a SentenceLM's backbone must read vectors instead of token ids. Pick another backbone family."
            )
        # transformers 5.24 renamed `past_key_values` to `cache`; earlier 5.x releases take the old name.
        self._cache_argument = "cache" if "cache" in arguments else "past_key_values"
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.sentence_vae.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.sentence_vae.set_input_embeddings(value)

    def sentence_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(content, turn_ends)``, both ``(batch, seq_len)`` bool: the tokens of sentences (all
        real tokens but a leading BOS, which the start state stands for, and the turn ends) and
        the EOS tokens that end a turn, each closing the sentence before it, which is read as
        that sentence's stop decision (see :func:`~sentence_lm.segmentation.sentence_tokens`)."""
        return sentence_tokens(input_ids, attention_mask, self.config.bos_token_id, self.config.eos_token_id)


    def slot_inputs(self, sentence_vectors: torch.Tensor, packed: PackedSentences) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded backbone inputs ``(batch, 1 + max_sentences, hidden)``: the start state
        then each text's sentence vectors, and the matching slot mask."""
        batch = packed.num_sentences.shape[0]
        slots = 1 + int(packed.num_sentences.max()) if batch else 1
        limit = self.config.max_position_embeddings
        if limit is not None and slots > limit:
            raise ValueError(
                f"A text has {slots - 1} sentences but the backbone holds at most {limit - 1} "
                "(max_position_embeddings - 1 for the start state); shorten the text or split it into several."
            )
        inputs = self.start_embedding.expand(batch, slots, -1).clone()
        inputs[packed.batch_index, packed.sentence_slots(slots)] = sentence_vectors.to(self.start_embedding.dtype)
        slot_mask = torch.arange(slots, device=inputs.device) >= packed.first_slots(slots)[:, None]
        return inputs, slot_mask

    def prompt_slots(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> "PromptSlots":
        """How generation reads a batch of (left-padded) prompts: their closed sentences, encoded, as
        backbone inputs after the start state, and an unfinished last sentence (no sentence end
        yet) as the Sentence Decoder's prefix, which generation continues. A prompt that ends with
        a turn end has its last stop decision made (the turn ended; the text goes on)."""
        vae = self.sentence_vae
        content, turn_ends = self.sentence_tokens(input_ids, attention_mask)
        sentence_ids, closed = vae.segment(input_ids, content, return_closed=True, breaks=turn_ends)
        if sentence_ids.shape[1]:
            num_sentences = sentence_ids.amax(dim=1) + 1
        else:
            num_sentences = torch.zeros_like(closed, dtype=torch.long)
        is_open = ~closed & (num_sentences > 0)
        in_prefix = is_open[:, None] & (sentence_ids == (num_sentences - 1)[:, None])
        packed = pack_sentences(input_ids, torch.where(in_prefix, -1, sentence_ids), self.config.pad_token_id)
        if packed.input_ids.shape[0]:
            vectors = vae.encode(packed.input_ids, packed.attention_mask)
        else:
            vectors = torch.empty(0, self.config.hidden_size, device=input_ids.device)
        inputs, slot_mask = self.slot_inputs(vectors, packed)
        ends_turn = turn_ends[:, -1] if turn_ends.shape[1] else closed & False
        return PromptSlots(inputs, slot_mask, in_prefix, ends_turn)

    @property
    def attention_implementation(self) -> str:
        """The backbone's attention implementation (``"eager"``, ``"sdpa"``, ...)."""
        return self.backbone.config._attn_implementation

    def new_cache(self) -> Cache:
        """An empty key/value cache for the backbone (over sentence slots)."""
        return DynamicCache(config=self.config.backbone)

    def run_backbone(
        self, inputs_embeds: torch.Tensor, slot_mask: torch.Tensor, cache: Cache | None = None, **outputs
    ) -> ModelOutput:
        """Run the backbone over slot inputs ``(batch, new_slots, hidden)``; returns its output
        (``last_hidden_state``, and ``hidden_states`` / ``attentions`` when asked for with
        ``output_hidden_states=True`` / ``output_attentions=True``).

        ``slot_mask`` covers the cached slots and the new ones; positions count real slots only,
        so left padding shifts nothing. ``cache`` (from :meth:`new_cache`) is updated in place.
        """
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (slot_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]
        return self.backbone_forward(inputs_embeds, slot_mask.long(), position_ids, cache, **outputs)

    def backbone_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        **outputs,
    ) -> ModelOutput:
        """The backbone itself on slot inputs ``(batch, q, hidden)``, with an attention mask and
        position ids as the caller prepared them (a 2-D slot mask, or a 4-D mask the backbone's
        attention takes as it is) and ``cache`` updated in place."""
        return self.backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            return_dict=True,
            **{self._cache_argument: cache},
            **outputs,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        position_ids: torch.Tensor | None = None,
        sentence_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> SentenceLMModelOutput | tuple:
        """Segment, encode and run the backbone over a batch of texts.

        Args:
            input_ids: ``(batch, seq_len)`` token ids, padded on either side.
            attention_mask: ``(batch, seq_len)``, 1 on real tokens.
            use_cache: also return the backbone's key/value cache.
            output_hidden_states: also return the backbone's states after its embedding and
                each layer, over sentence slots (as `last_hidden_state`).
            output_attentions: also return the backbone's attention maps over sentence slots
                (the backbone must run with ``attn_implementation="eager"``, as in `transformers`).
            position_ids: accepted and ignored (sentence positions are the model's own), unless
                they restart at 0 inside a row, marking several packed texts: those are refused
                here (one text per row; `SentenceLMForCausalLM` scores packed texts).
            sentence_ids: accepted so that ``model(**tokenizer(...))`` works, and ignored (the
                model segments ``input_ids`` itself with the same rule).
        """
        check_forward_extras(kwargs, type(self).__name__)
        check_token_ids(input_ids, self.config.vocab_size)
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no text (batch size 0); pass at least one row.")
        input_ids = input_ids.long()
        mask = check_attention_mask(attention_mask, input_ids)
        if position_ids is not None and _packed_texts(position_ids, mask) is not None:
            raise ValueError(
                "position_ids restart at 0 inside a row: the row packs several texts, which SentenceLMModel does not "
                "split (its states are over one text's sentence slots). Pass one text per row, or use "
                "SentenceLMForCausalLM, which scores packed texts each on its own."
            )
        content, turn_ends = self.sentence_tokens(input_ids, mask)
        empty = ~content.any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"Row(s) {torch.nonzero(empty).flatten().tolist()} of input_ids hold no text token (only "
                "padding or BOS); every text needs at least one token: drop such rows (use `generate()` to "
                "start from nothing)."
            )
        sentence_ids = self.sentence_vae.segment(input_ids, content, breaks=turn_ends)
        packed = pack_sentences(input_ids, sentence_ids, self.config.pad_token_id)
        vectors = self.sentence_vae.encode(packed.input_ids, packed.attention_mask)
        inputs, slot_mask = self.slot_inputs(vectors, packed)
        cache = self.new_cache() if use_cache else None
        backbone = self.run_backbone(
            inputs,
            slot_mask,
            cache,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
        )
        padding = ~slot_mask[..., None]
        output = SentenceLMModelOutput(
            last_hidden_state=backbone.last_hidden_state.masked_fill(padding, 0.0),
            slot_mask=slot_mask,
            sentence_vectors=vectors,
            packed=packed,
            turn_ends=turn_ends,
            cache=cache,
            hidden_states=tuple(h.masked_fill(padding, 0.0) for h in backbone.hidden_states)
            if output_hidden_states
            else None,
            attentions=backbone.attentions if output_attentions else None,
        )
        return output if return_dict is not False else output.to_tuple()


class SentenceLMForCausalLM(SentenceLMPreTrainedModel, SentenceGenerationMixin):
    """SentenceLM with a stop head and the Sentence Decoder: a causal LM that predicts the next
    *sentence*. See [`SentenceLMCausalLMOutput`] for what `forward` computes,
    [`SentenceGenerationMixin.generate`] for next-sentence generation and
    :meth:`from_pretrained_backbone` to start from a pretrained token model."""

    base_model_class = SentenceLMModel
    """The class of ``self.model`` (a subclass's own base model, e.g. `SentenceOPTModel`)."""

    def __init__(self, config: SentenceLMConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.stop_head = nn.Linear(config.hidden_size, 2)
        self.post_init()
        self.generation_config.update(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        self.tokenizer = None
        self.model_card_kwargs: dict = {}

    def _save_extras(self, save_directory: str) -> None:
        """Save what belongs beside the weights: the tokenizer attached as ``model.tokenizer``
        (by `from_pretrained_backbone`, the training script or the user) and the model card
        ``README.md``, rendered from MODEL_CARD.md with ``model.model_card_kwargs``
        (``results``, ``datasets``, ``repo_id``, ``license``; see `render_model_card`)."""
        from .model_card import save_model_card

        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        save_model_card(self, save_directory, **self.model_card_kwargs)
        if self._auto_class is not None:
            # `transformers` maps only the saved class; the base model loads with AutoModel too.
            path = os.path.join(save_directory, "config.json")
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            module = type(self).__module__.rsplit(".", 1)[-1]
            saved.setdefault("auto_map", {})["AutoModel"] = f"{module}.{self.base_model_class.__name__}"
            with open(path, "w", encoding="utf-8") as f:
                json.dump(saved, f, indent=2, sort_keys=True)
                f.write("\n")

    def __setattr__(self, name, value):
        # TRL's SFTTrainer swaps `forward` for a fused LM head over one backbone state per token,
        # which a SentenceLM does not have (one per sentence): refuse it when the trainer is built.
        code = getattr(getattr(value, "__func__", value), "__code__", None) if name == "forward" else None
        # functools.wraps renames the function, not its code: the code keeps TRL's names.
        if code is not None and "fused" in code.co_name and f"{os.sep}trl{os.sep}" in code.co_filename:
            raise TypeError(
                "TRL's SFTTrainer replaces the model's forward with a fused LM head that reads one backbone state "
                "per token; a SentenceLM's backbone has one state per sentence (its tokens come from the Sentence "
                "Decoder). Use sentence_lm.trl_sft.SentenceLMSFTTrainer instead: the same arguments, trained on "
                "the model's own loss."
            )
        super().__setattr__(name, value)

    @property
    def sentence_vae(self) -> SentenceVAEModel:
        return self.model.sentence_vae

    def get_input_embeddings(self) -> nn.Embedding:
        return self.sentence_vae.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.sentence_vae.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.sentence_vae.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.sentence_vae.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        sentence_ids: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        teacher_hidden_states: torch.Tensor | None = None,
        condition_on_teacher: bool = False,
        teacher_top_k: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> SentenceLMCausalLMOutput | tuple:
        """Score texts: the training loss (NLL per labelled token), each text's NLL and, in
        evaluation mode, token-aligned causal scores (see [`SentenceLMCausalLMOutput`]).

        Args:
            input_ids: ``(batch, seq_len)`` token ids, padded on either side; every text is
                taken as complete (its end is a stop decision). Special tokens are tokens of the
                text, as a chat template writes them, except a leading BOS (the start state) and
                the EOS after text (a turn's end, or the text's as TRL's ``SFTTrainer`` and some
                tokenizers append it), which closes the sentence before it and is read as that
                sentence's stop decision: "stop" (see [`SentenceLMModel.sentence_tokens`]). Such an
                EOS is in no sentence and not in ``num_tokens``; when labelled, it keeps the end
                of the sentence it closes and that stop decision in ``loss`` and counts as one
                labelled item, as the Trainer counts it in ``num_items_in_batch``.
            attention_mask: ``(batch, seq_len)``, 1 on real tokens.
            labels: optional ``input_ids`` with ``-100`` where no loss is wanted (a prompt,
                padding), shifted inside as by every `transformers` causal LM: only the
                labelled tokens' terms count in ``loss`` (:func:`_counted_terms` says which), and
                ``lm_loss`` is the cross-entropy of the aligned ``logits`` against them.
            shift_labels: the same, already shifted; give ``labels`` or ``shift_labels``, not both.
            num_items_in_batch: the labelled tokens of the whole batch when the Trainer
                accumulates gradients: ``loss`` is divided by it instead of this batch's count.
            sentence_ids: accepted so that ``model(**tokenizer(...))`` works, and ignored (the
                model segments ``input_ids`` itself with the same rule).
            position_ids: as padding-free packing collators give them (TRL's ``packing=True``,
                `DataCollatorWithFlattening`): where they restart at 0 inside a row, a new text
                begins, and each text is scored as a row of its own (:meth:`_forward_packed`).
                Otherwise ignored: sentence positions are the model's own.
            output_hidden_states, output_attentions: also return the backbone's (see
                [`SentenceLMModel.forward`]).
            teacher_hidden_states: ``(batch, seq_len, hidden_size)`` a token model's final hidden
                states on the same ids (the input of its output layer; the backbone's width): the
                output's ``hidden_state_loss`` compares the backbone's state after each sentence
                with the teacher's at that sentence's last token. A conversion lever, see
                :mod:`sentence_lm.hidden_state_distillation`; not with packed rows.
            condition_on_teacher: with ``teacher_hidden_states``, the Sentence Decoder writes each
                sentence from the teacher's state at the previous sentence's last token (the first
                sentence: at the leading BOS, or the start state when there is none) instead of
                the backbone's, so that it learns to write from rich states before the backbone
                can produce them.
            teacher_top_k: ``(ids, log_probs)``, both ``(batch, seq_len, k)``: a token model's k
                most likely next tokens after each token of the same ids and their
                log-probabilities (:func:`~sentence_lm.cached_distillation.cache_teacher_top_k`):
                the output's ``teacher_top_k_loss`` distils them into the Sentence Decoder's steps
                (no causal scores needed). Not with packed rows.
            logits_to_keep: which positions of the causal scores ``logits`` to compute: by
                default (``None``) all in evaluation mode and none in training mode (a training
                step computes the loss terms straight from the Sentence Decoder's states, no
                logits kept); ``0``: all; an int ``n > 0``: the last ``n``; a 1-D tensor: those
                positions. **Their cost**: a ``(batch, seq_len, vocab)`` float32 tensor, the
                decoder's first step after every sentence end, and one more backbone pass per
                position where a sentence has ended but tokens that trail it (closing quotes,
                brackets) follow (:func:`~sentence_lm.causal_scores.causal_scores`). For ``loss``
                and ``nll`` only, in evaluation mode, pass an empty tensor
                (``logits_to_keep=torch.empty(0, dtype=torch.long)``). ``lm_loss`` needs all
                positions.
            kwargs: what tools pass every causal LM (``use_cache``, ``cache_position``, the
                flash-attention offsets of packing collators: see
                :data:`~sentence_lm.validation.FORWARD_IGNORED`) is ignored; ``inputs_embeds``, a
                cache with content and any other keyword are refused.
        """
        check_forward_extras(kwargs, type(self).__name__)
        check_token_ids(input_ids, self.config.vocab_size)
        input_ids = input_ids.long()  # int32 (or other integer) ids work like int64 ones
        mask = check_attention_mask(attention_mask, input_ids)
        texts = _packed_texts(position_ids, mask) if position_ids is not None else None
        check_teacher_inputs(
            teacher_hidden_states, condition_on_teacher, teacher_top_k, texts is not None, input_ids, self.config
        )
        if texts is not None:
            return self._forward_packed(
                texts, input_ids, labels, shift_labels, num_items_in_batch, logits_to_keep, return_dict,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            )  # fmt: skip
        target = _labelled_tokens(input_ids, labels, shift_labels)
        keep = logit_positions(logits_to_keep, self.training, input_ids.shape[1])

        # The method: sentences -> vectors -> backbone; each sentence is written from the state
        # before it, and the stop head decides at every state whether the text (or turn) ends.
        out = self.model(input_ids, mask, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        memory = states_before_sentences(out.last_hidden_state, out.packed)
        hidden_state_loss = None
        if teacher_hidden_states is not None:
            targets, before = teacher_sentence_states(
                teacher_hidden_states, input_ids, mask, out.packed, self.config.bos_token_id
            )
            after = out.last_hidden_state[out.packed.batch_index, out.packed.sentence_slots(out.slot_mask.shape[1])]
            hidden_state_loss = hidden_state_loss_of(after, targets)
            if condition_on_teacher:
                memory = torch.where(torch.isnan(before[:, :1]), memory, before.to(memory.dtype))
        context = self.sentence_context(input_ids, mask, out.packed)
        terms = self._nll_terms(out, memory, keep_log_probs=keep is not None or teacher_top_k is not None, context=context)
        teacher_top_k_loss = None
        if teacher_top_k is not None:
            teacher_top_k_loss = top_k_distillation_loss(terms, teacher_top_k, mask)
        loss = terms.loss(target, out.turn_ends, num_items_in_batch, self.config.stop_loss_weight)
        next_vector_loss = None
        if self.config.next_vector_weight > 0:
            vectors = out.sentence_vectors.detach().float()
            next_vector_loss = next_vector_loss_of(memory.float(), vectors, self.config.next_vector_objective)
            loss = loss + self.config.next_vector_weight * next_vector_loss

        logits = lm_loss = None
        if keep is not None:
            logits = causal_scores(self, input_ids, mask, out, terms.step_log_probs, terms.step_index, keep)
            if isinstance(keep, slice) and (labels is not None or shift_labels is not None):
                lm_loss = _shifted_cross_entropy(logits, labels, shift_labels)
        output = SentenceLMCausalLMOutput(
            loss=loss,
            logits=logits,
            lm_loss=lm_loss,
            next_vector_loss=next_vector_loss,
            teacher_top_k_loss=teacher_top_k_loss,
            hidden_state_loss=hidden_state_loss,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            slot_mask=out.slot_mask if output_hidden_states else None,
            **terms.summary(),
        )
        return output if return_dict is not False else output.to_tuple()

    def sentence_context(
        self, input_ids: torch.Tensor, mask: torch.Tensor, packed: PackedSentences
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The Sentence Decoder's context of each packed sentence (``SentenceVAEConfig.context_window``
        real tokens of its text before its first token, see :func:`~sentence_lm.decoding.context_before`),
        or ``None`` without a context window."""
        window = self.config.sentence_vae.context_window
        if not window:
            return None
        rows, columns = torch.nonzero((packed.token_sentence >= 0) & (packed.token_position == 0), as_tuple=True)
        order = packed.token_sentence[rows, columns].argsort()
        return context_before(input_ids, mask, rows[order], columns[order], window)

    def _nll_terms(
        self,
        out: SentenceLMModelOutput,
        memory: torch.Tensor,
        keep_log_probs: bool,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "NLLTerms":
        """Every NLL term of the texts of ``out``: the Sentence Decoder's at each teacher-forced
        step of each sentence, written from ``memory`` (the states before the sentences), and the
        stop head's at every slot (stop at the last slot and after each sentence a turn end
        closes, go on at every other). With
        ``keep_log_probs`` the decoder's log-probabilities are kept for the causal scores; else the
        output layer runs on the steps that have a target only, keeping no logits."""
        vae, packed, hidden, slot_mask = self.sentence_vae, out.packed, out.last_hidden_state, out.slot_mask
        states = vae.teacher_forced_states(packed.input_ids, packed.attention_mask, memory, context=context)
        targets = vae.reconstruction_targets(packed.input_ids, packed.attention_mask)
        has_target = targets != -100
        token_nll = torch.zeros(targets.shape, dtype=torch.float32, device=states.device)
        step_log_probs = None
        if keep_log_probs:
            step_log_probs = F.log_softmax(vae.lm_head(states[has_target]).float(), dim=-1)
            token_nll[has_target] = -step_log_probs.gather(1, targets[has_target][:, None]).squeeze(1)
        else:
            token_nll[has_target] = vae.output_nll(states[has_target], targets[has_target])
        stop_targets = torch.full(slot_mask.shape, CONTINUE, dtype=torch.long, device=hidden.device)
        stop_targets[:, -1] = STOP
        turn_ended = packed.closed_by(out.turn_ends)
        stop_targets[packed.batch_index[turn_ended], packed.sentence_slots(slot_mask.shape[1])[turn_ended]] = STOP
        stop_logits = self.stop_head(hidden).float()
        stop_nll = F.cross_entropy(stop_logits.flatten(0, 1), stop_targets.flatten(), reduction="none")
        stop_nll = stop_nll.view(slot_mask.shape) * slot_mask
        return NLLTerms(packed, token_nll, has_target, stop_nll, slot_mask, step_log_probs)

    def _forward_packed(
        self, texts, input_ids, labels, shift_labels, num_items_in_batch, logits_to_keep, return_dict, **outputs
    ):
        """`forward` on rows that hold several texts (``texts``, from :func:`_packed_texts`): each
        text becomes a row of its own, scored from the start state (its trailing EOS is its end),
        and what is per position or per row is put back: ``logits`` keep the row's layout (no
        score at a text's last token for the next text's first: that belongs to no text); the
        per-text sums (``nll``, ``num_tokens``, ``sentence_nll``, ...) add up each row's texts;
        ``hidden_states``, ``attentions`` and ``slot_mask`` have one row per text, in order."""
        rows, starts, lengths = texts
        batch, seq_len = input_ids.shape
        width = int(lengths.max())
        columns = starts[:, None] + torch.arange(width, device=input_ids.device)
        inside = torch.arange(width, device=input_ids.device) < lengths[:, None]
        columns = torch.where(inside, columns, 0)

        def unpack(values: torch.Tensor | None, fill: int) -> torch.Tensor | None:
            if values is None:
                return None
            taken = values.to(input_ids.device)[rows[:, None], columns]
            return torch.where(inside, taken, fill)

        text_labels = unpack(labels, -100)
        text_shift_labels = unpack(shift_labels, -100)
        if text_shift_labels is not None:  # a text's last token predicts nothing of the next text
            text_shift_labels[torch.arange(len(rows)), lengths - 1] = -100
        keep = logit_positions(logits_to_keep, self.training, seq_len)
        out = self(
            unpack(input_ids, self.config.pad_token_id),
            attention_mask=inside.long(),
            labels=text_labels,
            shift_labels=text_shift_labels,
            num_items_in_batch=num_items_in_batch,
            logits_to_keep=None if keep is None else 0,
            **outputs,
        )
        logits = None
        if out.logits is not None:
            logits = out.logits.new_zeros(batch, seq_len, out.logits.shape[-1])
            logits[rows[:, None].expand_as(columns)[inside], columns[inside]] = out.logits[inside]
            logits = logits[:, keep]
        out.logits = logits
        for name in ("nll", "num_tokens", "sentence_nll", "end_nll", "stop_nll", "num_sentences"):
            per_text = getattr(out, name)
            setattr(out, name, per_text.new_zeros(batch).index_add_(0, rows, per_text))
        return out if return_dict is not False else out.to_tuple()

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained_backbone(
        cls,
        model_or_path,
        sentence_vae: SentenceVAEModel | str | os.PathLike | None = None,
        tokenizer=None,
        sentence_vae_config: SentenceVAEConfig | dict | None = None,
        gguf_file: str | None = None,
        copy_layers: bool | str | Sequence[int] = False,
        **config_overrides,
    ) -> "SentenceLMForCausalLM":
        """Build a SentenceLM whose backbone (layers, norms, positions) comes from a pretrained
        decoder-only token model.

        Args:
            model_or_path: a token model (e.g. `LlamaForCausalLM`, `GPT2LMHeadModel`,
                `OPTForCausalLM`, or its base model), or a path or Hub id of one
                (e.g. ``"HuggingFaceTB/SmolLM2-135M"``).
            sentence_vae: a trained `SentenceVAEModel` (or its path) of the backbone's width;
                when ``None`` a new one is made from ``sentence_vae_config`` (defaults: one
                encoder and one decoder layer of the backbone's width, heads and feed-forward
                size, the token model's vocabulary and special tokens) and the token model's
                embeddings are copied into it (and into its output layer when that is not tied).
            tokenizer: the tokenizer whose sentence-boundary table the model uses (wrapped in a
                `SentenceTokenizer` when it is not one); when ``None`` and ``model_or_path`` is a
                path, the tokenizer saved there is used. It is attached as ``model.tokenizer`` and
                saved with the model.
            sentence_vae_config: fields of the new SentenceVAE (see above).
            gguf_file: the name of a GGUF file in ``model_or_path`` to load the token model (and
                its tokenizer) from, as `from_pretrained(..., gguf_file=...)` does.
            copy_layers: start the new SentenceVAE's encoder and decoder layers from the token
                model's (attention, norms' scales, feed-forward; Llama-, OPT- and GPT-2-style layers;
                see :mod:`sentence_lm.pretrained_layers`), with the token model's activation and,
                for gated feed-forward blocks, ``gated_ffn=True``: ``True`` or ``"first"``, encoder
                and decoder layer ``i`` from token layer ``i``; ``"last"``, the decoder's ``k``
                layers and its final norm from the token model's last ``k`` and final norm (the
                encoder's layers still from its first); a list of token layer indices, one per
                decoder layer, like ``"last"`` but from those layers (e.g. ``[0, 1, 26, 27, 28, 29]``).
                Only with a new SentenceVAE.
            config_overrides: `SentenceLMConfig` fields (e.g. ``stop_loss_weight=0.5``) and
                backbone config fields (e.g. ``max_position_embeddings=256`` sentence slots,
                ``dropout=0.0``).

        Returns the model in evaluation mode, as ``from_pretrained`` does (call ``.train()`` to
        train it yourself; the Trainer does).
        """
        token_model, tokenizer = _load_token_model(model_or_path, tokenizer, gguf_file)
        token_config = token_model.config
        backbone_config = _backbone_config_of(token_config)
        lm_fields = {}
        for key, value in config_overrides.items():
            if key in SentenceLMConfig.__annotations__:
                lm_fields[key] = value
            elif hasattr(backbone_config, key):
                setattr(backbone_config, key, value)
            else:
                raise ValueError(
                    f"Unknown argument {key!r}: it is neither a SentenceLMConfig field ("
                    f"{', '.join(k for k in SentenceLMConfig.__annotations__ if not k.startswith('_'))}) nor a "
                    f"field of the backbone's {type(backbone_config).__name__}. Check the spelling."
                )
        if isinstance(sentence_vae, (str, os.PathLike)):
            sentence_vae = SentenceVAEModel.from_pretrained(sentence_vae)
        new_vae = sentence_vae is None
        if not isinstance(copy_layers, (list, tuple)) and copy_layers not in (False, True, *COPIED_LAYERS):
            raise ValueError(
                f"copy_layers must be True, False, 'first', 'last' or a list of token layer indices, got {copy_layers!r}."
            )
        if copy_layers and not new_vae:
            raise ValueError(
                "copy_layers=True starts a new SentenceVAE's layers from the token model's, but a SentenceVAE was "
                "given; pass sentence_vae=None (and its settings as sentence_vae_config) or drop copy_layers."
            )
        if new_vae:
            if copy_layers:
                if isinstance(sentence_vae_config, SentenceVAEConfig):
                    sentence_vae_config = sentence_vae_config.to_dict()
                sentence_vae_config = {**layer_settings(token_model), **(sentence_vae_config or {})}
            sentence_vae = SentenceVAEModel(_sentence_vae_config_for(token_config, tokenizer, sentence_vae_config))
        lm_fields.setdefault("base_model", token_model.name_or_path or None)
        config = cls.config_class(sentence_vae=sentence_vae.config, backbone=backbone_config, **lm_fields)
        model = cls(config)
        model.model.sentence_vae = sentence_vae
        base = token_model.base_model
        source_embeddings = base.get_input_embeddings()
        embedding_keys = {f"{name}.weight" for name, module in base.named_modules() if module is source_embeddings}
        source = {k: v for k, v in base.state_dict().items() if k not in embedding_keys}
        missing, unexpected = model.model.backbone.load_state_dict(source, strict=False)
        if unexpected or missing:
            raise ValueError(
                f"The token model's weights do not fit a {type(model.model.backbone).__name__} built from its config "
                f"(unexpected: {unexpected[:5]}, missing: {missing[:5]}); pass a standard decoder-only checkpoint."
            )
        if new_vae:
            _copy_token_embeddings(token_model, sentence_vae)
        if copy_layers:
            copy_token_model_layers(token_model, sentence_vae, "first" if copy_layers is True else copy_layers)
        if tokenizer is not None:
            model.attach_tokenizer(tokenizer)
        else:
            logger.warning(
                "No tokenizer given: the model has no sentence-boundary table yet and cuts text only at "
                "max_sentence_len. Call model.attach_tokenizer(tokenizer) before training or generating."
            )
        return model.eval()

    def attach_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer``'s sentence boundaries and save it with the model (``model.tokenizer``).
        A tokenizer that is not a `SentenceTokenizer` is wrapped in one."""
        from .tokenization_sentence_lm import SentenceTokenizer

        if not isinstance(tokenizer, SentenceTokenizer):
            tokenizer = SentenceTokenizer.from_tokenizer(
                tokenizer, max_sentence_len=self.config.sentence_vae.max_sentence_len
            )
        if len(tokenizer) > self.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {self.config.vocab_size}; "
                "use the tokenizer the model (or its token model) was built with."
            )
        self.sentence_vae.set_boundary_table(tokenizer)
        self.tokenizer = tokenizer


def next_vector_loss_of(states: torch.Tensor, vectors: torch.Tensor, objective: str) -> torch.Tensor:
    """The auxiliary next-vector loss of ``states`` ``(n, hidden)`` (the backbone's state
    before each sentence) against ``vectors`` ``(n, hidden)`` (those sentences' encoder
    vectors): ``"mse"``, the mean squared error per dimension; ``"contrastive"``, the mean
    cross-entropy of ``cos(states[i], vectors[j]) / NEXT_VECTOR_TEMPERATURE`` over ``j`` with
    target ``i`` (every other sentence of the batch is a negative)."""
    if objective == "mse":
        return F.mse_loss(states, vectors)
    similarity = F.normalize(states, dim=-1) @ F.normalize(vectors, dim=-1).T
    targets = torch.arange(len(states), device=states.device)
    return F.cross_entropy(similarity / NEXT_VECTOR_TEMPERATURE, targets)


def top_k_distillation_loss(terms: "NLLTerms", teacher_top_k: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``sum_i p_i (log p_i - log q(i))`` averaged over the sentence tokens whose previous column is
    a real token: ``p`` the teacher's top-k distribution at that column (renormalised over its
    ``k`` ids), ``q`` the Sentence Decoder's distribution at the step that writes the token (kept
    in ``terms.step_log_probs``)."""
    packed = terms.packed
    sentence, position = packed.token_sentence, packed.token_position
    follows = torch.zeros_like(mask)
    follows[:, 1:] = mask[:, :-1]
    rows, cols = torch.nonzero((sentence >= 0) & follows, as_tuple=True)
    if len(rows) == 0:
        return terms.step_log_probs.sum() * 0.0
    student = terms.step_log_probs[terms.step_index[sentence[rows, cols], position[rows, cols]]]
    ids, log_probs = (t[rows, cols - 1] for t in teacher_top_k)
    teacher = F.log_softmax(log_probs.float(), dim=-1)
    return (teacher.exp() * (teacher - student.gather(1, ids.long()))).sum(-1).mean()


def teacher_sentence_states(
    states: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, packed: PackedSentences, bos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's states for ``packed``'s sentences: ``(after, before)``, both ``(num_sentences,
    hidden)`` float32: at each sentence's last token, and at the last token before the sentence
    (the previous sentence's last, or a leading BOS; ``nan`` where there is none: a text's first
    sentence without a BOS)."""
    sentence, position = packed.token_sentence, packed.token_position
    is_last = (sentence >= 0) & (position == packed.lengths[sentence.clamp(min=0)] - 1)
    rows, cols = torch.nonzero(is_last, as_tuple=True)
    after = states.new_zeros(len(packed.lengths), states.shape[-1], dtype=torch.float32)
    after[sentence[rows, cols]] = states[rows, cols].float()
    before = torch.full_like(after, float("nan"))
    later = packed.sentence_index > 0
    before[later] = after[torch.nonzero(later).squeeze(1) - 1]
    first = torch.argmax(mask.long(), dim=1)
    text_rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    has_bos = mask[text_rows, first] & (input_ids[text_rows, first] == bos_token_id)
    opening = ~later & has_bos[packed.batch_index]
    text = packed.batch_index[opening]
    before[opening] = states[text, first[text]].float()
    return after, before


def hidden_state_loss_of(states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over rows of ``||states - targets||^2 / ||targets||^2`` (``(n, hidden)`` each): the
    squared error relative to the target's size, so that its scale does not depend on the token
    model's (its final states are large where its output layer reads them)."""
    error = (states.float() - targets.float()).pow(2).sum(-1)
    return (error / targets.float().pow(2).sum(-1).clamp(min=1e-6)).mean()


def states_before_sentences(hidden: torch.Tensor, packed) -> torch.Tensor:
    """The backbone state each packed sentence is written from, ``(num_sentences, hidden)``: the
    state of the slot before it, from left-padded slot states ``hidden`` ``(batch, slots, hidden)``
    (:meth:`SentenceLMModel.slot_inputs`' layout)."""
    return hidden[packed.batch_index, packed.sentence_slots(hidden.shape[1]) - 1]


def _packed_texts(position_ids: torch.Tensor, mask: torch.Tensor):
    """The texts of rows that pack several, from ``position_ids`` that restart at 0 after a row's
    first real token: ``(row, start column, length)`` tensors of every text of the batch (one text
    per row that packs none), or ``None`` when no row packs several texts."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape != mask.shape:
        raise ValueError(
            f"position_ids has shape {tuple(getattr(position_ids, 'shape', ()))} but input_ids has "
            f"{tuple(mask.shape)}; pass one position per token (or none)."
        )
    position_ids = position_ids.to(mask.device)
    first = mask & (mask.long().cumsum(dim=1) == 1)
    starts = first | (mask & (position_ids == 0))
    if bool((starts.sum(dim=1) <= 1).all()):
        return None
    row_end = mask.shape[1] - torch.argmax(mask.flip(1).long(), dim=1)  # one past each row's last real token
    if bool((row_end - torch.argmax(mask.long(), dim=1) != mask.sum(dim=1)).any()):
        raise ValueError(
            "A row that packs several texts (position_ids restarting at 0) has padding between its tokens; pack "
            "the texts into one run of unmasked tokens (padding only before or after it)."
        )
    rows, start_columns = torch.nonzero(starts, as_tuple=True)
    text_ends = torch.cat([start_columns[1:], start_columns.new_zeros(1)])
    last_of_row = torch.cat([rows[1:] != rows[:-1], rows.new_ones(1, dtype=torch.bool)])
    text_ends = torch.where(last_of_row, row_end[rows], text_ends)
    return rows, start_columns, text_ends - start_columns


def _labelled_tokens(
    input_ids: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None
) -> torch.Tensor | None:
    """``(batch, seq_len)``: which tokens are labelled targets (``None`` without labels). Labels
    must be the ids themselves (or ``-100``): a SentenceLM scores the text it reads."""
    if labels is not None and shift_labels is not None:
        raise ValueError("Pass labels or shift_labels (labels already shifted by one), not both.")
    given, name = (labels, "labels") if labels is not None else (shift_labels, "shift_labels")
    if given is None:
        return None
    if not isinstance(given, torch.Tensor) or given.shape != input_ids.shape:
        raise ValueError(
            f"{name} has shape {tuple(getattr(given, 'shape', ()))} but input_ids has {tuple(input_ids.shape)}; "
            "pass a tensor of the ids' shape (e.g. labels=input_ids, -100 where no loss is wanted)."
        )
    if given.is_floating_point() or given.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (or -100), got dtype {given.dtype}.")
    given = given.to(input_ids.device, torch.long)
    target = torch.zeros_like(input_ids, dtype=torch.bool)
    target[:, 1:] = (given[:, 1:] if labels is not None else given[:, :-1]) != -100
    if bool((target & (torch.roll(given, 1 if shift_labels is not None else 0, dims=1) != input_ids)).any()):
        raise ValueError(
            f"{name} differ from input_ids where they are not -100; a SentenceLM's targets are the text's own "
            "tokens: pass labels=input_ids with -100 where no loss is wanted."
        )
    return target


def _shifted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None
) -> torch.Tensor:
    """``lm_loss``: the cross-entropy of token-aligned ``logits`` ``(batch, seq_len, vocab)``
    against ``labels`` shifted by one (or ``shift_labels``, shifted already), as a token model's."""
    if shift_labels is None:
        shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        shift_labels[:, :-1].flatten().to(logits.device, torch.long),
        ignore_index=-100,
    )


def _counted_terms(
    target: torch.Tensor, packed: PackedSentences, slots: torch.Size, end_labelled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which loss terms the labelled tokens ``target`` keep: ``(num_sentences, max_len + 1)``
    decoder steps and ``(batch, slots)`` stop decisions. A sentence token's term counts when the
    token is labelled; the end-of-sentence term of a sentence and the stop decision after it count
    when the sentence's last token is labelled (they decide what follows that token); the decision
    at the start state counts when the text's first token is labelled. So with a masked prompt,
    the completion's tokens, its sentence ends and its final stop are trained, and the prompt is
    not. ``end_labelled`` ``(num_sentences,)``: the turn end (EOS) that closes the sentence is
    labelled, which also keeps that sentence's end of sentence and the stop decision after it."""
    in_sentence = packed.token_sentence >= 0
    steps = torch.zeros(packed.input_ids.shape[0], packed.input_ids.shape[1] + 1, dtype=torch.bool, device=target.device)
    steps[packed.token_sentence[in_sentence], packed.token_position[in_sentence]] = target[in_sentence]
    sentences = torch.arange(steps.shape[0], device=steps.device)
    last = steps[sentences, packed.lengths - 1] | end_labelled
    steps[sentences, packed.lengths] = last
    decisions = torch.zeros(slots, dtype=torch.bool, device=target.device)
    rows = packed.batch_index
    decisions[rows, packed.sentence_slots(slots[1])] = last
    opening = packed.sentence_index == 0
    decisions[rows[opening], packed.first_slots(slots[1])[rows[opening]]] = steps[sentences[opening], 0]
    return steps, decisions


def _load_token_model(model_or_path, tokenizer, gguf_file: str | None):
    """The token model (loaded when a path or Hub id is given) and the tokenizer to use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(model_or_path, (str, os.PathLike)):
        if not isinstance(model_or_path, PreTrainedModel):
            raise TypeError(
                f"model_or_path must be a transformers model, a path or a Hub id, got {type(model_or_path).__name__}."
            )
        return model_or_path, tokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        token_model = AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs)
    except ValueError as err:
        what = f"the GGUF file {gguf_file} in {model_or_path}" if gguf_file else str(model_or_path)
        raise ValueError(
            f"Cannot load {what} as a decoder-only language model ({err}). Pass a causal LM checkpoint "
            "(e.g. Llama, Qwen2, Mistral, GPT-2, OPT) or its GGUF file."
        ) from err
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_or_path, **kwargs)
        except (OSError, ValueError) as err:
            logger.warning("Found no tokenizer with %s (%s).", model_or_path, err)
    return token_model, tokenizer


def _backbone_config_of(token_config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of a token model's config to build the backbone from: no quantization (a GGUF
    file's weights are dequantised on loading) and no tying of embeddings the backbone lacks."""
    config = copy.deepcopy(token_config)
    for key in ("quantization_config", "_name_or_path"):
        if key in config.__dict__:
            delattr(config, key)
    config.architectures = None
    return config


def _sentence_vae_config_for(token_config, tokenizer, overrides) -> SentenceVAEConfig:
    """A new SentenceVAE's config that fits a token model: its width, heads, feed-forward size,
    vocabulary and special tokens (pad falls back to EOS, as for most decoder-only models)."""
    fields = dict(
        vocab_size=token_config.vocab_size,
        hidden_size=backbone_width(token_config),
        num_attention_heads=token_config.num_attention_heads,
        ffn_dim=backbone_ffn_dim(token_config),
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is None:
            value = getattr(token_config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            fields[name] = value
    if "pad_token_id" not in fields and "eos_token_id" in fields:
        fields["pad_token_id"] = fields["eos_token_id"]
    if "bos_token_id" not in fields and "eos_token_id" in fields:
        fields["bos_token_id"] = fields["eos_token_id"]
    if isinstance(overrides, SentenceVAEConfig):
        overrides = overrides.to_dict()
    fields.update({k: v for k, v in (overrides or {}).items() if k not in ("model_type", "transformers_version")})
    return SentenceVAEConfig(**fields)


def _copy_token_embeddings(token_model: PreTrainedModel, sentence_vae: SentenceVAEModel) -> None:
    """Start a new SentenceVAE's token embeddings (and untied output layer) from the token model's."""
    source = token_model.get_input_embeddings().weight
    target = sentence_vae.get_input_embeddings().weight
    if source.shape != target.shape:
        logger.warning(
            "The token model's embeddings %s do not fit the SentenceVAE's %s (OPT-350m's projected embeddings, or "
            "another vocabulary); the SentenceVAE keeps freshly initialised ones.",
            tuple(source.shape),
            tuple(target.shape),
        )
        return
    with torch.no_grad():
        target.copy_(source)
        output = token_model.get_output_embeddings()
        lm_head = sentence_vae.get_output_embeddings()
        if output is not None and lm_head.weight is not target and output.weight.shape == lm_head.weight.shape:
            lm_head.weight.copy_(output.weight)
