"""An input table left on disk: the rows of the resident table, found only where it can be, verified."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams
from moe_local.errors import CheckpointError
from moe_local.generation import generate
from moe_local.inspection import inspect_model
from moe_local.loading.checkpoint import open_checkpoint
from moe_local.loading.disk_embedding import DiskEmbedding, find_table, verify
from moe_local.loading.loader import load
from moe_local.memory import Overhead
from moe_local.planner import make_plan

MiB = 2**20


@pytest.fixture(scope="module")
def folder(tiny_mixtral, tmp_path_factory):
    """The tiny Mixtral quantized (experts 4-bit, embeddings kept as they are)."""
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    out = tmp_path_factory.mktemp("q") / "experts-4bit"
    quantize_checkpoint(tiny_mixtral, out, load_recipe("experts-4bit"))
    return out


def _resident_table(path) -> torch.Tensor:
    lm = load(path, LoadOptions(dtype="float32"), tokenizer=False)
    return lm.model.get_input_embeddings().weight.detach()


@pytest.mark.parametrize("which", ["checkpoint", "folder"])
def test_lookups_are_the_resident_tables_rows(which, tiny_mixtral, folder):
    path = tiny_mixtral if which == "checkpoint" else folder
    source = find_table(open_checkpoint(path))
    assert source is not None and source.name == "model.embed_tokens"
    assert (source.crc32 is not None) == (which == "folder")  # a moe-local folder records its checksum
    table = _resident_table(path)
    assert source.shape == tuple(table.shape)
    disk = DiskEmbedding(source, torch.float32)
    ids = torch.tensor([[3, 0, 3, source.shape[0] - 1], [7, 7, 7, 1]])  # repeats, first and last rows
    assert torch.equal(disk(ids), table[ids])
    assert disk.weight.shape == table.shape and disk.weight.device.type == "meta"
    disk.to(torch.bfloat16)
    assert torch.equal(disk(ids), table[ids].to(torch.bfloat16))
    with pytest.raises(IndexError, match="out of range"):
        disk(torch.tensor([source.shape[0]]))
    with pytest.raises(IndexError, match="out of range"):
        disk(torch.tensor([-1]))


def test_a_tied_table_stays_in_memory(tiny_checkpoint):
    tied = tiny_checkpoint("mixtral", tie_word_embeddings=True)
    assert find_table(open_checkpoint(tied)) is None
    assert inspect_model(tied).embedding_bytes == 0


def test_a_corrupt_table_is_refused(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    source = find_table(open_checkpoint(copy))
    verify(source)  # intact
    with open(source.path, "r+b") as f:
        f.seek(source.offset + 5)
        byte = f.read(1)
        f.seek(source.offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        verify(source)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load(copy, LoadOptions(expert_memory=MiB, embedding_on_disk=True), tokenizer=False)


@pytest.mark.parametrize("which", ["checkpoint", "folder"])
def test_a_budgeted_load_with_the_table_on_disk_generates_the_same(which, tiny_mixtral, folder):
    path = tiny_mixtral if which == "checkpoint" else folder
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    budget = LoadOptions(dtype="float32", expert_memory=MiB)
    kept = load(path, budget)
    disk = load(path, dataclasses.replace(budget, embedding_on_disk=True))
    assert isinstance(disk.model.get_input_embeddings(), DiskEmbedding)
    assert not any("embed_tokens" in n for n, _ in disk.model.named_parameters())  # nothing of it held
    a = generate(kept, "hello there", params, chat=False)
    b = generate(disk, "hello there", params, chat=False)
    assert a.tokens == b.tokens


def test_the_planner_gives_the_tables_bytes_to_experts_when_they_stream(tiny_mixtral):
    info = inspect_model(tiny_mixtral)
    table = info.config.vocab_size * info.config.hidden_size * 4  # stored float32
    assert info.embedding_bytes == table
    fixed = Overhead(baseline=100 * MiB, activations=MiB, slack=MiB)
    roomy = make_plan(info, cpu_memory=8 * 2**30, context=64, overhead=fixed, dtype="float32")
    assert not roomy.embedding_on_disk and roomy.dense_bytes == info.dense_bytes  # all resident: kept
    one = info.one_expert_bytes
    every = info.moe_layers * info.experts_per_layer * one
    base = fixed.total + info.dense_bytes + roomy.kv_bytes
    for cap in (base + 4 * one, base - table + every):  # some experts; all of them with the table freed
        tight = make_plan(info, cpu_memory=cap, context=64, overhead=fixed, dtype="float32")
        no_table = dataclasses.replace(info, embedding_bytes=0)
        without = make_plan(no_table, cpu_memory=cap, context=64, overhead=fixed, dtype="float32")
        assert without.fast_slots < without.total_experts and not without.embedding_on_disk
        assert tight.embedding_on_disk and tight.dense_bytes == info.dense_bytes - table
        assert tight.fast_slots > without.fast_slots  # the freed bytes hold experts
        held = tight.dense_bytes + tight.kv_bytes + tight.overhead + tight.reads_in_flight
        assert held + tight.fast_slots * one <= cap
    assert tight.expert_memory is None  # the second cap: with the table on disk every expert fits
