"""Token selection (spec §1, §2, §6): worked examples in float64 at half a unit of the last printed digit; masks
exact."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trl_tokenlevel.ops.selection import (
    TOKEN_SELECTION_METHODS,
    all_gather_variable_length,
    d3s_token_mask,
    high_entropy_token_mask,
    linear_quantile,
    selected_token_mean,
    spine_entropy_band_penalty,
)

F64 = torch.float64


def assert_printed(actual, printed):
    """Compare with digits as printed in the spec: tolerance is half a unit of the last printed digit."""
    values = torch.as_tensor(actual, dtype=F64).reshape(-1).tolist()
    printed = [printed] if isinstance(printed, str) else list(printed)
    assert len(values) == len(printed), (values, printed)
    for value, text in zip(values, printed):
        text = text.replace("−", "-")
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(value - float(text)) <= 0.5 * 10**-decimals + 1e-12, f"{value} != {text}"


# §1 worked example: 2 sequences, one pad (the pad entropy is deliberately the largest value).
H = torch.tensor([[0.1, 2.0, 0.5, 9.0], [1.5, 0.2, 2.0, 0.3]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
LOSS = torch.tensor([[0.3, -0.6, 0.2, 0.0], [0.5, 0.1, -0.4, 0.2]], dtype=F64)


def as_int(mask):
    return mask.to(torch.int64).tolist()


class TestHighEntropy8020:
    def test_quantile_thresholds(self):
        valid = H[MASK.bool()]
        assert_printed(linear_quantile(valid, 1 - 0.2), "1.9")
        assert_printed(linear_quantile(valid, 1 - 0.3), "1.6")

    @pytest.mark.parametrize(
        "rho, selection, expected",
        [
            (0.2, "quantile", [[0, 1, 0, 0], [0, 0, 1, 0]]),
            (0.2, "topk", [[0, 1, 0, 0], [0, 0, 1, 0]]),
            (0.3, "quantile", [[0, 1, 0, 0], [0, 0, 1, 0]]),
            (0.3, "topk", [[0, 1, 0, 0], [1, 0, 1, 0]]),
        ],
    )
    def test_masks(self, rho, selection, expected):
        mask = high_entropy_token_mask(H, MASK, rho=rho, entropy_selection=selection)
        assert mask.dtype == torch.bool
        assert as_int(mask) == expected

    def test_default_is_quantile_rho_0_2(self):
        assert as_int(high_entropy_token_mask(H, MASK)) == [[0, 1, 0, 0], [0, 0, 1, 0]]

    @pytest.mark.parametrize(
        "selection, normalize, printed",
        [
            ("quantile", "all", "-0.142857"),
            ("topk", "selected", "-0.166667"),
            ("quantile", "selected", "-0.5"),
            ("topk", "all", "-0.0714286"),
        ],
    )
    def test_losses_rho_0_3(self, selection, normalize, printed):
        selected = high_entropy_token_mask(H, MASK, rho=0.3, entropy_selection=selection)
        assert_printed(selected_token_mean(LOSS, MASK, selected, entropy_normalize=normalize), printed)

    def test_default_normalize_is_all_valid_tokens(self):
        selected = high_entropy_token_mask(H, MASK, rho=0.3)
        assert_printed(selected_token_mean(LOSS, MASK, selected), "-0.142857")

    def test_ties_quantile_keeps_all_topk_keeps_k(self):
        entropy = torch.full((1, 5), 0.7, dtype=F64)
        mask = torch.ones(1, 5)
        assert int(high_entropy_token_mask(entropy, mask, rho=0.2).sum()) == 5
        assert int(high_entropy_token_mask(entropy, mask, rho=0.2, entropy_selection="topk").sum()) == 1

    def test_rho_zero(self):
        entropy = torch.tensor([[1.0, 3.0, 3.0, 2.0]], dtype=F64)
        mask = torch.ones(1, 4)
        assert as_int(high_entropy_token_mask(entropy, mask, rho=0.0)) == [[0, 1, 1, 0]]
        assert int(high_entropy_token_mask(entropy, mask, rho=0.0, entropy_selection="topk").sum()) == 1

    def test_topk_count_rule(self):
        # N·ρ = 10·0.25 = 2.5 -> k = 3; N·ρ = 100·0.20001 ≈ 20.001 -> k = 21; fractional part < 1e-4 -> no round-up.
        for n, rho, k in [(10, 0.25, 3), (100, 0.20001, 21), (100, 0.200000001, 20)]:
            entropy = torch.arange(n, dtype=F64)[None]
            mask = torch.ones(1, n)
            assert int(high_entropy_token_mask(entropy, mask, rho=rho, entropy_selection="topk").sum()) == k

    @pytest.mark.parametrize("selection", ["quantile", "topk"])
    def test_no_valid_tokens(self, selection):
        mask = torch.zeros(2, 4)
        selected = high_entropy_token_mask(H, mask, rho=0.2, entropy_selection=selection)
        assert not selected.any()
        for normalize in ("all", "selected"):
            loss = selected_token_mean(LOSS, mask, selected, entropy_normalize=normalize)
            assert loss.item() == 0.0

    def test_padding_never_selected_and_contributes_zero(self):
        entropy = H.clone()
        entropy[0, 3] = float("nan")
        loss = LOSS.clone()
        loss[0, 3] = float("nan")
        for selection in ("quantile", "topk"):
            selected = high_entropy_token_mask(entropy, MASK, rho=0.5, entropy_selection=selection)
            assert not selected[0, 3]
            assert torch.isfinite(selected_token_mean(loss, MASK, selected))

    def test_mask_carries_no_gradient_and_loss_does(self):
        entropy = H.clone().requires_grad_(True)
        selected = high_entropy_token_mask(entropy, MASK, rho=0.3)
        assert not selected.requires_grad
        per_token_loss = LOSS.clone().requires_grad_(True)
        selected_token_mean(per_token_loss, MASK, selected).backward()
        expected = selected.to(F64) / MASK.sum()
        torch.testing.assert_close(per_token_loss.grad, expected)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("q", [0.0, 0.13, 0.5, 0.8, 0.97, 1.0])
    def test_linear_quantile_matches_torch_quantile(self, dtype, q):
        values = torch.randn(1001, generator=torch.Generator().manual_seed(0)).to(dtype)
        assert torch.equal(linear_quantile(values, q), torch.quantile(values, q))

    def test_linear_quantile_single_value(self):
        assert linear_quantile(torch.tensor([2.5], dtype=F64), 0.8).item() == 2.5

    def test_gather_fn_makes_the_threshold_global_with_unequal_rank_sizes(self):
        gen = torch.Generator().manual_seed(1)
        entropy_a, entropy_b = torch.rand(3, 7, generator=gen, dtype=F64), torch.rand(2, 7, generator=gen, dtype=F64)
        mask_a = torch.ones(3, 7)
        mask_a[:, 5:] = 0  # rank A: 15 valid tokens
        mask_b = torch.ones(2, 7)
        mask_b[1, 2:] = 0  # rank B: 9 valid tokens
        full = high_entropy_token_mask(torch.cat([entropy_a, entropy_b]), torch.cat([mask_a, mask_b]), rho=0.2)

        def gather_from_a(local):  # what rank A receives: its own valid entropies then rank B's
            return torch.cat([local, entropy_b[mask_b.bool()]])

        def gather_from_b(local):
            return torch.cat([entropy_a[mask_a.bool()], local])

        local_a = high_entropy_token_mask(entropy_a, mask_a, rho=0.2, gather_fn=gather_from_a)
        local_b = high_entropy_token_mask(entropy_b, mask_b, rho=0.2, gather_fn=gather_from_b)
        assert torch.equal(torch.cat([local_a, local_b]), full)
        # Each rank's local threshold (the official scope) selects a different set here.
        assert not torch.equal(high_entropy_token_mask(entropy_a, mask_a, rho=0.2), local_a)
        assert not torch.equal(high_entropy_token_mask(entropy_b, mask_b, rho=0.2), local_b)

    def test_gather_fn_with_empty_local_rank(self):
        other = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
        selected = high_entropy_token_mask(H, torch.zeros(2, 4), rho=0.5, gather_fn=lambda v: torch.cat([v, other]))
        assert not selected.any()

    def test_topk_rejects_gather_fn(self):
        with pytest.raises(ValueError, match="quantile"):
            high_entropy_token_mask(H, MASK, entropy_selection="topk", gather_fn=lambda v: v)

    def test_invalid_knobs(self):
        with pytest.raises(ValueError, match="entropy_selection"):
            high_entropy_token_mask(H, MASK, entropy_selection="top")
        with pytest.raises(ValueError, match="rho"):
            high_entropy_token_mask(H, MASK, rho=1.5)
        with pytest.raises(ValueError, match="entropy_normalize"):
            selected_token_mean(LOSS, MASK, MASK, entropy_normalize="valid")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        local = torch.arange(rank * 10, rank * 10 + 2 + 3 * rank, dtype=F64)  # 2 and 5 elements
        torch.save(all_gather_variable_length(local), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class TestAllGatherVariableLength:
    def test_identity_without_process_group(self):
        values = torch.tensor([1.0, 2.0])
        assert all_gather_variable_length(values) is values

    def test_two_ranks_with_different_sizes(self, tmp_path):
        # fork keeps the already-imported torch: a 2-process gloo group in about a second.
        mp.start_processes(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
        expected = [0.0, 1.0, 10.0, 11.0, 12.0, 13.0, 14.0]
        for rank in range(2):
            assert torch.load(tmp_path / f"rank{rank}.pt").tolist() == expected


class TestSpineBand:
    def test_worked_example(self):
        entropy = torch.tensor([[0.05, 0.8, 3.0]], dtype=F64)
        penalty = spine_entropy_band_penalty(entropy, torch.ones(1, 3, dtype=torch.bool))
        assert_printed(penalty, "0.0383333")

    def test_only_forking_tokens_count_and_gradient_flows(self):
        entropy = torch.tensor([[0.05, 0.8, 3.0, 5.0]], dtype=F64, requires_grad=True)
        forking = torch.tensor([[True, True, True, False]])
        penalty = spine_entropy_band_penalty(entropy, forking, band_coef=0.1, band_low=0.2, band_high=2.0)
        assert_printed(penalty, "0.0383333")
        penalty.backward()
        torch.testing.assert_close(entropy.grad, torch.tensor([[-0.1 / 3, 0.0, 0.1 / 3, 0.0]], dtype=F64))

    def test_quantile_band(self):
        entropy = torch.tensor([[0.05, 0.8, 3.0]], dtype=F64)
        # Linear quantiles over F: q10 = 0.2, q90 = 2.56 -> 0.1·mean([0.15, 0, 0.44]).
        penalty = spine_entropy_band_penalty(entropy, torch.ones(1, 3, dtype=torch.bool), band_mode="quantile")
        assert_printed(penalty, "0.0196667")

    def test_empty_forking_set_is_zero_with_graph(self):
        entropy = torch.tensor([[0.05, float("nan")]], dtype=F64, requires_grad=True)
        penalty = spine_entropy_band_penalty(entropy, torch.zeros(1, 2, dtype=torch.bool))
        assert penalty.item() == 0.0
        penalty.backward()
        assert torch.equal(entropy.grad, torch.zeros_like(entropy))


class TestD3STokenMask:
    A = torch.tensor([[0.9, 0.9, 0.9], [-1.2, -1.2, 0.0]], dtype=F64)
    ENTROPY = torch.tensor([[0.1, 2.0, 0.5], [0.4, 1.0, 3.0]], dtype=F64)

    def test_worked_example(self):
        scores = self.A.abs() * self.ENTROPY
        assert_printed(scores, ["0.09", "1.8", "0.45", "0.48", "1.2", "0.0"])
        kept = d3s_token_mask(self.ENTROPY, torch.ones(2, 3), self.A, token_keep_ratio=0.5)
        assert as_int(kept) == [[0, 1, 0], [1, 1, 0]]

    def test_row_advantages_broadcast(self):
        kept = d3s_token_mask(
            self.ENTROPY, torch.ones(2, 3), torch.tensor([0.9, -1.2], dtype=F64), token_keep_ratio=0.5
        )
        assert as_int(kept) == [[0, 1, 0], [0, 1, 1]]

    def test_zero_scores_never_kept_unless_ratio_one(self):
        kept = d3s_token_mask(self.ENTROPY, torch.ones(2, 3), self.A, token_keep_ratio=0.99)
        assert as_int(kept) == [[1, 1, 1], [1, 1, 0]]
        assert d3s_token_mask(self.ENTROPY, torch.ones(2, 3), self.A, token_keep_ratio=1.0).all()

    def test_padding_and_empty(self):
        mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
        kept = d3s_token_mask(self.ENTROPY, mask, self.A, token_keep_ratio=0.5)
        assert as_int(kept) == [[0, 1, 0], [0, 0, 0]]
        assert not d3s_token_mask(self.ENTROPY, torch.zeros(2, 3), self.A, token_keep_ratio=0.5).any()


class TestSelectionRegistry:
    def test_names(self):
        assert set(TOKEN_SELECTION_METHODS) == {"high_entropy", "d3s"}

    def test_uniform_signature(self):
        a = TestD3STokenMask.A
        high = TOKEN_SELECTION_METHODS["high_entropy"](H, MASK, None, rho=0.3, entropy_selection="topk")
        assert as_int(high) == [[0, 1, 0, 0], [1, 0, 1, 0]]
        d3s = TOKEN_SELECTION_METHODS["d3s"](TestD3STokenMask.ENTROPY, torch.ones(2, 3), a, token_keep_ratio=0.5)
        assert as_int(d3s) == [[0, 1, 0], [1, 1, 0]]
        with pytest.raises(ValueError, match="advantages"):
            TOKEN_SELECTION_METHODS["d3s"](H, MASK)


def test_band_penalty_normalizer_and_gather_make_the_mean_global():
    """Two ranks' shares with the global normaliser and gathered quantiles add up to the one-process penalty."""
    from trl_tokenlevel.ops.selection import spine_entropy_band_penalty

    generator = torch.Generator().manual_seed(3)
    entropy = torch.rand(4, 5, generator=generator, dtype=torch.float64) * 3
    forking = torch.rand(4, 5, generator=generator) < 0.6
    forking[2:, :] &= torch.tensor([True, False, False, False, False])  # the second rank holds fewer forking tokens
    for mode in ("const", "quantile"):
        whole = spine_entropy_band_penalty(entropy, forking, band_mode=mode, band_low=0.5, band_high=2.0)
        everything = entropy[forking]
        shares = [
            spine_entropy_band_penalty(
                entropy[rows],
                forking[rows],
                band_mode=mode,
                band_low=0.5,
                band_high=2.0,
                normalizer=forking.sum() / 2,
                gather_fn=lambda _, everything=everything: everything,
            )  # fmt: skip
            for rows in (slice(0, 2), slice(2, 4))
        ]
        torch.testing.assert_close((shares[0] + shares[1]) / 2, whole)  # DDP averages the ranks' gradients
        local = [spine_entropy_band_penalty(entropy[r], forking[r], band_mode=mode, band_low=0.5, band_high=2.0)
                 for r in (slice(0, 2), slice(2, 4))]  # fmt: skip
        assert not torch.allclose((local[0] + local[1]) / 2, whole)  # per-rank means are not the global mean
