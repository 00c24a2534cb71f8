"""Nothing lost: `mergeaudit merge` and the checkpoint writer never delete or overwrite data they
did not create, refuse outputs that overlap an input or the config before anything is read or
written, and replace a previous output through a final swap, so a failure leaves it intact;
locally and on the S3 endpoint (moto server)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.checkpoint.writer import PROVENANCE_FILE, UnsafeOutputError, check_output, relation
from mergeaudit.cli import main
from mergeaudit.errors import MergeAuditError
from mergeaudit.merging import executor
from mergeaudit.merging.executor import REPORT_FILE, run_merge
from mergeaudit.merging.mergekit_yaml import load_mergekit_config

CFG = {"model_type": "llama"}
MERGE = {
    "merge_method": "task_arithmetic",
    "base_model": "base",
    "models": [{"model": "ft_a", "parameters": {"weight": 0.5}}, {"model": "ft_b", "parameters": {"weight": 0.5}}],
    "dtype": "float32",
}


class Crash(Exception):
    pass


def tensors(n: int, value: float = 0.0, size: int = 64) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((size,), value + i) for i in range(n)}


def crashing(items: dict[str, torch.Tensor], after: int):
    for i, item in enumerate(items.items()):
        if i == after:
            raise Crash()
        yield item


def snapshot(root: str) -> dict[str, str]:
    """Every object under root (local or S3) -> digest of its bytes."""
    loc = store.locate(root)
    store.refresh_tree(loc)
    if not loc.fs.exists(loc.path):
        return {}
    out = {}
    for path in loc.fs.find(loc.path):
        rel = os.path.relpath(str(path), loc.path)
        out[rel] = hashlib.sha256(store.read_bytes(store.join(root, rel))).hexdigest()
    return out


def read_all(uri: str) -> dict[str, torch.Tensor]:
    return dict(Checkpoint.open(uri).iter_tensors())


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def inputs_dir(toy_family, tmp_path) -> Path:
    """A folder holding the three toy checkpoints, a mergekit YAML naming them and a user file."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copytree(toy_family.base, root / "base")
    for name, uri in toy_family.variants.items():
        shutil.copytree(uri, root / name)
    (root / "merge.yaml").write_text(yaml.safe_dump(MERGE))
    (root / "notes.txt").write_text("unrelated, precious")
    return root


def s3_family(toy_family, prefix: str) -> dict[str, str]:
    out = {}
    for name, uri in {"base": toy_family.base, **toy_family.variants}.items():
        for fname, fi in store.list_files(uri).items():
            store.copy(fi.uri, store.join(prefix, name, fname))
        out[name] = store.join(prefix, name)
    return out


def s3_plan(family: dict[str, str]):
    from mergeaudit.merging.mergekit_yaml import plan_from_mergekit

    cfg = {
        **MERGE,
        "base_model": family["base"],
        "models": [{"model": family[n], "parameters": {"weight": 0.5}} for n in ("ft_a", "ft_b")],
    }
    return plan_from_mergekit(cfg, Path("."))


# -- refused before anything is read or written ----------------------------------------------------


def test_merge_into_the_folder_holding_the_inputs_is_refused(inputs_dir, monkeypatch, capsys):
    before = snapshot(str(inputs_dir))
    monkeypatch.chdir(inputs_dir)
    code = main(["merge", "merge.yaml", "."])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "mergeaudit: error: refusing to write to" in err
    assert snapshot(str(inputs_dir)) == before
    assert not [p for p in os.listdir(inputs_dir.parent) if p.startswith(".")], "no staging left behind"


def test_merge_into_a_folder_holding_the_config_is_refused(inputs_dir, tmp_path, capsys):
    cfg = tmp_path / "configs"
    cfg.mkdir()
    data = {
        **MERGE,
        "base_model": str(inputs_dir / "base"),
        "models": [{"model": str(inputs_dir / n), "parameters": {"weight": 0.5}} for n in ("ft_a", "ft_b")],
    }
    (cfg / "merge.yaml").write_text(yaml.safe_dump(data))
    before = snapshot(str(cfg))
    assert main(["merge", str(cfg / "merge.yaml"), str(cfg)]) == 2
    assert "merge.yaml" in capsys.readouterr().err
    assert snapshot(str(cfg)) == before
    # the config itself as OUT
    assert main(["merge", str(cfg / "merge.yaml"), str(cfg / "merge.yaml")]) == 2
    assert snapshot(str(cfg)) == before


@pytest.mark.parametrize("out", ["ft_a", "base", "base/merged", "ft_b/sub/merged", "."])
def test_local_output_overlapping_an_input_is_refused_before_reading(inputs_dir, monkeypatch, out):
    plan = load_mergekit_config(inputs_dir / "merge.yaml")
    before = snapshot(str(inputs_dir))
    opened = []
    monkeypatch.setattr(executor, "prepare", lambda *a, **k: opened.append(a) or pytest.fail("inputs were opened"))
    with pytest.raises(UnsafeOutputError, match="refusing to write to"):
        run_merge(plan, str(inputs_dir / out))
    assert snapshot(str(inputs_dir)) == before and not opened


def test_symlinked_output_pointing_at_an_input_is_refused(inputs_dir):
    plan = load_mergekit_config(inputs_dir / "merge.yaml")
    os.symlink(inputs_dir / "ft_a", inputs_dir.parent / "alias")
    with pytest.raises(UnsafeOutputError, match="equal to"):
        run_merge(plan, str(inputs_dir.parent / "alias"), overwrite=True)
    assert Checkpoint.open(str(inputs_dir / "ft_a")).keys()


@pytest.mark.parametrize("out", ["ft_a", "ft_a/merged", "", "base"])
def test_s3_output_overlapping_an_input_is_refused_and_the_input_survives(toy_family, s3_bucket, out):
    family = s3_family(toy_family, s3_bucket + "/models")
    plan = s3_plan(family)
    before = snapshot(s3_bucket)
    target = store.join(s3_bucket, "models", out) if out else s3_bucket + "/models"
    with pytest.raises(UnsafeOutputError):
        run_merge(plan, target, overwrite=True)
    assert snapshot(s3_bucket) == before
    assert_same(read_all(family["ft_a"]), read_all(toy_family.variants["ft_a"]))


def test_uri_containment_respects_component_boundaries(tmp_path):
    assert relation("s3://bkt/a", "s3://bkt/ab") is None
    assert relation("s3://bkt/ab", "s3://bkt/a") is None
    assert relation("s3://bkt/a/", "s3://bkt/a") == "equal to"
    assert relation("s3://bkt/a/b", "s3://bkt/a") == "inside"
    assert relation("s3://bkt", "s3://bkt/a/b") == "contains"
    assert relation("s3://bkt/a", "s3://other/a") is None
    assert relation(str(tmp_path / "x"), "s3://xyz") is None
    assert relation(str(tmp_path / "a"), str(tmp_path / "ab")) is None
    assert relation(str(tmp_path / "a" / ".." / "b"), str(tmp_path / "b")) == "equal to"


# -- existing outputs ----------------------------------------------------------------------------


def test_existing_folder_not_written_by_mergeaudit_is_refused_even_with_overwrite(inputs_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(str(out))
    assert main(["merge", str(inputs_dir / "merge.yaml"), str(out), "--overwrite"]) == 2
    assert "not written by mergeaudit" in capsys.readouterr().err
    assert snapshot(str(out)) == before
    # a file, too
    (tmp_path / "file.bin").write_bytes(b"x")
    assert main(["merge", str(inputs_dir / "merge.yaml"), str(tmp_path / "file.bin"), "--overwrite"]) == 2
    assert (tmp_path / "file.bin").read_bytes() == b"x"
    # an empty folder holds nothing to lose
    (tmp_path / "empty").mkdir()
    assert main(["merge", str(inputs_dir / "merge.yaml"), str(tmp_path / "empty")]) == 0
    assert Checkpoint.open(str(tmp_path / "empty")).keys()


def test_previous_output_needs_overwrite_and_is_then_replaced(inputs_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "merged")
    cfg = str(inputs_dir / "merge.yaml")
    assert main(["merge", cfg, out]) == 0
    first = snapshot(out)
    assert PROVENANCE_FILE in first and REPORT_FILE in first
    capsys.readouterr()
    assert main(["merge", cfg, out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == first
    renames = []
    real = os.rename

    def spy(src, dst):
        renames.append((os.path.basename(src), os.path.basename(dst), os.path.exists(os.path.join(src, REPORT_FILE))))
        return real(src, dst)

    removed = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(os, "rename", spy)
    monkeypatch.setattr(
        shutil,
        "rmtree",
        lambda p, **k: (
            removed.append((os.path.basename(p), os.path.exists(os.path.join(out, REPORT_FILE)))) or real_rmtree(p, **k)
        ),
    )
    assert main(["merge", cfg, out, "--overwrite", "--seed", "3"]) == 0
    second = json.loads((Path(out) / REPORT_FILE).read_text())
    assert second["plan"]["seed"] == 3
    aside, swap = [r for r in renames if "merged" in r[0] or "merged" in r[1]][-2:]
    assert aside[:2] == ("merged", f".merged.old-{aside[1][-12:]}"), "the old folder is only moved aside..."
    assert swap[0].startswith(".merged.partial-") and swap[1] == "merged" and swap[2], "...for a complete new one"
    assert (aside[1], True) in removed, "and removed once the new one is in place"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no staging or old folder left behind"


def test_previous_output_with_foreign_files_is_refused(inputs_dir, tmp_path):
    out = tmp_path / "merged"
    plan = load_mergekit_config(inputs_dir / "merge.yaml")
    run_merge(plan, str(out))
    (out / "my-notes.md").write_text("keep me")
    with pytest.raises(UnsafeOutputError, match="my-notes.md"):
        run_merge(plan, str(out), overwrite=True)
    assert (out / "my-notes.md").read_text() == "keep me"


@pytest.mark.parametrize("old_shards,new_shards", [(600, 600), (10**6, 600), (600, 10**6), (10**6, 10**6)])
def test_replacing_on_s3_swaps_and_removes_only_old_files(s3_bucket, old_shards, new_shards):
    uri = s3_bucket + "/ck"
    write_checkpoint(uri, tensors(5).items(), config=CFG, max_shard_bytes=old_shards)
    store.write_bytes(s3_bucket + "/ck-sibling/keep.txt", b"neighbour")
    write_checkpoint(uri, tensors(3, 10.0).items(), config=CFG, max_shard_bytes=new_shards, overwrite=True)
    assert_same(read_all(uri), tensors(3, 10.0))
    files = store.list_files(uri)
    prov = json.loads(store.read_bytes(files[PROVENANCE_FILE].uri))
    assert set(files) == set(prov["files"]), "old shards are gone, nothing else is left"
    assert store.read_bytes(s3_bucket + "/ck-sibling/keep.txt") == b"neighbour"


# -- a failure leaves the old checkpoint intact --------------------------------------------------


@pytest.mark.parametrize("old_shards", [600, 10**6])
@pytest.mark.parametrize("after", [0, 2, 4])
def test_failed_replacement_leaves_the_old_checkpoint_intact(store_root, old_shards, after):
    uri = store.join(store_root, "ck")
    write_checkpoint(uri, tensors(5).items(), config=CFG, max_shard_bytes=old_shards)
    before = snapshot(uri)
    with pytest.raises(Crash):
        write_checkpoint(uri, crashing(tensors(7, 100.0), after), config=CFG, max_shard_bytes=600, overwrite=True)
    assert snapshot(uri) == before, "the old files are untouched and nothing new is left"
    assert_same(read_all(uri), tensors(5))


def test_merge_failing_midway_into_an_existing_s3_checkpoint_keeps_it(toy_family, s3_bucket, monkeypatch):
    family = s3_family(toy_family, s3_bucket + "/models")
    plan = s3_plan(family)
    out = s3_bucket + "/merged"
    run_merge(plan, out, max_shard_bytes=20_000)
    old = read_all(out)
    before = snapshot(out)
    real = executor.PreparedMerge.stream

    def failing(self):
        for i, item in enumerate(real(self)):
            if i == 5:
                raise Crash()
            yield item

    monkeypatch.setattr(executor.PreparedMerge, "stream", failing)
    with pytest.raises(Crash):
        run_merge(plan.model_copy(update={"seed": 1}), out, max_shard_bytes=20_000, overwrite=True)
    assert snapshot(out) == before
    assert_same(read_all(out), old)


def test_checks_fail_as_user_errors(tmp_path):
    with pytest.raises(MergeAuditError):
        check_output(str(tmp_path / "x"), [str(tmp_path)])


# -- no silent NaN checkpoints ---------------------------------------------------------------------


def _fp16_family(root: Path, poison: float | None = None) -> dict[str, str]:
    """A base and two fine-tunes in float16 whose weights are near float16's largest value."""
    base = {"w": torch.full((8, 8), 30000.0, dtype=torch.float16)}
    out = {"base": write_checkpoint(str(root / "base"), base.items(), config=CFG)}
    for i, name in enumerate(("ft_a", "ft_b")):
        t = base["w"].clone()
        t[0, i] = 30001.0 if poison is None else poison
        out[name] = write_checkpoint(str(root / name), {"w": t}.items(), config=CFG)
    return out


def _merge_cfg(family: dict[str, str], method: str, weight: float, dtype: str | None) -> dict:
    cfg = {
        "merge_method": method,
        "base_model": family["base"],
        "models": [{"model": family[n], "parameters": {"weight": weight}} for n in ("ft_a", "ft_b")],
        "parameters": {"normalize": False},
    }
    if dtype:
        cfg["dtype"], _, out = dtype.partition(">")
        if out:
            cfg["out_dtype"] = out
    return cfg


@pytest.mark.parametrize(
    "poison,method,weight,dtype,reason",
    [
        (None, "linear", 2.0, None, "NaN or infinite values from finite inputs (computing in float16)"),
        (None, "linear", 2.0, "float32>float16", "overflows float16"),  # 2 x 30000 does not fit float16
        (float("nan"), "task_arithmetic", 0.5, "float32", "ft_b holds NaN or infinite"),
        (float("inf"), "linear", 0.5, "float32", "ft_b holds NaN or infinite"),
    ],
)
def test_a_merge_that_would_write_non_finite_values_fails_and_writes_nothing(
    tmp_path, capsys, poison, method, weight, dtype, reason
):
    family = _fp16_family(tmp_path / "in", poison)
    if poison is not None and method == "linear":  # poison only ft_b
        t = {"w": torch.full((8, 8), 30000.0, dtype=torch.float16)}
        shutil.rmtree(family["ft_a"])
        family["ft_a"] = write_checkpoint(family["ft_a"], t.items(), config=CFG)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_merge_cfg(family, method, weight, dtype)))
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_finite_merge_of_the_same_inputs_still_works(tmp_path):
    family = _fp16_family(tmp_path / "in")
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_merge_cfg(family, "linear", 0.5, None)))
    assert main(["merge", str(config), str(tmp_path / "out")]) == 0
    assert bool(torch.isfinite(read_all(str(tmp_path / "out"))["w"]).all())
