"""The CLI as a user runs it: tiny-checkpoint, then run, checked against transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def expertmesh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    expertmesh("tiny-checkpoint", str(out), "--layers", "3", "--experts", "4", "--hidden", "48",
               "--heads", "6", "--kv-heads", "2", "--seed", "7")
    return out


def test_run_json_matches_transformers_greedy(cli_checkpoint):
    from transformers import MixtralForCausalLM

    prompt = [1, 415, 2936, 9060, 285, 1142]
    out = json.loads(expertmesh("run", "--model", str(cli_checkpoint), "--prompt-ids",
                                ",".join(map(str, prompt)), "--max-new-tokens", "16", "--json").stdout)
    model = MixtralForCausalLM.from_pretrained(cli_checkpoint).eval()
    assert model.config.num_hidden_layers == 3 and model.config.num_local_experts == 4
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, 6:]
    assert out["token_ids"] == expected.tolist()[:len(out["token_ids"])]
    assert len(out["token_ids"]) == 16 or out["token_ids"][-1] == 2


def test_run_text_prompt_and_seeded_sampling(cli_checkpoint):
    args = ["run", "--model", str(cli_checkpoint), "--prompt", "Il était une fois", "--json",
            "--max-new-tokens", "8", "--temperature", "0.9", "--seed", "4"]
    first = json.loads(expertmesh(*args).stdout)
    second = json.loads(expertmesh(*args).stdout)
    assert first == second and len(first["token_ids"]) == 8
    assert isinstance(first["text"], str)


def test_run_on_a_bad_checkpoint_exits_with_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = expertmesh("run", "--model", str(tmp_path), "--prompt", "hi", check=False)
    assert result.returncode == 2
    assert "model_type" in result.stderr and "Traceback" not in result.stderr
