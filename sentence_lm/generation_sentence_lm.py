"""Next-sentence generation: the `generate()` of SentenceLM models, as a mixin over
`transformers`' `GenerationMixin` (whose config merging, validation and logits processors it
reuses). Each step the stop head decides whether a text ends, the Sentence Decoder writes the
next sentence, and the sentence is encoded and appended to the backbone's cache."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
from transformers import Cache, GenerationConfig, GenerationMixin, LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .modeling_sentence_vae import SentenceVAEModel, pick_next_token
from .segmentation import pack_sentences
from .validation import check_attention_mask, check_token_ids

CONTINUE, STOP = 0, 1
"""The stop head's two classes: the text goes on with another sentence, or ends here."""
logger = logging.get_logger(__name__)


@dataclass
class SentenceGenerateOutput(GenerateDecoderOnlyOutput):
    """Output of [`SentenceGenerationMixin.generate`] with ``return_dict_in_generate=True``: a
    `GenerateDecoderOnlyOutput` (``sequences``; ``cache``: the backbone's key/value cache over
    sentence slots at the end of generation, as a token model returns its cache over tokens)
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


class SentenceGenerationMixin(GenerationMixin):
    """`generate()` for models that write one sentence per backbone step. The model provides
    ``self.model`` (a `SentenceLMModel`: ``content_mask``, ``slot_inputs``, ``new_cache``,
    ``run_backbone``), ``self.stop_head`` and ``self.sentence_vae``."""

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
        ``num_return_sequences``, ``pad_token_id``, ``return_dict_in_generate``,
        ``cache_implementation``: ``"dynamic"`` by default, or ``"static"`` for a backbone cache
        preallocated over every sentence slot the call can fill), a
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
        if generation_config.cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by sentence-level "
                "generation; use 'dynamic' (the default) or 'static' (the backbone's cache preallocated)."
            )
        static_cache = use_cache and generation_config.cache_implementation == "static"
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
        processors = self._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=prompt_len,
            logits_processor=logits_processor,
            device=device,
        )
        new_tokens, cache, num_sentences, decoder_cache = self._generate_sentences(
            input_ids, mask, max_new, min_new, generation_config.do_sample, processors, use_cache, static_cache, streamer
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
        static_cache: bool,
        streamer,
    ) -> tuple[torch.Tensor, Cache | None, torch.Tensor, object | None]:
        """The next-sentence loop; returns ``(batch, written)`` new tokens (``-1`` where none),
        the backbone's cache, the number of sentences written per row and the last decoder cache.
        With ``static_cache`` the backbone's cache holds every slot the loop can fill from the start
        (each sentence has at least one token, so ``max_new`` sentences at most)."""
        batch, device = input_ids.shape[0], input_ids.device
        vae, model = self.sentence_vae, self.model
        content = model.content_mask(input_ids, mask)
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
        inputs, slot_mask = model.slot_inputs(vectors, packed)
        cache = None
        if use_cache:
            slots = slot_mask.shape[1] + max_new
            if self.config.max_position_embeddings is not None:
                slots = min(slots, max(self.config.max_position_embeddings, slot_mask.shape[1]))
            cache = model.new_cache(max_slots=slots if static_cache else None)
        all_inputs = inputs
        state = model.run_backbone(inputs, slot_mask, cache).last_hidden_state[:, -1]

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
            stop = pick_next_token(stop_logits, do_sample) == STOP
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
            done |= count >= max_new
            if self.config.max_position_embeddings is not None:
                done |= slots_used >= self.config.max_position_embeddings
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
                state = model.run_backbone(step, slot_mask, cache).last_hidden_state[:, -1]
            else:
                all_inputs = torch.cat([all_inputs, step], dim=1)
                state = model.run_backbone(all_inputs, slot_mask).last_hidden_state[:, -1]
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
