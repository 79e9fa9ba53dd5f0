"""The shipped recipes: each parses, says what it is, and quantizes a tiny model that then loads."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.config import LoadOptions
from moe_local.convert.writer import quantize_checkpoint
from moe_local.loading.loader import load
from moe_local.quant.embedding import QuantEmbedding
from moe_local.quant.schemes import bits_per_weight
from moe_local.recipes import RECIPE_DIR, load_recipe

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
LADDER = ("q8", "q6", "q5", "q4", "q3", "q2")


def test_the_ladder_is_shipped():
    assert set(LADDER) <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_describes_itself_and_plans(name, tiny_mixtral, tmp_path):
    recipe = load_recipe(name)
    assert recipe.description
    report = quantize_checkpoint(tiny_mixtral, tmp_path / "q", recipe, dry_run=True)
    assert report.bytes_out > 0


def test_the_ladder_descends_in_expert_bits():
    experts = "model.layers.0.mlp.experts"

    def cost(name: str) -> float:  # gate_up holds two of an expert's three matrices
        recipe = load_recipe(name)
        gate_up, down = (bits_per_weight(recipe.scheme_for(f"{experts}.{p}")) for p in ("gate_up", "down"))
        return (2 * gate_up + down) / 3

    costs = [cost(name) for name in LADDER]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)


@pytest.mark.parametrize("name", ["q4"])
def test_a_ladder_recipe_quantizes_tables_and_loads(name, tiny_mixtral, tmp_path):
    quantize_checkpoint(tiny_mixtral, tmp_path / "q", load_recipe(name))
    schemes = json.loads((tmp_path / "q" / "moe_local.json").read_text())["dense"]
    assert schemes["model.embed_tokens.weight"].startswith("int8-g")  # g64, or smaller on a narrow table
    lm = load(tmp_path / "q", LoadOptions(dtype="float32"))
    assert isinstance(lm.model.get_input_embeddings(), QuantEmbedding)
    with torch.no_grad():
        logits = lm.model(torch.tensor([[1, 2, 3, 4]])).logits
    assert bool(torch.isfinite(logits).all())
