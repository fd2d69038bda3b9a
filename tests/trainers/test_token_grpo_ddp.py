"""Two CPU processes (torchrun, gloo): the global entropy quantile equals the single-process quantile over the same
tokens, and token advantages see whole prompt groups although each group is split across the two ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.ports import free_port
from trl_tokenlevel.ops.advantages import resolve_group_index, tempo_advantages
from trl_tokenlevel.ops.selection import high_entropy_token_mask

WORKER = os.path.join(os.path.dirname(__file__), "ddp_token_grpo.py")
RHO = 0.3


@pytest.fixture(scope="module")
def ranks(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), WORKER, tiny_model_path, str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _cat(ranks, call, key, dtype=torch.float64):
    return torch.cat([torch.tensor(r["records"][call][key], dtype=dtype) for r in ranks])


def test_global_entropy_quantile_equals_single_process(ranks):
    assert [r["world_size"] for r in ranks] == [2, 2]
    calls = len(ranks[0]["records"])
    assert calls == len(ranks[1]["records"]) == 2
    for call in range(calls):
        entropy, valid = _cat(ranks, call, "entropy"), _cat(ranks, call, "valid", torch.long)
        expected = high_entropy_token_mask(entropy, valid, rho=RHO)  # one process, all tokens of both ranks
        selected = _cat(ranks, call, "selected", torch.long).bool()
        assert torch.equal(selected, expected)
        assert 0 < selected.sum() < valid.sum()
        # Loss normaliser "all": every valid token of both ranks.
        assert ranks[0]["records"][call]["num_items_in_batch"] == valid.sum().item()


def test_quantile_op_with_different_token_counts_per_rank(ranks):
    entropy = torch.cat([torch.tensor(r["op_entropy"], dtype=torch.float64) for r in ranks])
    valid = torch.cat([torch.tensor(r["op_valid"]) for r in ranks]).bool()
    assert [int(torch.tensor(r["op_valid"]).sum()) for r in ranks] == [7, 12]
    expected = high_entropy_token_mask(entropy, valid, rho=RHO)
    assert torch.equal(torch.cat([torch.tensor(r["op_mask"]) for r in ranks]).bool(), expected)


def test_token_advantages_see_whole_groups_across_ranks(ranks):
    for call in range(len(ranks[0]["records"])):
        group_ids = _cat(ranks, call, "group_ids", torch.long)
        # One prompt group of 4 completions, 2 on each rank.
        assert [r["records"][call]["group_ids"] for r in ranks] == [[group_ids[0].item()] * 2] * 2
        valid = _cat(ranks, call, "valid", torch.long)
        stock = _cat(ranks, call, "stock_advantages")
        expected = tempo_advantages(stock, _cat(ranks, call, "completion_ids", torch.long), valid,
                                    resolve_group_index(len(group_ids), group_ids))  # fmt: skip
        advantages = _cat(ranks, call, "advantages")
        torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
        # The prefix tree spans both ranks' completions: branch-point credit differs from the stock advantages.
        assert not torch.allclose(advantages, stock[:, None] * valid)
