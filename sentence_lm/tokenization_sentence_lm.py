"""A fast tokenizer that also says which sentence every token belongs to.

:class:`SentenceTokenizer` wraps the fast tokenizers of the common decoder-only model families:
byte-level BPE (GPT-2, OPT, Llama-3, Qwen2, SmolLM2: ``Ġ`` for a space) and SentencePiece-style
ones (Llama-2, Mistral, Gemma: ``▁`` for a space, byte-fallback tokens such as ``<0x0A>``). Calling
it returns the usual ``input_ids`` and ``attention_mask`` plus ``sentence_ids``: for every token
the index of its sentence within its text (``0, 0, 0, 1, 1, 2, ...``), ``-1`` for padding and for
the BOS the tokenizer prepends. Special tokens inside a text are tokens of its sentences, as a
SentenceLM reads them (:func:`.segmentation.sentence_tokens`): a chat template's role marker is
an ordinary token, and an EOS after text (``<|im_end|>``, the end of a turn) is the last token
of the sentence it closes. Sentences are found on the token ids (see :mod:`.segmentation`), so
concatenating a text's sentences gives back exactly its ids (but the leading BOS).

This module travels with saved checkpoints (``auto_map``) and is then imported by
``transformers`` as remote code on machines without ``sentence_lm``: it imports only
``transformers``, ``tokenizers``, ``torch`` and sibling modules, relatively.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import PaddingStrategy

from .segmentation import build_boundary_table, segment_sentences, sentence_tokens

OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
"""Special tokens of :func:`train_sentence_tokenizer`, in OPT's id order (0, 1, 2, 3)."""

SENTENCE_IDS_KEY = "sentence_ids"
"""Name of the extra key in the tokenizer's outputs."""

SENTENCE_PAD_ID = -1
"""Sentence index of padding and of the leading BOS."""


def _check_max_sentence_len(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"max_sentence_len must be a positive integer, got {value!r}.")
    return int(value)


class SentenceTokenizer(PreTrainedTokenizerFast):
    """Fast tokenizer (byte-level BPE or SentencePiece-style) whose outputs carry ``sentence_ids``.

    Args:
        max_sentence_len (`int`, defaults to 64): a sentence is cut after this many tokens. Saved
            in ``tokenizer_config.json``.
        return_sentence_ids (`bool`, defaults to `True`): default for the call-time keyword of the
            same name; ``False`` gives the plain outputs of the wrapped tokenizer (for example to
            feed a model whose ``forward`` does not take ``sentence_ids``).
        *args, **kwargs: as for :class:`~transformers.PreTrainedTokenizerFast`
            (``tokenizer_object``, ``tokenizer_file``, special tokens, ``padding_side``, ...).

    Calling the tokenizer accepts ``return_sentence_ids=`` to override the default per call.
    Use :meth:`from_tokenizer` to wrap an existing fast tokenizer (for example OPT's) and
    :func:`train_sentence_tokenizer` to train a small one.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, *args, max_sentence_len: int = 64, return_sentence_ids: bool = True, **kwargs):
        max_sentence_len = _check_max_sentence_len(max_sentence_len)
        super().__init__(
            *args, max_sentence_len=max_sentence_len, return_sentence_ids=bool(return_sentence_ids), **kwargs
        )
        # `save_pretrained` saves the keys of `init_kwargs` with their current values: list the
        # sides there, so that a side set after init (`tokenizer.padding_side = "left"`) is saved.
        for key in ("padding_side", "truncation_side"):
            self.init_kwargs.setdefault(key, getattr(self, key))
        self.max_sentence_len = max_sentence_len
        self.return_sentence_ids = bool(return_sentence_ids)
        self._boundary_table = None
        self._device_tables: dict[torch.device, torch.Tensor] = {}
        # The BOS/EOS layout lives in the backend's post-processor (saved in tokenizer.json), while
        # `add_bos_token`/`add_eos_token` are not saved: read them back from what the post-processor
        # does, so that setting one of them later rebuilds the template without losing the other.
        probe, plain = (
            [i for i, m in zip(e.ids, e.attention_mask) if m]
            for e in (self._tokenizer.encode("a", add_special_tokens=flag) for flag in (True, False))
        )
        if len(probe) > len(plain):
            object.__setattr__(self, "_add_bos_token", self.bos_token_id is not None and probe[0] == self.bos_token_id)
            object.__setattr__(
                self, "_add_eos_token", self.eos_token_id is not None and probe[-1] == self.eos_token_id
            )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # `TokenizersBackend` hands a subclass with its own `__init__` only the vocabulary and merges
        # of tokenizer.json unless remote code is trusted, and would then rebuild a bare BPE without
        # the byte-level pre-tokenizer and decoder. This class keeps the whole tokenizer.json.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)

    @classmethod
    def from_tokenizer(cls, tokenizer, max_sentence_len: int = 64, **kwargs) -> SentenceTokenizer:
        """Wrap an existing fast tokenizer, keeping its vocabulary, pre-/post-processing (the BOS
        it adds, or not) and special tokens: byte-level BPE (for example
        ``AutoTokenizer.from_pretrained("facebook/opt-125m")``) or SentencePiece-style (a
        ``LlamaTokenizerFast``, ``GemmaTokenizerFast``, or a ``PreTrainedTokenizerFast`` around a
        `tokenizers` Metaspace / byte-fallback tokenizer).

        A sentence model ends every sentence with the EOS token and pads batches of sentences:
        a tokenizer without a padding token (GPT-2, Llama-2, Mistral) pads with its EOS token.

        Args:
            tokenizer: a fast (``tokenizers``-backed) ``transformers`` tokenizer. It is copied, not
                modified.
            max_sentence_len: a sentence is cut after this many tokens.
            **kwargs: further init keywords, overriding those taken from ``tokenizer`` (for
                example ``pad_token="<unk>"``, or ``eos_token=`` for a tokenizer without one).

        Raises:
            TypeError: ``tokenizer`` is not a fast tokenizer.
            ValueError: neither ``tokenizer`` nor ``kwargs`` give an EOS token.
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"SentenceTokenizer.from_tokenizer needs a fast tokenizer backed by `tokenizers`, got "
                f"{type(tokenizer).__name__}."
            )
        init = {key: value for key, value in tokenizer._special_tokens_map.items() if value is not None}
        extra = list(getattr(tokenizer, "_extra_special_tokens", []) or [])
        if extra:
            init["extra_special_tokens"] = extra
        init.update(
            name_or_path=tokenizer.name_or_path,
            padding_side=tokenizer.padding_side,
            truncation_side=tokenizer.truncation_side,
            model_max_length=tokenizer.model_max_length,
            clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
            add_prefix_space=getattr(tokenizer, "add_prefix_space", False),
        )
        if getattr(tokenizer, "chat_template", None) is not None:
            init["chat_template"] = tokenizer.chat_template
        init.update(kwargs)
        if init.get("eos_token") is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no EOS token, which a sentence model writes at the end of "
                "every sentence; name one, e.g. SentenceTokenizer.from_tokenizer(tokenizer, eos_token=\"</s>\") "
                "(a new token is added to the vocabulary: then resize the model's embeddings)."
            )
        if init.get("pad_token") is None:
            init["pad_token"] = init["eos_token"]
        return cls(tokenizer_object=backend, max_sentence_len=max_sentence_len, **init)

    # ------------------------------------------------------------------ segmentation

    @property
    def boundary_table(self) -> torch.Tensor:
        """``uint8`` flags per vocabulary id (see :func:`.segmentation.build_boundary_table`),
        built on first use and rebuilt only if tokens are added to the vocabulary."""
        table = self.__dict__.get("_boundary_table")
        if table is None or table.numel() != len(self):
            table = build_boundary_table(self)
            self._boundary_table = table
            self._device_tables = {}
        return table

    @property
    def special_token_ids(self) -> set[int]:
        """The named special tokens (BOS, EOS, padding, ...) and every added token marked special
        (such as OPT's unused ``<s>``): the ids that a SentenceVAE's corpus of sentences leaves
        out (:mod:`.data`)."""
        ids = set(self.all_special_ids)
        ids.update(index for index, token in self.added_tokens_decoder.items() if token.special)
        return ids

    def _table_on(self, device: torch.device) -> torch.Tensor:
        table = self.boundary_table
        if device not in self._device_tables:
            self._device_tables[device] = table.to(device)
        return self._device_tables[device]

    def segment(self, input_ids, attention_mask=None, max_sentence_len: int | None = None) -> torch.Tensor:
        """Sentence index of every token of ``input_ids``, as a SentenceLM reads the text.

        Args:
            input_ids: ``(batch, seq_len)`` or ``(seq_len,)`` token ids (tensor or nested lists).
            attention_mask: ``1`` for real tokens, ``0`` for padding on either side; optional.
            max_sentence_len: overrides :attr:`max_sentence_len`.

        Returns:
            A ``torch.long`` tensor shaped like ``input_ids`` (on its device): ``0, 0, 1, ...`` per
            text, ``-1`` for padding and each text's leading BOS. An EOS after text ends a turn:
            it gets the index of the sentence it closes (beyond that sentence's
            ``max_sentence_len`` tokens), and the next token starts a new sentence. Every other
            token, special or not, belongs to a sentence (see
            :func:`.segmentation.sentence_tokens`).

        Raises:
            ValueError: for ids outside the vocabulary, or shapes that do not match.
        """
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids, dtype=torch.long)
        max_len = self.max_sentence_len if max_sentence_len is None else _check_max_sentence_len(max_sentence_len)
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = attention_mask if isinstance(attention_mask, torch.Tensor) else torch.as_tensor(attention_mask)
            mask = mask.to(ids.device)
            if mask.shape != ids.shape:
                # Let segment_sentences report the shape mismatch.
                return segment_sentences(ids, self._table_on(ids.device), max_len, attention_mask=mask)
        squeeze = ids.dim() == 1
        rows, row_mask = (ids[None], mask[None]) if squeeze else (ids, mask)
        if rows.dim() != 2 or not rows.numel():
            return segment_sentences(ids, self._table_on(ids.device), max_len, attention_mask=mask)
        content, turn_ends = sentence_tokens(rows, row_mask, self.bos_token_id, self.eos_token_id)
        sentence_ids = segment_sentences(
            rows, self._table_on(ids.device), max_len, attention_mask=content, breaks=turn_ends
        )
        sentence_ids = torch.where(turn_ends, sentence_ids.cummax(dim=1).values, sentence_ids)
        return sentence_ids[0] if squeeze else sentence_ids

    def _sentence_ids_like(self, input_ids, attention_mask):
        """``sentence_ids`` in the same container type as ``input_ids`` (tensor, array, lists)."""
        if isinstance(input_ids, torch.Tensor):
            return self.segment(input_ids, attention_mask)
        if isinstance(input_ids, np.ndarray):
            mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask))
            return self.segment(torch.from_numpy(input_ids).long(), mask).numpy()
        if len(input_ids) == 0 or not isinstance(input_ids[0], (list, tuple)):
            # One text, unbatched.
            if len(input_ids) == 0:
                return []
            mask = None if attention_mask is None else [list(attention_mask)]
            return self.segment(torch.tensor([list(input_ids)]), mask)[0].tolist()
        # A batch of lists, possibly of different lengths: pad them together, segment once.
        lengths = [len(row) for row in input_ids]
        width = max(lengths)
        if width == 0:
            return [[] for _ in input_ids]
        ids = torch.zeros(len(input_ids), width, dtype=torch.long)
        mask = torch.zeros(len(input_ids), width, dtype=torch.bool)
        for i, row in enumerate(input_ids):
            if row:
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                if attention_mask is None:
                    mask[i, : len(row)] = True
                else:
                    mask[i, : len(row)] = torch.tensor(attention_mask[i], dtype=torch.bool)
        sentence_ids = self.segment(ids, mask).tolist()
        return [row[:n] for row, n in zip(sentence_ids, lengths)]

    # ------------------------------------------------------------------ encoding and padding

    def _encode_plus(self, text, text_pair=None, *args, return_sentence_ids: bool | None = None, **kwargs):
        encoding = super()._encode_plus(text, text_pair, *args, **kwargs)
        if return_sentence_ids is None:
            return_sentence_ids = self.return_sentence_ids
        if return_sentence_ids and "input_ids" in encoding:
            encoding[SENTENCE_IDS_KEY] = self._sentence_ids_like(
                encoding["input_ids"], encoding.get("attention_mask")
            )
        return encoding

    def _pad(
        self,
        encoded_inputs,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """Pad like the base class, and ``sentence_ids`` (when present) with ``-1`` on the same side."""
        sentence_ids = encoded_inputs.get(SENTENCE_IDS_KEY)
        outputs = super()._pad(
            encoded_inputs,
            max_length=max_length,
            padding_strategy=padding_strategy,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        if sentence_ids is not None:
            sentence_ids = list(sentence_ids)
            difference = len(outputs[self.model_input_names[0]]) - len(sentence_ids)
            if difference > 0:
                side = padding_side if padding_side is not None else self.padding_side
                filler = [SENTENCE_PAD_ID] * difference
                sentence_ids = sentence_ids + filler if side == "right" else filler + sentence_ids
            outputs[SENTENCE_IDS_KEY] = sentence_ids
        return outputs


def train_sentence_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, max_sentence_len: int = 64
) -> SentenceTokenizer:
    """Train a small byte-level BPE tokenizer laid out like OPT's, in seconds.

    Special tokens get OPT's ids: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, with
    ``bos_token = eos_token = "</s>"``. Like OPT's tokenizer it prepends ``</s>`` to every text
    (``add_special_tokens=True``), so models see the same layout as with the real OPT tokenizer.

    Args:
        texts: the training texts (an iterable of strings, not one string).
        vocab_size: total vocabulary size, including the 256 byte tokens and 4 special tokens.
        max_sentence_len: saved in the tokenizer; a sentence is cut after this many tokens.

    Returns:
        A :class:`SentenceTokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string; wrap it in a list.")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(OPT_SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be an integer of at least {minimum} (bytes + special tokens), got {vocab_size!r}."
        )
    max_sentence_len = _check_max_sentence_len(max_sentence_len)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(OPT_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    texts = texts if isinstance(texts, Sequence) else list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__}.")
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = "</s>"
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return SentenceTokenizer(
        tokenizer_object=backend,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        max_sentence_len=max_sentence_len,
    )


SentenceTokenizer.register_for_auto_class("AutoTokenizer")

if not __name__.startswith("transformers_modules"):
    # Imported as part of the installed package (not as a checkpoint's remote code, which must not
    # register itself for checkpoints that did not ask for it): let `AutoTokenizer.from_pretrained`
    # resolve "SentenceTokenizer" in tokenizer_config.json, and the package's model types, without
    # remote code. The config modules are imported by name so that `save_pretrained` does not copy
    # them next to the tokenizer (it copies the files of `from .x import` lines only).
    for _module, _config in (
        (".configuration_sentence_vae", "SentenceVAEConfig"),
        (".configuration_sentence_opt", "SentenceOPTConfig"),
    ):
        _config_class = getattr(importlib.import_module(_module, __package__), _config)
        AutoTokenizer.register(_config_class, tokenizer_class=SentenceTokenizer, exist_ok=True)
