"""Bucket notifications -> checkpoint announcements: parsing, and the receiver over HTTP against
a checkpoint in the real S3 endpoint."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from mergeaudit import store, watch
from mergeaudit.checkpoint import write_checkpoint
from mergeaudit.errors import ConfigError
from mergeaudit.notify import TOKEN_ENV, checkpoints_in, make_server

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8, "hidden_size": 4}


def notification(bucket: str, *keys: str, event: str = "s3:ObjectCreated:Put") -> bytes:
    """The body MinIO posts to a webhook (AWS's is the same without the `s3:` prefix)."""
    return json.dumps(
        {
            "EventName": event,
            "Key": f"{bucket}/{keys[0]}",
            "Records": [
                {
                    "eventVersion": "2.0",
                    "eventSource": "minio:s3",
                    "eventName": event,
                    "s3": {"bucket": {"name": bucket}, "object": {"key": k, "size": 1}},
                }
                for k in keys
            ],
        }
    ).encode()


def test_notifications_name_the_folders_that_may_have_completed():
    body = notification(
        "ckpts",
        "rl/step-100/model.safetensors",
        "rl/step-100/config.json",
        "rl/step%2B2/config.json",
        "rl/.staging-x/model.safetensors",
        "rl/step-100/tokenizer.json",
        "other/step-1/config.json",
    )
    assert checkpoints_in(body, ["s3://ckpts/rl"]) == [
        ("s3://ckpts/rl", "s3://ckpts/rl/step-100"),
        ("s3://ckpts/rl", "s3://ckpts/rl/step+2"),
    ]
    assert checkpoints_in(notification("ckpts", "rl/a/_DONE"), ["s3://ckpts/rl"], marker="_DONE") == [
        ("s3://ckpts/rl", "s3://ckpts/rl/a")
    ]
    assert (
        checkpoints_in(notification("ckpts", "rl/a/config.json", event="s3:ObjectRemoved:Delete"), ["s3://ckpts/rl"])
        == []
    )
    aws = json.loads(notification("ckpts", "rl/b/model.safetensors", event="ObjectCreated:CompleteMultipartUpload"))
    sns = json.dumps({"Type": "Notification", "Message": json.dumps(aws)}).encode()
    assert checkpoints_in(sns, ["s3://ckpts/rl"]) == [("s3://ckpts/rl", "s3://ckpts/rl/b")]
    with pytest.raises(ConfigError, match="not JSON"):
        checkpoints_in(b"<xml/>", ["s3://ckpts/rl"])
    with pytest.raises(ConfigError, match="Records"):
        checkpoints_in(b"[1, 2]", ["s3://ckpts/rl"])


def post(port: int, body: bytes, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_receiver_announces_each_complete_checkpoint_once(s3_bucket, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    prefix, state_uri = s3_bucket + "/rl", s3_bucket + "/state/watch.json"
    bucket = s3_bucket.removeprefix("s3://")
    store.write_bytes(prefix + "/step-2/config.json", json.dumps(CFG).encode())  # not complete yet
    write_checkpoint(prefix + "/step-1", [("w", torch.ones(4, 4, dtype=torch.bfloat16))], config=CFG)
    announced: list[watch.Landed] = []
    server = make_server("127.0.0.1", 0, [prefix], announced.append, state_uri=state_uri)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        body = notification(bucket, "rl/step-1/model.safetensors", "rl/step-1/config.json", "rl/step-2/config.json")
        assert post(port, body)[0] == 401
        assert post(port, body, token="wrong")[0] == 401
        status, reply = post(port, body, token="s3cret")
        assert status == 200 and [a["uri"] for a in reply["announced"]] == [prefix + "/step-1"]
        assert post(port, body, token="s3cret") == (200, {"announced": []})  # remembered
        assert post(port, b"nonsense", token="s3cret")[0] == 400
    finally:
        server.shutdown()
        server.server_close()
    (landed,) = announced
    assert landed.name == "step-1" and landed.kind == "rlvr"
    assert watch.load_state(state_uri) == {landed.uri: landed.fingerprint}
    # the poller, seeing the same checkpoint, would emit the same event id, and now emits nothing
    (polled,) = watch.new_checkpoints([prefix], {})
    assert polled.event_id == landed.event_id
    assert watch.new_checkpoints([prefix], watch.load_state(state_uri)) == []


def test_kind_rules_name_each_landed_checkpoints_kind(tmp_path):
    prefix = str(tmp_path / "ckpts")
    for rel in ("grpo-math/step-100", "sft-code/step-5", "other/step-1"):
        write_checkpoint(f"{prefix}/{rel}", [("w", torch.zeros(2))], config=CFG)
    rules = ["sft-*=sft", "grpo-*/*=rlvr"]
    found = {c.name: c.kind for c in watch.new_checkpoints([prefix], {}, kind="unknown", rules=rules)}
    assert found == {"grpo-math-step-100": "rlvr", "sft-code-step-5": "sft", "other-step-1": "unknown"}
    found = {c.name: c.kind for c in watch.new_checkpoints([prefix], {}, kind="rlvr", rules=["code-*=sft"])}
    assert found["sft-code-step-5"] == "rlvr"  # a rule matches the whole path under the prefix
    assert (
        watch.kind_of(prefix, f"{prefix}/sft-code/step-5", watch.kind_rules(["*=base", "sft*=sft"])) == "base"
    )  # first match wins
    with pytest.raises(ConfigError, match=r"kind rule 'sft-\*=SFT' must read PATTERN=KIND"):
        watch.new_checkpoints([prefix], {}, rules=["sft-*=SFT"])
    with pytest.raises(ConfigError, match="PATTERN=KIND"):
        make_server("127.0.0.1", 0, [prefix], lambda landed: None, rules=["no-kind-here"])


def test_the_event_contract_is_checked_before_anything_is_emitted():
    good = watch.Landed("s3://ckpts/rl/step-400", "rl-step-400", "f" * 16, "s3://ckpts", "rlvr")
    assert watch.event_problems(watch.EVENT, good.resource_id, good.payload()) == []
    assert good.resource_id.startswith("mergeaudit.checkpoint.")
    problems = watch.event_problems("checkpoint.landed", "ckpt.1", {"name": "-x", "uri": "gs://b/k", "kind": "RL"})
    assert len(problems) == 5 and "does not match mergeaudit.checkpoint.*" in problems[1]
    assert watch.event_problems(watch.EVENT, good.resource_id, {"uri": good.uri, "kind": "sft"}) == [
        "payload.name is missing"
    ]
    with pytest.raises(ConfigError, match="not announcing s3://ckpts/rl/step-400: payload.kind 'RL'"):
        watch.check_landed(watch.Landed(good.uri, good.name, good.fingerprint, good.prefix, "RL"))
    assert watch.checkpoint_name("s3://ckpts", "s3://ckpts/_staging/step_") == "staging-step"  # a valid name


def test_a_run_started_by_an_event_that_breaks_the_contract_says_why():
    """The on-checkpoint trigger takes every landed event; the run checks the event's resource id
    (its payload was validated as the add_models parameter) and fails naming the problem."""
    from mergeaudit.config import CheckpointSpec
    from mergeaudit.flows.merge_audit import check_landed_event

    landed = [CheckpointSpec(name="rl-step-400", uri="s3://ckpts/rl/step-400", kind="rlvr")]
    check_landed_event("mergeaudit.checkpoint.0123456789abcdef", landed)  # follows the contract
    with pytest.raises(ConfigError, match=r"'ckpt\.step-400' breaks the event contract.*does not match mergeaudit"):
        check_landed_event("ckpt.step-400", landed)
    with pytest.raises(ConfigError, match="names no checkpoint"):
        check_landed_event("mergeaudit.checkpoint.x", [])
