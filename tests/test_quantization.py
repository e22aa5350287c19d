"""Weight-only int8 quantization (`sentence_lm/quantization.py`), the `transformers` way: a float
checkpoint loaded with ``quantization_config=Int8WeightOnlyConfig()`` runs on int8 linear layers
(the tied output layer included), close to the float model; ``save_pretrained`` writes int8
weights that ``from_pretrained`` loads as they are; generation and drafting run on it."""

import json

import pytest
import torch
from helpers import encode
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from sentence_lm import SentenceLMForCausalLM
from sentence_lm.quantization import Int8Linear, Int8WeightOnlyConfig

PROMPTS = ["The king had three sons. The youngest", "Once upon a time there was a"]


@pytest.fixture(scope="module")
def float_checkpoint(tokenizer, tmp_path_factory):
    from helpers import backbone_configs

    config = backbone_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = SentenceLMForCausalLM.from_pretrained_backbone(
        LlamaForCausalLM(config["llama"]),
        tokenizer=tokenizer,
        sentence_vae_config=dict(
            max_sentence_len=tokenizer.max_sentence_len, tie_word_embeddings=True, parallel_readout_weight=0.5
        ),
    ).eval()
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([3.0, -3.0]))
    path = tmp_path_factory.mktemp("float") / "model"
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("rows", [1, 4, 7])
@pytest.mark.parametrize("width", [32, 40])
def test_int8_linear_is_close_to_the_float_layer(rows, width):
    """Both products (the CPU int8 kernel for widths it takes, dequantized weights otherwise),
    contiguous input or not, within int8 rounding of the float layer; each output row is the
    same whatever the other rows (so a row's greedy text depends neither on the batch nor on
    drafting)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 48)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (48,)
    for x in (torch.randn(rows, width), torch.randn(width, rows).T, torch.randn(2, rows, width)):
        expected = linear(x)
        got = layer(x)
        assert got.shape == expected.shape and got.dtype == x.dtype
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    x = torch.randn(rows, width)
    alone = torch.cat([layer(row[None]) for row in x])
    assert torch.equal(layer(x), alone) if width % 16 == 0 else torch.allclose(layer(x), alone, atol=1e-5)


def test_a_float_checkpoint_loads_quantized_and_saves_int8_weights(float_checkpoint, tokenizer, tmp_path):
    path, reference = float_checkpoint
    model, info = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=Int8WeightOnlyConfig(), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    linears = {n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert quantized == linears - {"stop_head"}
    vae = model.sentence_vae
    assert vae.lm_head.weight.dtype == torch.int8 and vae.embed_tokens.weight.dtype == torch.float32
    enc = encode(tokenizer, PROMPTS)
    expected, got = reference(**enc).logits, model(**enc).logits
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()

    model.save_pretrained(tmp_path / "int8")
    saved = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "sentence_lm_int8"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert isinstance(again.sentence_vae.lm_head, Int8Linear)
    torch.testing.assert_close(again(**enc).logits, got, atol=0, rtol=0)
    plain = again.generate(**enc, max_new_tokens=30, return_dict_in_generate=True)
    assert torch.equal(plain.sequences, model.generate(**enc, max_new_tokens=30))
    drafted = again.generate(**enc, max_new_tokens=30, return_dict_in_generate=True, draft_tokens=3)
    assert torch.equal(drafted.sequences, plain.sequences)


def test_modules_to_not_convert_stay_float_and_bad_settings_are_refused(float_checkpoint):
    path, _ = float_checkpoint
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=Int8WeightOnlyConfig(modules_to_not_convert=["model.sentence_vae.encoder"])
    )
    assert isinstance(model.sentence_vae.encoder.layers[0].ffn.fc1, torch.nn.Linear)
    assert isinstance(model.sentence_vae.decoder.layers[0].ffn.fc1, Int8Linear)
    with pytest.raises(ValueError, match="modules_to_not_convert must be a list"):
        Int8WeightOnlyConfig(modules_to_not_convert="lm_head")


REMOTE = """
import json
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)
assert type(model.sentence_vae.lm_head).__name__ == "Int8Linear", type(model.sentence_vae.lm_head)
enc = tokenizer({prompts!r}, padding=True, padding_side="left", return_tensors="pt")
enc.pop("sentence_ids")
print(json.dumps(model.generate(**enc, max_new_tokens=12).tolist()))
"""


@pytest.mark.slow
def test_an_int8_checkpoint_loads_with_remote_code_without_the_package(float_checkpoint, tokenizer, tmp_path):
    from helpers import check_run, run_without_package

    path, _ = float_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8WeightOnlyConfig())
    model.save_pretrained(tmp_path / "int8")
    tokenizer.save_pretrained(tmp_path / "int8")
    result = check_run(run_without_package(REMOTE.format(path=str(tmp_path / "int8"), prompts=PROMPTS), tmp_path))
    enc = encode(tokenizer, PROMPTS)
    enc.pop("sentence_ids")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == model.generate(**enc, max_new_tokens=12).tolist()


def test_the_same_quantization_loads_the_token_model(tmp_path):
    """The token model a SentenceLM is compared with takes the same config (its tied output layer
    included), so that speed is measured against it in kind."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    token = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=256, tie_word_embeddings=True)).eval()  # fmt: skip
    token.save_pretrained(tmp_path / "token")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "token", quantization_config=Int8WeightOnlyConfig())
    assert isinstance(quantized.lm_head, Int8Linear) and quantized.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 12))
    expected = token(ids).logits
    assert (quantized(ids).logits - expected).abs().max() <= 0.02 * expected.abs().max()


def test_quantized_nll_benchmark_scores_both_models_in_each_precision(float_checkpoint, tokenizer, tmp_path):
    from helpers import backbone_configs, load_script

    path, _ = float_checkpoint
    config = backbone_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config["llama"]).save_pretrained(tmp_path / "token")
    valid = tmp_path / "valid.txt"
    valid.write_text("The king had three sons. The youngest was a fool.\n\nOnce upon a time there was a miller.")
    script = load_script("benchmarks/quantized_nll.py")
    results = script.main(["--sentence_lm", str(path), "--token_model", str(tmp_path / "token"), "--validation_file",
                           str(valid), "--json", str(tmp_path / "out.json")])  # fmt: skip
    rows = {row["dtype"]: row for row in results["rows"]}
    assert list(rows) == ["fp32", "bf16", "int8"] and results["eval_tokens"] > 10
    assert rows["fp32"]["sentence_lm_change"] == 0 == rows["fp32"]["token_change"]
    for row in rows.values():  # random weights: the NLL is near log(vocab) and barely moves
        assert abs(row["sentence_lm_change"]) < 0.05 and abs(row["token_change"]) < 0.05
        assert row["token_nll"] == pytest.approx(row["token_change"] + rows["fp32"]["token_nll"])
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == results["rows"]
