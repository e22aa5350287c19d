"""Next-sentence generation: the `generate()` of SentenceLM models, as a mixin over
`transformers`' `GenerationMixin` (whose config merging, validation and logits processors it
reuses). Each step the stop head decides whether a text ends, the Sentence Decoder writes the
next sentence, and the sentence is encoded and appended to the backbone's cache."""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import operator
from dataclasses import dataclass

import torch
from transformers import (
    CompileConfig,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .decoding import DecodingResult, blank_token_scores, context_before, left_align, running_text, stop_decision
from .generation_runtime import ROW_ATTENTION, generate_rows
from .validation import check_attention_mask, check_token_ids

logger = logging.get_logger(__name__)


@dataclass
class SentenceGenerateOutput(GenerateDecoderOnlyOutput):
    """Output of [`SentenceGenerationMixin.generate`] with ``return_dict_in_generate=True``: a
    `GenerateDecoderOnlyOutput` (``sequences``; ``cache``: the backbone's key/value cache over
    sentence slots at the end of generation, as a token model returns its cache over tokens: a
    [`SlotCache`], each row's slots in its own columns) plus:

    Attributes:
        num_sentences: ``(batch,)`` sentences written per row (a continued unfinished prompt
            sentence counts as one; a sentence cut by ``max_new_tokens`` counts too).
        decoder_cache: the Sentence Decoder's key/value cache (a [`RowDecoderCache`], one row per
            text, holding its last sentence; ``decoder_cache.nbytes`` is its memory), when
            ``use_cache``.
        decoder_passes: ``(batch,)`` Sentence Decoder passes each row took (one per token and
            end-of-sentence marker without drafts; fewer with ``draft_tokens``), when ``use_cache``.
    """

    num_sentences: torch.Tensor | None = None
    decoder_cache: object | None = None
    decoder_passes: torch.Tensor | None = None


class SentenceGenerationMixin(GenerationMixin):
    """`generate()` for models that write one sentence per backbone step. The model provides
    ``self.model`` (a `SentenceLMModel`: ``prompt_slots``, ``new_cache``, ``run_backbone``,
    ``backbone_forward``, ``attention_implementation``), ``self.stop_head`` and
    ``self.sentence_vae``; the rules every loop shares are in :mod:`sentence_lm.decoding`."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn=None,
        synced_gpus: bool | None = None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        custom_generate=None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        tokenizer=None,
        assistant_tokenizer=None,
        **kwargs,
    ) -> torch.Tensor | SentenceGenerateOutput:
        """Generate text one sentence at a time.

        Follows the `transformers` contract: ``input_ids``/``attention_mask`` (left padding),
        a `GenerationConfig` and/or keyword overrides (``max_new_tokens``, ``min_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``num_return_sequences``, ``pad_token_id``, ``return_dict_in_generate``,
        ``cache_implementation``: ``"dynamic"`` by default, or ``"static"`` for fixed-shape buffers
        preallocated over every sentence slot the call can fill, compiled with ``torch.compile``
        where `transformers` compiles a token model with a static cache: on CUDA, or anywhere with
        ``compile_config._compile_all_devices``, unless ``disable_compile``; ``compile_config``
        gives the settings), a ``streamer``; returns the prompts followed by the new tokens as one ``LongTensor``
        (right-padded with ``pad_token_id``), or a [`SentenceGenerateOutput`] (a
        `GenerateDecoderOnlyOutput` with ``sequences``, the backbone's ``cache`` and
        ``num_sentences``) when ``return_dict_in_generate=True``.

        For each text: the stop head reads the backbone state and decides whether the text ends
        (greedy, or sampled when ``do_sample``; never before ``min_new_tokens``): a text it ends
        gets the EOS as its last new token, as a token model writes it at the end of its text or
        turn (when ``max_new_tokens`` leaves room for it), so that a chat's reply ends with
        ``<|im_end|>``. A prompt that ends with an end of turn (an EOS after text, as a chat
        template writes one) has that decision made: the text goes on with a sentence. The Sentence
        Decoder writes the next sentence with its own KV cache, through the logits processors
        built from the generation config (which see the whole running text, see below:
        ``repetition_penalty`` counts the prompt and every sentence written, as for a token
        model); the sentence is encoded and fed to the backbone, which keeps a KV cache over
        sentences. The rows of a batch advance independently (:mod:`.generation_runtime`): at
        every decoder step each unfinished row writes one token or ends its sentence, and the
        rows whose sentence ended take their backbone step together; no row waits for another's
        longer sentence, and each row's greedy text is the one it gets alone (in float32; in bfloat16
        a near-tie may come out otherwise when other rows share its backbone steps). A SentenceVAE
        with a ``context_window`` (each sentence written after the text's last tokens) has each new
        sentence's context fed into the decoder cache as the sentence starts. Without a cache
        (``use_cache=False``) or for a backbone attention other than ``eager`` and ``sdpa``, the
        reference loop runs instead: all rows write a sentence, then take one backbone step. ``max_new_tokens`` is an
        exact budget: a sentence is cut when it runs out. The end of a sentence is not a token of
        the text (the EOS ends the text only). A prompt whose last sentence is unfinished is continued: that sentence's
        tokens are the decoder's prefix. An empty prompt (``input_ids=None`` or zero columns)
        starts from the start-of-text state, and so does a row whose ``attention_mask`` is all
        zeros. Generation also stops when the backbone's ``max_position_embeddings`` sentence
        slots are full, so a row never gets more than ``(max_position_embeddings - 1) *
        max_sentence_len`` new tokens, whatever ``max_new_tokens`` says.

        Logits processors (``logits_processor``, and those the settings build:
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``, ``sequence_bias``,
        ``suppress_tokens``, ``prefix_allowed_tokens_fn``, the sampling warpers...) and
        ``stopping_criteria`` see the running text as for any `transformers` model: ``input_ids`` of
        shape ``(batch * num_return_sequences, cur_len)``, each row its prompt as given (left
        padding included) followed by the tokens written so far, with every row of the batch in
        order at every decoder step. Rows that have written fewer tokens than the longest are
        padded on the left with ``pad_token_id`` (a token model writes the same number of tokens in
        every row; here the rows end different numbers of sentences); a row that is not writing at
        that step (its text is finished; in the reference loop also a row whose sentence is
        finished while others write on, which has ``pad_token_id`` in the newest columns) is
        there too, and the processors' output for it is ignored. The end-of-sentence marker is
        never part of ``input_ids``; it is one column of the scores (a processor that bans it makes
        sentences run to ``max_sentence_len``). ``stopping_criteria`` (``StoppingCriteria`` objects
        or callables ``(input_ids, scores) -> bool tensor``), ``max_time`` and ``stop_strings``
        (with ``tokenizer=``) are checked after every new token on the running text; a row they
        stop is finished there (its sentence is cut at that token). ``min_new_tokens`` holds the
        stop head, not an end-of-text token.

        ``output_scores`` / ``output_logits`` (with ``return_dict_in_generate=True``) give, as
        `transformers` does, a tuple of one ``(batch, vocab)`` float tensor per generated column
        (``len == sequences.shape[1] - prompt_len``): the processed scores a token was chosen
        from, or the decoder's raw logits. Row ``r`` of tensor ``j`` belongs to that row's
        ``j``-th new token, which rows write at different decoder steps; where a row has no
        ``j``-th token (it finished earlier, and holds ``pad_token_id`` there) the row is
        ``-inf`` except ``0`` at ``pad_token_id``, so the argmax of every score row is the token
        returned. The end-of-sentence steps have no column (the marker is not part of the text);
        the EOS that ends a text has one, ``-inf`` but ``0`` at the EOS (the stop head chose it).
        ``output_hidden_states`` / ``output_attentions`` with ``return_dict_in_generate=True`` are
        refused with a ``ValueError`` (the backbone runs once per sentence, not per token: call the
        model on the returned sequences for its states over sentence slots); without
        ``return_dict_in_generate`` they change nothing, as for a token model.

        ``draft_tokens`` (a `GenerationConfig` field or keyword, ``0`` by default: off) drafts
        each sentence: a model whose SentenceVAE has a draft head (its ``parallel_readout``; add one
        to a trained model with :func:`sentence_lm.training_draft_head.train_draft_head`) reads
        ``draft_tokens`` tokens of the sentence at once, and one decoder pass checks them and
        keeps those the decoder itself chooses (:mod:`sentence_lm.drafting`): greedy text is
        token for token the same, sampled text comes from the same distribution, and everything
        above (processors, criteria, streamer, scores) sees the same tokens; only the number of
        decoder passes (``decoder_passes`` of the output) falls. A model without a draft head, or
        ``use_cache=False``, refuses it with a ``ValueError``.

        What next-sentence decoding cannot do raises a ``ValueError`` that names the setting:
        beam search (``num_beams > 1``, ``num_beam_groups``, ``diversity_penalty``,
        ``constraints``, ``force_words_ids``), assisted and speculative decoding
        (``assistant_model``, ``prompt_lookup_num_tokens``, ``assistant_early_exit``...),
        contrastive search (``penalty_alpha``), DoLa (``dola_layers``), classifier-free guidance
        (``guidance_scale``, ``negative_prompt_ids``), ``watermarking_config``,
        ``exponential_decay_length_penalty``, ``forced_eos_token_id``, ``token_healing``,
        ``prefill_chunk_size``, ``low_memory``, the encoder-decoder settings
        ``encoder_repetition_penalty`` / ``encoder_no_repeat_ngram_size``, ``synced_gpus`` and
        ``custom_generate``. ``length_penalty`` and ``early_stopping`` only act on beam search and,
        as for a token model without beams, change nothing.

        Right-padded prompts log a warning and are continued as their left-padded form would be
        (the padding then sits between prompt and new tokens). ``eos_token_id`` (an int or a
        list) is accepted and changes nothing: the stop head ends a text (with the model's EOS),
        the model's end-of-sentence id ends a sentence. ``temperature=0`` is accepted only without sampling
        (it is greedy decoding); ``min_new_tokens`` above ``max_new_tokens`` gives
        ``max_new_tokens`` tokens. Settings of the wrong type or range raise a ``TypeError`` or
        ``ValueError`` that names them.
        """
        # Checked before the library merges and validates them: clearer messages, and no raw TypeError.
        _check_generation_settings(generation_config if generation_config is not None else self.generation_config, kwargs)
        draft_tokens = kwargs.pop("draft_tokens", None)
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if draft_tokens is None:
            draft_tokens = getattr(generation_config, "draft_tokens", 0)
        _refuse_unsupported(
            generation_config,
            dict(
                assistant_model=assistant_model,
                assistant_tokenizer=assistant_tokenizer,
                negative_prompt_ids=negative_prompt_ids,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                synced_gpus=synced_gpus,
                custom_generate=custom_generate,
            ),
        )
        unused = set(model_kwargs) - {"output_attentions", "output_hidden_states", "sentence_ids"}
        if unused:
            raise ValueError(
                f"generate() got unknown arguments {sorted(unused)}; check the spelling (generation settings are "
                "the fields of transformers.GenerationConfig)."
            )
        generation_config.validate()
        if generation_config.return_dict_in_generate:
            for name in ("output_hidden_states", "output_attentions"):
                if getattr(generation_config, name, False) or model_kwargs.get(name):
                    raise ValueError(
                        f"{name}=True with return_dict_in_generate=True is not supported: a token model returns its "
                        "states per generated token, but a SentenceLM's backbone runs once per sentence (over sentence "
                        f"slots) and its decoder once per token, so there is no per-token tuple to return. Drop {name} "
                        f"and run `model(output.sequences, {name}=True)` on the generated text: the backbone's "
                        + ("states over sentence slots, with `slot_mask` telling real slots from padding."
                           if name == "output_hidden_states" else "attention maps over sentence slots (eager attention).")
                    )
        user_criteria = _check_stopping_criteria(stopping_criteria)
        if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
            raise TypeError(
                "prefix_allowed_tokens_fn must be a callable (batch_id, input_ids) -> list of allowed token ids, got "
                f"{type(prefix_allowed_tokens_fn).__name__}."
            )
        if use_cache is None:
            # As transformers' generate(): the generation config decides, not `config.use_cache`
            # (which training sets to False, and which checkpoints saved by the Trainer keep).
            use_cache = generation_config.use_cache if generation_config.use_cache is not None else True
        if generation_config.cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by sentence-level "
                "generation; use 'dynamic' (the default) or 'static' (the backbone's cache preallocated)."
            )
        static = generation_config.cache_implementation == "static"
        runtime = self._pick_runtime(use_cache, static, generation_config)
        self._check_drafting(draft_tokens, runtime)
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
        if self.config.max_position_embeddings is not None:
            max_new = min(max_new, self.config.max_position_embeddings * self.config.sentence_vae.max_sentence_len)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else self.config.pad_token_id
        # The library builds the processors and criteria from a copy of the config: the length
        # limits and min_new_tokens are the loop's own (the stop head ends a text, not an
        # end-of-text token), and the end-of-sentence id stands for "eos" (bad_words_ids may not ban it).
        library_config = copy.copy(generation_config)
        library_config.min_length, library_config.min_new_tokens, library_config.max_length = 0, None, None
        library_config._eos_token_tensor = torch.tensor([self.config.sentence_vae.eos_token_id], device=device)
        processors = self._get_logits_processor(
            generation_config=library_config,
            input_ids_seq_length=prompt_len,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            logits_processor=logits_processor,
            device=device,
        )
        processors = _CheckedProcessors(processors, self.config.vocab_size) if len(processors) else None
        library_config._eos_token_tensor = None  # no end-of-text criterion
        criteria = self._get_stopping_criteria(
            library_config, user_criteria, tokenizer=tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        )
        criteria = _CheckedCriteria(criteria) if len(criteria) else None
        output_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
        output_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)
        loop_arguments = dict(
            stopping_criteria=criteria, output_scores=output_scores, output_logits=output_logits, pad_token_id=pad
        )
        common = (input_ids, mask, max_new, min_new, generation_config.do_sample, processors)
        if runtime == "lockstep":
            outputs = self._generate_sentences(*common, use_cache, streamer, **loop_arguments)
        else:
            compile_config = None
            if runtime == "compiled":
                compile_config = generation_config.compile_config or CompileConfig()
            outputs = generate_rows(
                self,
                *common,
                streamer,
                static=static,
                compile_config=compile_config,
                draft_tokens=draft_tokens,
                **loop_arguments,
            )
        # A text the stop head ended gets its EOS, as a token model's does.
        ended = outputs.with_text_ends(self.config.eos_token_id, pad, max_new)
        if streamer is not None:
            if bool((ended.new_tokens[0] >= 0).sum() > (outputs.new_tokens[0] >= 0).sum()):
                streamer.put(torch.tensor([self.config.eos_token_id]))
            streamer.end()
        outputs = ended
        sequences = torch.cat([input_ids, torch.where(outputs.new_tokens < 0, pad, outputs.new_tokens)], dim=1)
        if generation_config.return_dict_in_generate:
            return SentenceGenerateOutput(
                sequences=sequences,
                scores=tuple(outputs.scores.unbind(1)) if outputs.scores is not None else None,
                logits=tuple(outputs.logits.unbind(1)) if outputs.logits is not None else None,
                cache=outputs.cache,
                num_sentences=outputs.num_sentences,
                decoder_cache=outputs.decoder_cache,
                decoder_passes=outputs.decoder_passes,
            )
        return sequences

    def _check_drafting(self, draft_tokens, runtime: str) -> None:
        """Refuse a ``draft_tokens`` setting that cannot run: not an integer >= 0, a SentenceVAE
        with a context window, a model without a draft head, or the reference loop (no cache, or a
        backbone attention other than eager and sdpa)."""
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
            raise ValueError(
                f"draft_tokens must be an integer >= 0 (the tokens the draft head proposes per decoder pass; 0 turns "
                f"drafting off), got {draft_tokens!r}."
            )
        if not draft_tokens:
            return
        if self.config.sentence_vae.context_window:
            raise ValueError(
                "draft_tokens does not run with a context window yet (this SentenceVAE's context_window is "
                f"{self.config.sentence_vae.context_window}); generate with draft_tokens=0."
            )
        if self.sentence_vae.parallel_readout is None:
            raise ValueError(
                "draft_tokens needs a draft head, and this model's SentenceVAE has none (its parallel_readout_weight "
                "is 0). Train one on the model with sentence_lm.training_draft_head.train_draft_head (or "
                "examples/train_draft_head.py), or generate with draft_tokens=0."
            )
        if runtime == "lockstep":
            raise ValueError(
                "draft_tokens needs the cached row-scheduled runtime: use_cache=True and a backbone running eager or "
                f"sdpa attention (this one runs {self.model.attention_implementation!r}; "
                "model.set_attn_implementation('sdpa') switches it), or generate with draft_tokens=0."
            )

    def _pick_runtime(self, use_cache: bool, static: bool, generation_config: GenerationConfig) -> str:
        """Which loop runs: ``"rows"`` (rows scheduled independently, :func:`generate_rows`; the
        default), ``"compiled"`` (the same with static shapes, compiled: a static cache where
        `transformers` would compile a token model's, on CUDA or with
        ``compile_config._compile_all_devices``, unless ``disable_compile``), or ``"lockstep"``
        (the reference loop: without a cache, or a backbone attention that takes no per-row mask).
        A SentenceVAE with a ``context_window`` runs the eager row-scheduled runtime, not the static one."""
        attention = self.model.attention_implementation
        window = self.config.sentence_vae.context_window
        if static and (not use_cache or attention not in ROW_ATTENTION or window):
            raise ValueError(
                "cache_implementation='static' needs use_cache=True, a backbone running eager or sdpa attention "
                f"(this one runs {attention!r}; model.set_attn_implementation('sdpa') switches it) and no "
                f"context window (this SentenceVAE's context_window is {window}); drop the setting."
            )
        if not use_cache or attention not in ROW_ATTENTION:
            return "lockstep"
        compile_config = generation_config.compile_config
        can_compile = self.device.type == "cuda" or bool(
            compile_config is not None and compile_config._compile_all_devices
        )
        if static and can_compile and not generation_config.disable_compile:
            return "compiled"
        return "rows"

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
        pad_token_id: int,
        stopping_criteria=None,
        output_scores: bool = False,
        output_logits: bool = False,
    ) -> tuple:
        """The next-sentence loop, returning a `DecodingResult` (its ``decoder_cache`` the last
        sentence's, no ``decoder_passes``). The reference loop, which the row-scheduled runtime (:func:`generate_rows`)
        is tested against; `generate()` runs it without a cache or for a backbone attention that
        takes no per-row mask.

        Every round decodes all ``batch`` rows at once (finished rows with a budget of 0, so that
        they cost nothing), so that processors and criteria see the whole batch in order; their
        ``input_ids`` are each row's prompt and new tokens, left-padded to one width."""
        pad = pad_token_id
        batch, device = input_ids.shape[0], input_ids.device
        vae, model = self.sentence_vae, self.model
        # An unfinished last sentence becomes the decoder's prefix; the rest feeds the backbone.
        prompt = model.prompt_slots(input_ids, mask)
        inputs, slot_mask, is_open = prompt.inputs, prompt.slot_mask, prompt.is_open
        prefix_ids, prefix_mask = left_align(input_ids, prompt.in_prefix, self.config.pad_token_id)
        prefix_in_text, window = prompt.in_prefix, vae.config.context_window
        cache = model.new_cache() if use_cache else None
        all_inputs = inputs
        state = model.run_backbone(inputs, slot_mask, cache).last_hidden_state[:, -1]

        # New tokens go to `written`; a last column takes the padding of each decoded block.
        written = torch.full((batch, max_new + 1), -1, dtype=torch.long, device=device)
        count = torch.zeros(batch, dtype=torch.long, device=device)
        sentences_written = torch.zeros(batch, dtype=torch.long, device=device)
        done = count >= max_new
        stopped = torch.zeros_like(done)
        may_stop = ~is_open & ~prompt.ends_turn
        slots_used = slot_mask.sum(dim=1)
        decoder_cache = None
        need_history = processors is not None or stopping_criteria is not None
        chunks = []  # (columns, scores, logits) of each round, when asked for
        while not bool(done.all()):
            # The stop head may end a text only between sentences and after min_new_tokens.
            stop = stop_decision(self.stop_head(state), do_sample, may_stop & ~done & (count >= min_new))
            stopped |= stop
            done |= stop
            may_stop[:] = True
            if bool(done.all()):
                break
            # All rows go to the decoder (the finished ones with no budget), in batch order.
            writing = ~done
            has_prefix = prefix_ids.shape[1] > 0
            history = running_text(input_ids, written, count, pad) if need_history else None
            context = None
            if window:  # the text so far, the prefix (which the decoder continues) left out
                so_far = written[:, : int(count.max())]
                text = torch.cat([input_ids, so_far.clamp(min=0)], dim=1)
                real = torch.cat([mask & ~(prefix_in_text & is_open[:, None]), so_far >= 0], dim=1)
                rows = torch.arange(batch, device=device)
                context = context_before(text, real, rows, torch.full_like(rows, text.shape[1]), window)
            out = vae.decode(
                state,
                prefix_ids=prefix_ids if has_prefix else None,
                prefix_mask=prefix_mask & writing[:, None] if has_prefix else None,
                max_new_tokens=torch.where(writing, max_new - count, 0),
                do_sample=do_sample,
                logits_processor=processors,
                use_cache=use_cache,
                history=history,
                stopping_criteria=stopping_criteria,
                output_scores=output_scores,
                output_logits=output_logits,
                context=context,
            )
            decoder_cache = out.cache
            width = out.sequences.shape[1]
            steps = torch.arange(width, device=device)
            keep = steps < out.lengths[:, None]
            columns = torch.where(keep, count[:, None] + steps, max_new)
            written.scatter_(1, columns, out.sequences)  # the last column takes the block's padding
            if output_scores or output_logits:
                chunks.append((columns, out.scores, out.logits))
            if streamer is not None and out.sequences.numel():
                streamer.put(out.sequences[0, : int(out.lengths[0])].cpu())
            count += out.lengths
            # The whole sentence (prefix included) is encoded and appended to the backbone.
            if has_prefix:
                sentence, sentence_mask = _join_right(prefix_ids, prefix_mask, out.sequences, keep)
            else:
                sentence, sentence_mask = out.sequences, keep
            sentence_len = sentence_mask.sum(dim=1)
            empty = (sentence_len == 0) | ~writing
            sentences_written += (~empty).long()
            done |= empty | out.stopped  # a stopping criterion ends the text
            slots_used += writing.long()
            done |= count >= max_new
            if self.config.max_position_embeddings is not None:
                done |= slots_used >= self.config.max_position_embeddings
            is_open[:] = False
            prefix_ids, prefix_mask = prefix_ids[:, :0], prefix_mask[:, :0]
            if bool(done.all()):
                break
            step = torch.zeros(batch, 1, self.config.hidden_size, dtype=inputs.dtype, device=device)
            filled = torch.nonzero(~empty).squeeze(1)
            sentence, sentence_mask, sentence_len = sentence[filled], sentence_mask[filled], sentence_len[filled]
            if filled.numel():
                sentence_width = int(sentence_len.max())
                step[filled, 0] = vae.encode_as_given(
                    sentence[:, :sentence_width], sentence_mask[:, :sentence_width]
                ).to(inputs.dtype)
            slot_mask = torch.cat([slot_mask, torch.ones_like(slot_mask[:, :1])], dim=1)
            if use_cache:
                state = model.run_backbone(step, slot_mask, cache).last_hidden_state[:, -1]
            else:
                all_inputs = torch.cat([all_inputs, step], dim=1)
                state = model.run_backbone(all_inputs, slot_mask).last_hidden_state[:, -1]
        width = int(count.max()) if batch else 0
        new_tokens = written[:, :width]
        scores = logits = None
        if output_scores or output_logits:
            vocab = self.config.vocab_size
            # A column a row did not write: -inf but 0 at the pad it holds there (argmax = pad).
            # Sized by the columns written, not by the budget (which may be far larger).
            scores = blank_token_scores(batch, width, vocab, pad, device) if output_scores else None
            logits = blank_token_scores(batch, width, vocab, pad, device) if output_logits else None
            for columns, round_scores, round_logits in chunks:
                kept = columns < width  # the others are the padding of the round's block
                index = (torch.nonzero(kept, as_tuple=True)[0], columns[kept])
                if scores is not None:
                    scores.index_put_(index, round_scores[kept])
                if logits is not None:
                    logits.index_put_(index, round_logits[kept])
        return DecodingResult(new_tokens, cache, sentences_written, stopped, decoder_cache, scores, logits)



_BEAMS = "use greedy decoding (the default) or do_sample=True, with num_return_sequences for several samples"
_ASSISTED = "generate without an assistant: the model writes whole sentences per step already"
_END = "the stop head ends a text; use max_new_tokens (an exact budget) or stopping_criteria to bound it"
_UNSUPPORTED = [
    # (setting, is it asking for something, what it is, what to use instead)
    ("num_beams", lambda v: v is not None and v > 1, "beam search", _BEAMS),
    ("num_beam_groups", lambda v: v is not None and v > 1, "group beam search", _BEAMS),
    ("diversity_penalty", lambda v: v is not None and v != 0, "group beam search", _BEAMS),
    ("constraints", lambda v: v is not None, "constrained beam search", "use prefix_allowed_tokens_fn or bad_words_ids"),
    ("force_words_ids", lambda v: v is not None, "constrained beam search", "use prefix_allowed_tokens_fn or bad_words_ids"),
    ("penalty_alpha", lambda v: v is not None and v > 0, "contrastive search", "use greedy decoding, no_repeat_ngram_size or repetition_penalty"),
    ("low_memory", lambda v: bool(v), "a contrastive-search option", "leave it unset"),
    ("dola_layers", lambda v: v is not None, "DoLa decoding (contrasting token layers)", "use greedy decoding or sampling"),
    ("guidance_scale", lambda v: v is not None and v != 1, "classifier-free guidance", "use logits_processor with your own processor"),
    ("prompt_lookup_num_tokens", lambda v: v is not None, "prompt-lookup (assisted) decoding", _ASSISTED),
    ("assistant_early_exit", lambda v: v is not None, "self-speculative (assisted) decoding", _ASSISTED),
    ("use_mtp", lambda v: bool(v), "multi-token-prediction (speculative) decoding", _ASSISTED),
    ("speculation_type", lambda v: v is not None, "speculative decoding", _ASSISTED),
    ("watermarking_config", lambda v: v is not None, "watermarking", "generate without it (no watermark can be applied here)"),
    ("exponential_decay_length_penalty", lambda v: v is not None, "an end-of-text length penalty", _END),
    ("forced_eos_token_id", lambda v: v is not None, "forcing an end-of-text token", _END),
    ("token_healing", lambda v: bool(v), "token healing", "pass the prompt as it is"),
    ("prefill_chunk_size", lambda v: v is not None, "chunked prefill", "leave it unset (the prompt's sentences are encoded in bounded chunks already)"),
    ("encoder_repetition_penalty", lambda v: v is not None and v != 1, "an encoder-decoder setting", "use repetition_penalty"),
    ("encoder_no_repeat_ngram_size", lambda v: v is not None and v > 0, "an encoder-decoder setting", "use no_repeat_ngram_size"),
]
"""`GenerationConfig` settings that next-sentence decoding cannot honour."""
_UNSUPPORTED_ARGUMENTS = {
    "assistant_model": ("assisted decoding", _ASSISTED),
    "assistant_tokenizer": ("assisted decoding", _ASSISTED),
    "negative_prompt_ids": ("classifier-free guidance", "use logits_processor with your own processor"),
    "negative_prompt_attention_mask": ("classifier-free guidance", "use logits_processor with your own processor"),
    "synced_gpus": ("synchronised multi-GPU generation", "call generate() on each process without it"),
    "custom_generate": ("a custom decoding loop", "call that loop yourself; this model's generate() is its own"),
}


def _refuse_unsupported(config: GenerationConfig, arguments: dict) -> None:
    """Raise a ValueError naming the first setting or argument of ``generate()`` that
    next-sentence decoding cannot honour (never ignore it silently)."""
    for name, asks, what, instead in _UNSUPPORTED:
        value = getattr(config, name, None)
        if asks(value):
            raise ValueError(
                f"{name}={value!r} ({what}) is not supported by sentence-level generation, which writes one "
                f"sentence per step with the Sentence Decoder; {instead}."
            )
    for name, value in arguments.items():
        if value is not None and value is not False:
            what, instead = _UNSUPPORTED_ARGUMENTS[name]
            raise ValueError(
                f"{name} ({what}) is not supported by sentence-level generation, which writes one sentence per "
                f"step with the Sentence Decoder; {instead}."
            )


def _check_stopping_criteria(criteria) -> StoppingCriteriaList:
    """``stopping_criteria`` as a `StoppingCriteriaList`, every entry a `StoppingCriteria` or a
    callable taking ``(input_ids, scores)``; anything else raises a TypeError naming the fix."""
    if criteria is None:
        return StoppingCriteriaList()
    if isinstance(criteria, StoppingCriteria) or (callable(criteria) and not isinstance(criteria, list)):
        criteria = [criteria]
    if not isinstance(criteria, (list, tuple)):
        raise TypeError(
            "stopping_criteria must be a StoppingCriteriaList (or a list) of StoppingCriteria, got "
            f"{type(criteria).__name__}."
        )
    for entry in criteria:
        if isinstance(entry, StoppingCriteria):
            continue
        fix = (
            "pass a transformers.StoppingCriteria (a subclass whose __call__(input_ids, scores, **kwargs) returns a "
            "(batch,) bool tensor), or a callable with that signature"
        )
        if not callable(entry):
            raise TypeError(f"stopping_criteria holds {entry!r} ({type(entry).__name__}), which is not a StoppingCriteria; {fix}.")
        try:
            inspect.signature(entry).bind(None, None)
        except TypeError:
            raise TypeError(
                f"stopping_criteria holds {entry!r}, which cannot be called as (input_ids, scores); {fix}."
            ) from None
        except ValueError:  # no signature to inspect (a builtin): let it run
            pass
    return StoppingCriteriaList(criteria)


class _CheckedProcessors:
    """Runs logits processors one by one, checking that each returns ``(rows, vocab)`` scores."""

    def __init__(self, processors: LogitsProcessorList, vocab_size: int):
        self.processors, self.vocab_size = processors, vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self.processors:
            out = processor(input_ids, scores)
            if not isinstance(out, torch.Tensor) or out.shape != scores.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"The logits processor {type(processor).__name__} returned {got}; a logits processor must return "
                    f"the scores it was given, changed, as one float tensor of shape (batch, vocab) = "
                    f"{tuple(scores.shape)}."
                )
            scores = out
        return scores


class _CheckedCriteria:
    """Runs stopping criteria on the running text, checking each answer: a bool (for every row)
    or a ``(rows,)`` bool tensor."""

    def __init__(self, criteria: StoppingCriteriaList):
        self.criteria = criteria

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        halt = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        for criterion in self.criteria:
            answer = criterion(input_ids, scores)
            if isinstance(answer, bool):
                answer = torch.full((rows,), answer, device=input_ids.device)
            if not isinstance(answer, torch.Tensor) or answer.shape not in ((rows,), ()) or answer.is_floating_point():
                got = tuple(answer.shape) if isinstance(answer, torch.Tensor) else repr(answer)
                raise ValueError(
                    f"The stopping criterion {type(criterion).__name__} returned {got}; a StoppingCriteria must return "
                    f"a bool tensor of shape (batch,) = ({rows},), True where a row must stop."
                )
            halt |= answer.to(device=input_ids.device, dtype=torch.bool).expand(rows)
        return halt


_INTEGER_SETTINGS = {
    "max_new_tokens": 1,
    "min_new_tokens": 0,
    "max_length": 0,
    "min_length": 0,
    "num_return_sequences": 1,
    "top_k": 0,
}
"""Integer generation settings and their smallest valid value."""


def _check_generation_settings(config: GenerationConfig, overrides: dict | None = None) -> None:
    """Refuse generation settings of the wrong type or range with an error that names the
    setting, before the library merges them (which could fail with a raw ``TypeError``) and
    `GenerationConfig.validate` (whose messages are vaguer, and which lets some through): length
    and count settings that are not integers or are too small (``max_new_tokens < 1``,
    ``min_new_tokens``, ``max_length``, ``min_length``, ``top_k``), ``temperature <= 0`` when
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


def _join_right(
    prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, new_ids: torch.Tensor, new_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each row's left-padded prefix with its right-padded new tokens into one
    right-padded sentence (the layout the encoder takes)."""
    ids = torch.cat([prefix_ids, new_ids], dim=1)
    mask = torch.cat([prefix_mask, new_mask], dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order), mask.gather(1, order)
