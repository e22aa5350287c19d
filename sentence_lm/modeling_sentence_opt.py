"""SentenceOPT: a Sentence-level LLM. OPT decoder layers run over sentence vectors made by a
SentenceVAE, one step per sentence; a stop head decides where the text ends and the Sentence
Decoder writes each next sentence from the backbone's state."""

from __future__ import annotations

import math
import numbers
import operator
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.masking_utils import create_causal_mask
from transformers.models.opt.modeling_opt import OPTDecoderLayer, OPTLearnedPositionalEmbedding
from transformers.utils import ModelOutput, logging

from .checkpointing import SafeCheckpointMixin
from .configuration_sentence_opt import SentenceOPTConfig
from .configuration_sentence_vae import SentenceVAEConfig
from .modeling_sentence_vae import (
    SentenceVAEModel,
    check_attention_mask,
    check_token_ids,
)
from .segmentation import PackedSentences, pack_sentences

CONTINUE, STOP = 0, 1
logger = logging.get_logger(__name__)


@dataclass
class SentenceOPTModelOutput(ModelOutput):
    """Output of [`SentenceOPTModel.forward`].

    Attributes:
        last_hidden_state: ``(batch, slots, hidden)`` backbone states, left-padded: the last
            ``1 + num_sentences[b]`` slots of row ``b`` are its start state and its sentences.
            The state at a slot predicts the sentence in the next slot (or the end of text).
        slot_mask: ``(batch, slots)`` which slots hold the start state or a sentence.
        sentence_vectors: ``(num_sentences, hidden)`` encodings of the packed sentences.
        packed: the batch's sentences, packed (see [`PackedSentences`]).
        cache: the backbone's key/value cache over sentence slots, when ``use_cache``.
    """

    last_hidden_state: torch.Tensor | None = None
    slot_mask: torch.Tensor | None = None
    sentence_vectors: torch.Tensor | None = None
    packed: PackedSentences | None = None
    cache: DynamicCache | None = None


@dataclass
class SentenceOPTCausalLMOutput(ModelOutput):
    """Output of [`SentenceOPTForCausalLM.forward`].

    Attributes:
        loss: the training loss, ``(sentence NLL + stop_loss_weight * stop NLL) / num_tokens``:
            the negative log-likelihood of every sentence's tokens and its end-of-sentence
            token given the previous sentences, plus the stop decisions, per original token.
            With ``stop_loss_weight=1`` (the default) ``exp(loss)`` is a per-token perplexity
            of the whole text, comparable with a token model's on the same tokens.
        logits: ``(batch, seq_len, vocab)`` token-aligned logits as in `OPTForCausalLM`: the
            logit at position ``t`` predicts token ``t + 1``. Inside a sentence it is the
            Sentence Decoder's step; at the last token of a sentence it is the decoder's first
            step for the next sentence. Cross-entropy over these logits (``lm_loss``) leaves out
            the end-of-sentence and stop decisions, so it is lower than ``loss``.
        lm_loss: shifted cross-entropy of ``logits`` against ``labels`` (when given).
        sentence_loss: mean NLL per sentence token, end-of-sentence tokens included.
        stop_loss: mean NLL per stop decision (one per sentence plus one at the end of text).
        nll: ``(batch,)`` total NLL of each text (sentence tokens, end-of-sentence tokens, stop
            decisions), in nats.
        num_tokens: ``(batch,)`` original tokens of each text (BOS and padding excluded).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    sentence_loss: torch.Tensor | None = None
    stop_loss: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


@dataclass
class SentenceGenerateOutput(GenerateDecoderOnlyOutput):
    """Output of [`SentenceOPTForCausalLM.generate`] with ``return_dict_in_generate=True``: a
    `GenerateDecoderOnlyOutput` (``sequences``; ``cache``: the backbone's key/value cache over
    sentence slots at the end of generation, as `OPTForCausalLM` returns its cache over tokens)
    plus:

    Attributes:
        num_sentences: ``(batch,)`` sentences written per row (a continued unfinished prompt
            sentence counts as one; a sentence cut by ``max_new_tokens`` counts too).
        decoder_cache: the Sentence Decoder's key/value cache of the last sentence written (a
            [`SentenceDecoderCache`]; ``decoder_cache.nbytes`` is the memory it held), when
            ``use_cache``.
    """

    num_sentences: torch.Tensor | None = None
    decoder_cache: object | None = None


class SentenceOPTPreTrainedModel(SafeCheckpointMixin, PreTrainedModel):
    """Weight initialisation and loading for SentenceOPT models."""

    config_class = SentenceOPTConfig
    config: SentenceOPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OPTDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SentenceOPTModel):
            nn.init.normal_(module.start_embedding, std=self.config.init_std)
        elif isinstance(module, SentenceVAEModel):
            module.boundary_table.zero_()


class SentenceOPTModel(SentenceOPTPreTrainedModel):
    """Sentence Encoder + OPT decoder layers over sentence vectors.

    Token ids are cut into sentences with the SentenceVAE's boundary table (a leading BOS, as
    OPT's tokenizer adds, is the start-of-text state rather than a sentence), the sentences are
    encoded to vectors, and the backbone runs once over ``[start, s_0, s_1, ...]`` per text.
    """

    def __init__(self, config: SentenceOPTConfig):
        super().__init__(config)
        self.sentence_vae = SentenceVAEModel(config.sentence_vae)
        self.start_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, layer_idx=i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)
            if config.do_layer_norm_before
            else None
        )
        self.dropout = config.dropout
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.sentence_vae.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.sentence_vae.set_input_embeddings(value)

    def content_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``attention_mask`` without each row's leading BOS token (the start state stands for it)."""
        if input_ids.shape[1] == 0:
            return attention_mask
        first = torch.argmax(attention_mask.long(), dim=1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        is_leading_bos = attention_mask[rows, first] & (input_ids[rows, first] == self.config.bos_token_id)
        mask = attention_mask.clone()
        mask[rows[is_leading_bos], first[is_leading_bos]] = False
        return mask

    def slot_inputs(self, sentence_vectors: torch.Tensor, packed: PackedSentences) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded backbone inputs ``(batch, 1 + max_sentences, hidden)``: the start state
        then each text's sentence vectors, and the matching slot mask."""
        batch = packed.num_sentences.shape[0]
        slots = 1 + int(packed.num_sentences.max()) if batch else 1
        if slots > self.config.max_position_embeddings:
            raise ValueError(
                f"A text has {slots - 1} sentences but the backbone holds at most "
                f"{self.config.max_position_embeddings - 1} (max_position_embeddings - 1 for the start state); "
                "shorten the text or split it into several."
            )
        dtype = self.start_embedding.dtype
        inputs = self.start_embedding.expand(batch, slots, -1).clone()
        first_slot = slots - 1 - packed.num_sentences
        inputs[packed.batch_index, first_slot[packed.batch_index] + 1 + packed.sentence_index] = sentence_vectors.to(
            dtype
        )
        slot_mask = torch.arange(slots, device=inputs.device) >= first_slot[:, None]
        return inputs, slot_mask

    def backbone(
        self,
        inputs_embeds: torch.Tensor,
        slot_mask: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Run the OPT layers over slot inputs ``(batch, new_slots, hidden)``.

        ``slot_mask`` covers the cached slots and the new ones; positions count real slots only,
        so left padding shifts nothing.
        """
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (slot_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=slot_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden = inputs_embeds + self.embed_positions(slot_mask, past, position_ids=position_ids).to(
            inputs_embeds.dtype
        )
        hidden = F.dropout(hidden, p=self.dropout, training=self.training)
        for layer in self.layers:
            if self.training and self.config.layerdrop > 0 and torch.rand([]) < self.config.layerdrop:
                continue
            hidden = layer(hidden, attention_mask=causal_mask, cache=cache, position_ids=position_ids)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SentenceOPTModelOutput | tuple:
        """Segment, encode and run the backbone over a batch of texts.

        Args:
            input_ids: ``(batch, seq_len)`` token ids, padded on either side.
            attention_mask: ``(batch, seq_len)``, 1 on real tokens.
            use_cache: also return the backbone's key/value cache.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no text (batch size 0); pass at least one row.")
        input_ids = input_ids.long()
        mask = check_attention_mask(attention_mask, input_ids)
        content = self.content_mask(input_ids, mask)
        empty = ~content.any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"Row(s) {torch.nonzero(empty).flatten().tolist()} of input_ids hold no text token (only "
                "padding or BOS); every text needs at least one token: drop such rows (use `generate()` to "
                "start from nothing)."
            )
        packed = pack_sentences(input_ids, self.sentence_vae.segment(input_ids, content), self.config.pad_token_id)
        vectors = self.sentence_vae.encode(packed.input_ids, packed.attention_mask)
        inputs, slot_mask = self.slot_inputs(vectors, packed)
        cache = DynamicCache(config=self.config) if use_cache else None
        hidden = self.backbone(inputs, slot_mask, cache)
        output = SentenceOPTModelOutput(
            last_hidden_state=hidden, slot_mask=slot_mask, sentence_vectors=vectors, packed=packed, cache=cache
        )
        return output if return_dict is not False else output.to_tuple()


class SentenceOPTForCausalLM(SentenceOPTPreTrainedModel, GenerationMixin):
    """SentenceOPT with a stop head and the Sentence Decoder: a causal LM that predicts the next
    *sentence*. See [`SentenceOPTCausalLMOutput`] for what `forward` computes and
    :meth:`generate` for next-sentence generation."""

    def __init__(self, config: SentenceOPTConfig):
        super().__init__(config)
        self.model = SentenceOPTModel(config)
        self.stop_head = nn.Linear(config.hidden_size, 2)
        self.post_init()
        self.generation_config.update(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        self.tokenizer = None
        self.model_card_kwargs: dict = {}

    def _save_extras(self, save_directory: str) -> None:
        """Save what belongs beside the weights: the tokenizer attached as ``model.tokenizer``
        (by `from_opt`, the training script or the user) and the model card ``README.md``,
        rendered from MODEL_CARD.md with ``model.model_card_kwargs`` (``results``,
        ``datasets``, ``repo_id``, ``license``; see `render_model_card`)."""
        from .model_card import save_model_card

        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        save_model_card(self, save_directory, **self.model_card_kwargs)

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

    # ------------------------------------------------------------------------------ training
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        sentence_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> SentenceOPTCausalLMOutput | tuple:
        """Score texts: the training loss (whole-text NLL per token) and token-aligned logits.

        Args:
            input_ids: ``(batch, seq_len)`` token ids, padded on either side; every text is
                taken as complete (its end is a stop decision).
            attention_mask: ``(batch, seq_len)``, 1 on real tokens.
            labels: optional ``(batch, seq_len)`` ids (``-100`` to ignore) for ``lm_loss``, the
                causal-LM cross-entropy of the aligned ``logits`` (as `OPTForCausalLM` computes).
            sentence_ids: accepted so that ``model(**tokenizer(...))`` works, and ignored: the
                model segments ``input_ids`` itself with the same rule.

        Returns:
            [`SentenceOPTCausalLMOutput`].
        """
        check_token_ids(input_ids, self.config.vocab_size)
        input_ids = input_ids.long()  # int32 (or other integer) ids work like int64 ones
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            raise ValueError(
                f"labels has shape {tuple(getattr(labels, 'shape', ()))} but input_ids has {tuple(input_ids.shape)}; "
                "pass a tensor of the ids' shape (e.g. labels=input_ids, -100 where no loss is wanted)."
            )
        out = self.model(input_ids, attention_mask)
        packed, hidden, slot_mask = out.packed, out.last_hidden_state, out.slot_mask
        slots = hidden.shape[1]
        first_slot = slots - 1 - packed.num_sentences

        # Sentence i of a text is written from the state of the slot before it.
        memory = hidden[packed.batch_index, first_slot[packed.batch_index] + packed.sentence_index]
        # The output layer runs only on the decoder steps that have a target (no padding).
        mask = packed.attention_mask
        states = self.sentence_vae.teacher_forced_states(packed.input_ids, mask, memory)
        targets = self.sentence_vae.reconstruction_targets(packed.input_ids, mask)
        has_target = targets != -100
        step_logits = self.sentence_vae.lm_head(states[has_target])
        step_index = has_target.long().flatten().cumsum(0).view(has_target.shape) - 1
        token_nll = torch.zeros(targets.shape, dtype=torch.float32, device=states.device)
        token_nll[has_target] = F.cross_entropy(step_logits.float(), targets[has_target], reduction="none")

        # Stop decisions: continue at every slot but the last, stop at the last.
        stop_logits = self.stop_head(hidden).float()
        stop_targets = torch.full(slot_mask.shape, CONTINUE, dtype=torch.long, device=hidden.device)
        stop_targets[:, -1] = STOP
        stop_nll = F.cross_entropy(stop_logits.flatten(0, 1), stop_targets.flatten(), reduction="none")
        stop_nll = stop_nll.view(slot_mask.shape) * slot_mask

        batch = input_ids.shape[0]
        sentence_nll = torch.zeros(batch, device=hidden.device).index_add_(0, packed.batch_index, token_nll.sum(1))
        nll = sentence_nll + stop_nll.sum(1)
        num_tokens = torch.zeros(batch, dtype=torch.long, device=hidden.device).index_add_(
            0, packed.batch_index, packed.lengths
        )
        total_tokens = num_tokens.sum()
        loss = (sentence_nll.sum() + self.config.stop_loss_weight * stop_nll.sum()) / total_tokens
        logits = self.aligned_logits(step_logits, step_index, packed)
        lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                labels[:, 1:].flatten().to(logits.device, torch.long),
                ignore_index=-100,
            )
        output = SentenceOPTCausalLMOutput(
            loss=loss,
            logits=logits,
            lm_loss=lm_loss,
            sentence_loss=sentence_nll.sum() / has_target.sum(),
            stop_loss=stop_nll.sum() / slot_mask.sum(),
            nll=nll,
            num_tokens=num_tokens,
        )
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def aligned_logits(step_logits: torch.Tensor, step_index: torch.Tensor, packed: PackedSentences) -> torch.Tensor:
        """Rearrange teacher-forced decoder logits into token-aligned logits
        ``(batch, seq_len, vocab)`` where position ``t`` predicts token ``t + 1``.

        ``step_logits`` holds the logits of the decoder steps that have a target (a sentence's
        tokens and its end-of-sentence token), and ``step_index[s, j]`` the row of sentence
        ``s``'s step ``j`` in it.
        """
        sentence, position = packed.token_sentence, packed.token_position
        offsets = packed.num_sentences.cumsum(0) - packed.num_sentences
        in_text = sentence >= 0
        sentence = torch.where(in_text, sentence, offsets[:, None])
        is_last = in_text & (position == packed.lengths[sentence] - 1)
        has_next = (sentence + 1 < (offsets + packed.num_sentences)[:, None]) & is_last
        target_sentence = torch.where(has_next, sentence + 1, sentence)
        target_step = torch.where(has_next | ~in_text, 0, position + 1)
        return step_logits[step_index[target_sentence, target_step]]

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_opt(
        cls,
        opt_model_or_path,
        sentence_vae: SentenceVAEModel | str | os.PathLike | None = None,
        tokenizer=None,
        sentence_vae_config: SentenceVAEConfig | dict | None = None,
        **config_overrides,
    ) -> "SentenceOPTForCausalLM":
        """Build a SentenceOPT whose backbone layers and positions come from an OPT checkpoint.

        Args:
            opt_model_or_path: an `OPTForCausalLM`/`OPTModel`, or a path or Hub id of one
                (e.g. ``"facebook/opt-125m"``).
            sentence_vae: a trained `SentenceVAEModel` (or its path); when ``None`` a new one is
                made from ``sentence_vae_config`` (defaults: one layer each, the OPT's width,
                heads, vocabulary and special tokens) and OPT's token embeddings are copied into it.
            tokenizer: the tokenizer whose sentence-boundary table the model should use (needed
                when the SentenceVAE has no table yet); it is attached as ``model.tokenizer`` and
                saved with the model.
            config_overrides: other `SentenceOPTConfig` fields (e.g. ``stop_loss_weight``).
        """
        from transformers import AutoModelForCausalLM, OPTConfig

        opt = opt_model_or_path
        if isinstance(opt, (str, os.PathLike)):
            opt = AutoModelForCausalLM.from_pretrained(opt)
        base_model = opt.name_or_path or None
        opt_config = getattr(opt, "config", None)
        if not isinstance(opt_config, OPTConfig):
            raise ValueError(
                f"from_opt needs an OPT model (model_type 'opt'), got {type(opt).__name__} with "
                f"model_type {getattr(opt_config, 'model_type', None)!r}."
            )
        decoder = opt.model.decoder if hasattr(opt, "model") else opt.decoder
        if isinstance(sentence_vae, (str, os.PathLike)):
            sentence_vae = SentenceVAEModel.from_pretrained(sentence_vae)
        new_vae = sentence_vae is None
        if new_vae:
            vae_fields = dict(
                vocab_size=opt_config.vocab_size,
                hidden_size=opt_config.hidden_size,
                num_attention_heads=opt_config.num_attention_heads,
                ffn_dim=opt_config.ffn_dim,
                pad_token_id=opt_config.pad_token_id,
                bos_token_id=opt_config.bos_token_id,
                eos_token_id=opt_config.eos_token_id,
            )
            if isinstance(sentence_vae_config, SentenceVAEConfig):
                sentence_vae_config = sentence_vae_config.to_dict()
            vae_fields.update(sentence_vae_config or {})
            vae_fields.pop("model_type", None)
            vae_fields.pop("transformers_version", None)
            sentence_vae = SentenceVAEModel(SentenceVAEConfig(**vae_fields))
        if sentence_vae.config.hidden_size != opt_config.hidden_size:
            raise ValueError(
                f"The OPT checkpoint has hidden_size {opt_config.hidden_size} but the SentenceVAE has "
                f"{sentence_vae.config.hidden_size}; they must match. Use an OPT of the SentenceVAE's width "
                "or train a SentenceVAE with hidden_size equal to the OPT's."
            )
        backbone_fields = (
            "hidden_size num_hidden_layers num_attention_heads ffn_dim max_position_embeddings do_layer_norm_before "
            "dropout attention_dropout activation_function layerdrop init_std enable_bias layer_norm_elementwise_affine"
        ).split()
        fields = {name: getattr(opt_config, name) for name in backbone_fields}
        fields.update(config_overrides)
        config = SentenceOPTConfig(sentence_vae=sentence_vae.config, base_model=base_model, **fields)
        model = cls(config)
        model.model.sentence_vae = sentence_vae
        copied = ("layers.", "embed_positions.", "final_layer_norm.")
        source = {k: v for k, v in decoder.state_dict().items() if k.startswith(copied)}
        missing, unexpected = model.model.load_state_dict(source, strict=False)
        if unexpected:
            raise ValueError(f"Unexpected OPT weights {unexpected}; is this a standard OPT checkpoint?")
        if new_vae and opt_config.word_embed_proj_dim == opt_config.hidden_size:
            with torch.no_grad():
                sentence_vae.get_input_embeddings().weight.copy_(decoder.embed_tokens.weight)
        if tokenizer is not None:
            sentence_vae.set_boundary_table(tokenizer)
            model.tokenizer = tokenizer
        return model

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        streamer=None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> torch.Tensor | SentenceGenerateOutput:
        """Generate text one sentence at a time.

        Follows the `transformers` contract: ``input_ids``/``attention_mask`` (left padding),
        a `GenerationConfig` and/or keyword overrides (``max_new_tokens``, ``min_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``num_return_sequences``, ``pad_token_id``, ``return_dict_in_generate``), a
        ``streamer``; returns the prompts followed by the new tokens as one ``LongTensor``
        (right-padded with ``pad_token_id``), or a [`SentenceGenerateOutput`] (a
        `GenerateDecoderOnlyOutput` with ``sequences``, the backbone's ``cache`` and
        ``num_sentences``) when ``return_dict_in_generate=True``.

        Each step, for all unfinished rows at once: the stop head reads the backbone state and
        decides whether the text ends (greedy, or sampled when ``do_sample``; never before
        ``min_new_tokens``); the Sentence Decoder writes the next sentence with its own KV cache,
        through the logits processors built from the generation config (sampling settings and
        ``repetition_penalty`` act within the sentence being written); the sentence is encoded
        and fed to the backbone, which keeps a KV cache over sentences. ``max_new_tokens`` is an
        exact budget: a sentence is cut when it runs out. The end-of-sentence token is never
        returned. A prompt whose last sentence is unfinished is continued: that sentence's
        tokens are the decoder's prefix. An empty prompt (``input_ids=None`` or zero columns)
        starts from the start-of-text state, and so does a row whose ``attention_mask`` is all
        zeros. Generation also stops when the backbone's ``max_position_embeddings`` sentence
        slots are full, so a row never gets more than ``(max_position_embeddings - 1) *
        max_sentence_len`` new tokens, whatever ``max_new_tokens`` says.

        Right-padded prompts log a warning and are continued as their left-padded form would be
        (the padding then sits between prompt and new tokens). ``eos_token_id`` (an int or a
        list) is accepted and changes nothing: the stop head ends a text, the model's
        end-of-sentence id ends a sentence. ``temperature=0`` is accepted only without sampling
        (it is greedy decoding); ``min_new_tokens`` above ``max_new_tokens`` gives
        ``max_new_tokens`` tokens. Settings of the wrong type or range raise a ``TypeError`` or
        ``ValueError`` that names them.
        """
        # Checked before the library merges and validates them: clearer messages, and no raw TypeError.
        _check_sampling_settings(generation_config if generation_config is not None else self.generation_config, kwargs)
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        unused = set(model_kwargs) - {"output_attentions", "output_hidden_states", "sentence_ids"}
        if unused:
            raise ValueError(
                f"generate() got unknown arguments {sorted(unused)}; check the spelling (generation settings are "
                "the fields of transformers.GenerationConfig)."
            )
        _check_sampling_settings(generation_config)
        generation_config.validate()
        if use_cache is None:
            # As transformers' generate(): the generation config decides, not `config.use_cache`
            # (which training sets to False, and which checkpoints saved by the Trainer keep).
            use_cache = generation_config.use_cache if generation_config.use_cache is not None else True
        device = self.device
        if input_ids is None:
            input_ids = torch.full((1, 0), self.config.bos_token_id, dtype=torch.long, device=device)
        check_token_ids(input_ids, self.config.vocab_size)
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no prompt (batch size 0); pass at least one row, or None for one empty prompt.")
        input_ids = input_ids.to(device=device, dtype=torch.long)
        mask = check_attention_mask(attention_mask, input_ids)
        if input_ids.shape[1] and bool((mask.any(dim=1) & ~mask[:, -1]).any()):  # all-padding rows are empty prompts
            logger.warning_once(
                "A prompt is right-padded; pass left-padded prompts (tokenizer.padding_side = 'left') so that "
                "the new tokens follow each prompt directly."
            )
        if streamer is not None and input_ids.shape[0] * generation_config.num_return_sequences > 1:
            raise ValueError("A streamer works with one text at a time; pass a single prompt with num_return_sequences=1.")
        if generation_config.num_return_sequences > 1:
            if not generation_config.do_sample:
                raise ValueError(
                    "num_return_sequences > 1 needs do_sample=True (greedy decoding would return identical copies)."
                )
            input_ids = input_ids.repeat_interleave(generation_config.num_return_sequences, dim=0)
            mask = mask.repeat_interleave(generation_config.num_return_sequences, dim=0)
        prompt_len = input_ids.shape[1]
        max_new = generation_config.max_new_tokens
        if max_new is None:
            max_new = generation_config.max_length - prompt_len
            if max_new <= 0:
                raise ValueError(
                    f"The prompt has {prompt_len} tokens but max_length is {generation_config.max_length}, which "
                    "leaves no room for new tokens; pass max_new_tokens (the number of tokens to add) instead."
                )
        min_new = generation_config.min_new_tokens or max(0, (generation_config.min_length or 0) - prompt_len)
        if max_new < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new}.")
        # A row writes at most one sentence per free sentence slot, so a larger budget changes
        # nothing: cap it before it sizes any buffer (max_new_tokens=10**12 must not allocate 8 TB).
        max_new = min(max_new, self.config.max_position_embeddings * self.config.sentence_vae.max_sentence_len)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        processors = self._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=prompt_len,
            logits_processor=logits_processor,
            device=device,
        )
        new_tokens, cache, num_sentences, decoder_cache = self._generate_sentences(
            input_ids, mask, max_new, min_new, generation_config.do_sample, processors, use_cache, streamer
        )
        if streamer is not None:
            streamer.end()
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else self.config.pad_token_id
        new_tokens = torch.where(new_tokens < 0, pad, new_tokens)
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        if generation_config.return_dict_in_generate:
            return SentenceGenerateOutput(
                sequences=sequences, cache=cache, num_sentences=num_sentences, decoder_cache=decoder_cache
            )
        return sequences

    def _generate_sentences(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        max_new: int,
        min_new: int,
        do_sample: bool,
        processors: LogitsProcessorList,
        use_cache: bool,
        streamer,
    ) -> tuple[torch.Tensor, DynamicCache | None, torch.Tensor, object | None]:
        """The next-sentence loop; returns ``(batch, written)`` new tokens (``-1`` where none),
        the backbone's cache, the number of sentences written per row and the last decoder cache."""
        batch, device = input_ids.shape[0], input_ids.device
        vae, backbone = self.sentence_vae, self.model
        content = backbone.content_mask(input_ids, mask)
        sentence_ids, closed = vae.segment(input_ids, content, return_closed=True)

        # An unfinished last sentence becomes the decoder's prefix; the rest feeds the backbone.
        num_sentences = sentence_ids.amax(dim=1) + 1 if sentence_ids.shape[1] else torch.zeros_like(closed, dtype=torch.long)
        is_open = ~closed & (num_sentences > 0)
        in_prefix = is_open[:, None] & (sentence_ids == (num_sentences - 1)[:, None])
        prefix_ids, prefix_mask = _left_align(input_ids, in_prefix, self.config.pad_token_id)
        sentence_ids = torch.where(in_prefix, -1, sentence_ids)
        packed = pack_sentences(input_ids, sentence_ids, self.config.pad_token_id)
        vectors = (
            _encode_by_length(vae, packed.input_ids, packed.attention_mask)
            if packed.input_ids.shape[0]
            else torch.empty(0, self.config.hidden_size, device=device)
        )
        inputs, slot_mask = backbone.slot_inputs(vectors, packed)
        cache = DynamicCache(config=self.config) if use_cache else None
        all_inputs = inputs
        state = backbone.backbone(inputs, slot_mask, cache)[:, -1]

        # New tokens go to `written`; a last column takes the padding of each decoded block.
        written = torch.full((batch, max_new + 1), -1, dtype=torch.long, device=device)
        count = torch.zeros(batch, dtype=torch.long, device=device)
        sentences_written = torch.zeros(batch, dtype=torch.long, device=device)
        done = count >= max_new
        slots_used = slot_mask.sum(dim=1)
        decoder_cache = None
        while not bool(done.all()):
            # The stop head may end a text only between sentences and after min_new_tokens.
            stop_logits = self.stop_head(state).float()
            stop = (
                torch.multinomial(stop_logits.softmax(-1), 1).squeeze(1) if do_sample else stop_logits.argmax(-1)
            ) == STOP
            done |= stop & ~is_open & (count >= min_new)
            if bool(done.all()):
                break
            rows = torch.nonzero(~done).squeeze(1)
            has_prefix = prefix_ids.shape[1] > 0
            out = vae.decode(
                state[rows],
                prefix_ids=prefix_ids[rows] if has_prefix else None,
                prefix_mask=prefix_mask[rows] if has_prefix else None,
                max_new_tokens=max_new - count[rows],
                do_sample=do_sample,
                logits_processor=processors,
                use_cache=use_cache,
            )
            decoder_cache = out.cache
            width = out.sequences.shape[1]
            steps = torch.arange(width, device=device)
            keep = steps < out.lengths[:, None]
            columns = torch.where(keep, count[rows, None] + steps, max_new)
            written.index_put_((rows[:, None].expand_as(columns), columns), out.sequences)
            if streamer is not None and out.sequences.numel():
                streamer.put(out.sequences[0, : int(out.lengths[0])].cpu())
            count[rows] += out.lengths
            # The whole sentence (prefix included) is encoded and appended to the backbone.
            if has_prefix:
                sentence, sentence_mask = _join_right(prefix_ids[rows], prefix_mask[rows], out.sequences, keep)
            else:
                sentence, sentence_mask = out.sequences, keep
            sentence_len = sentence_mask.sum(dim=1)
            empty = sentence_len == 0
            sentences_written[rows] += (~empty).long()
            done[rows[empty]] = True
            slots_used[rows] += 1
            done |= (count >= max_new) | (slots_used >= self.config.max_position_embeddings)
            is_open[:] = False
            prefix_ids, prefix_mask = prefix_ids[:, :0], prefix_mask[:, :0]
            if bool(done.all()):
                break
            step = torch.zeros(batch, 1, self.config.hidden_size, dtype=inputs.dtype, device=device)
            filled = rows
            if bool(empty.any()):
                filled, sentence_len = rows[~empty], sentence_len[~empty]
                sentence, sentence_mask = sentence[~empty], sentence_mask[~empty]
            if filled.numel():
                sentence_width = int(sentence_len.max())
                step[filled, 0] = vae.encoder(
                    vae.embed_tokens(sentence[:, :sentence_width]), sentence_mask[:, :sentence_width]
                ).to(inputs.dtype)
            slot_mask = torch.cat([slot_mask, torch.ones_like(slot_mask[:, :1])], dim=1)
            if use_cache:
                state = backbone.backbone(step, slot_mask, cache)[:, -1]
            else:
                all_inputs = torch.cat([all_inputs, step], dim=1)
                state = backbone.backbone(all_inputs, slot_mask)[:, -1]
        new_tokens = written[:, : int(count.max()) if batch else 0]
        return new_tokens, cache, sentences_written, decoder_cache


_INTEGER_SETTINGS = {
    "max_new_tokens": 1,
    "min_new_tokens": 0,
    "max_length": 0,
    "min_length": 0,
    "num_return_sequences": 1,
    "top_k": 0,
}
"""Integer generation settings and their smallest valid value."""


def _check_sampling_settings(config: GenerationConfig, overrides: dict | None = None) -> None:
    """Refuse generation settings of the wrong type or range with an error that names the
    setting, before `GenerationConfig.validate` (whose messages are vaguer, and which lets some
    through): integers that are not integers, ``max_new_tokens < 1``, ``temperature <= 0`` when
    sampling, ``top_p`` outside (0, 1], ``num_return_sequences > 1`` without sampling.

    ``overrides`` are the keyword arguments of ``generate()``, which take precedence over
    ``config``. Integer settings given as numpy or 0-d tensor integers are turned into ``int``
    (in ``overrides`` when they come from there)."""
    overrides = {} if overrides is None else overrides

    def get(name: str):
        return overrides[name] if name in overrides else getattr(config, name, None)

    for name, minimum in _INTEGER_SETTINGS.items():
        value = get(name)
        if value is None:
            continue
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number is None or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
        if number < minimum:
            hint = ""
            if name == "max_new_tokens":
                hint = " (the number of tokens to add; transformers' generate() refuses 0 too)"
            raise ValueError(f"{name} must be an integer >= {minimum}, got {number}{hint}.")
        if name in overrides:
            overrides[name] = number
        else:
            setattr(config, name, number)
    for name in ("temperature", "top_p"):
        value = get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        ):
            raise TypeError(f"{name} must be a finite number, got {value!r}.")
    top_p, temperature, do_sample = get("top_p"), get("temperature"), bool(get("do_sample"))
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}; 1.0 turns nucleus sampling off.")
    if temperature is not None and (temperature < 0 or (temperature == 0 and do_sample)):
        raise ValueError(
            f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy "
            "decoding (temperature=0 is accepted, and means greedy, only then)."
        )
    copies = get("num_return_sequences")
    if copies is not None and copies > 1 and not do_sample:
        raise ValueError(
            f"num_return_sequences={copies} needs do_sample=True (greedy decoding would return identical "
            "copies); pass do_sample=True or num_return_sequences=1."
        )


def _encode_by_length(
    vae: SentenceVAEModel, input_ids: torch.Tensor, mask: torch.Tensor, max_tokens: int = 4096
) -> torch.Tensor:
    """``vae.encode`` of packed sentences, longest first, in chunks of at most ``max_tokens``
    padded tokens: a long prompt's sentences are padded to their chunk's longest rather than
    to the longest of all (less work, and transient memory bounded by ``max_tokens``)."""
    lengths = mask.sum(dim=1)
    if input_ids.shape[0] * input_ids.shape[1] <= max_tokens:
        return vae.encode(input_ids, mask)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    vectors = None
    start = 0
    while start < len(order):
        width = max(1, sorted_lengths[start])
        stop = min(len(order), start + max(1, max_tokens // width))
        rows = order[start:stop]
        chunk = vae.encode(input_ids[rows, :width], mask[rows, :width])
        if vectors is None:
            vectors = chunk.new_empty(input_ids.shape[0], chunk.shape[1])
        vectors[rows] = chunk
        start = stop
    return vectors


def _left_align(input_ids: torch.Tensor, keep: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of each row where ``keep`` holds, left-padded into ``(batch, max_kept)``."""
    counts = keep.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros(out.shape, dtype=torch.bool, device=input_ids.device)
    if width:
        # Column of each kept token: (width - count) + its rank among the row's kept tokens.
        column = (width - counts)[:, None] + keep.long().cumsum(dim=1) - 1
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(keep)
        out[rows[keep], column[keep]] = input_ids[keep]
        out_mask[rows[keep], column[keep]] = True
    return out, out_mask


def _join_right(
    prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, new_ids: torch.Tensor, new_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each row's left-padded prefix with its right-padded new tokens into one
    right-padded sentence (the layout the encoder takes)."""
    ids = torch.cat([prefix_ids, new_ids], dim=1)
    mask = torch.cat([prefix_mask, new_mask], dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order), mask.gather(1, order)
