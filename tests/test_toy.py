"""Toy tokenizer and checkpoints: deterministic, offline, with task vectors of known density."""

from __future__ import annotations

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint
from mergeaudit.toy import build_tokenizer, build_toy_family


def test_tokenizer_round_trips_characters():
    tok = build_tokenizer()
    text = "Q: 12+7=19\nA: (x*y)"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("€")["input_ids"]) == ["<unk>"]


def test_family_is_deterministic_and_densities_are_as_asked(tmp_path):
    a = build_toy_family(str(tmp_path / "a"), variants={"v": 0.25})
    b = build_toy_family(str(tmp_path / "b"), variants={"v": 0.25})
    for ck_a, ck_b in [(a.base, b.base), (a.variants["v"], b.variants["v"])]:
        blob = "model.safetensors"
        assert store.read_bytes(store.join(ck_a, blob)) == store.read_bytes(store.join(ck_b, blob))
    assert abs(a.density("v") - 0.25) < 0.01
    assert Checkpoint.open(a.variants["v"]).shapes() == Checkpoint.open(a.base).shapes()
