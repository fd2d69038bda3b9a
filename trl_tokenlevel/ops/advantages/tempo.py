"""TEMPO branch-point credit and TVM value labels from a group's prefix tree (spec §10).

TEMPO, https://huggingface.co/papers/2509.18314: ``A_{i,t} = Â_i + λ·b_{i,t}·(V(o_{i,≤t}) − V(o_{i,<t}))``, V the mean
advantage of the completions through a prefix, b = the prefix branches. TVM, https://openreview.net/forum?id=GRbI7kqA6S:
``v(o_{i,≤t})`` = the fraction of correct completions through the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TokenAdvantageInputs, _broadcast_rows, _group_sum, _masked, _num_groups


@dataclass
class PrefixTreeValues:
    """Per-token prefix-tree statistics, (B, T) each, 0 / False on padding.

    ``node_value[i, t] = V(o_{i,≤t})``, ``parent_value[i, t] = V(o_{i,<t})``, ``branch[i, t]`` = the node
    ``o_{i,<t}`` has ≥ 2 distinct children (end of sequence counts as a child).
    """

    node_value: torch.Tensor
    parent_value: torch.Tensor
    branch: torch.Tensor


_END_OF_SEQUENCE = -1  # child key of a completion that stops at a node (never a real token id)


def prefix_tree_values(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
    values: torch.Tensor,
) -> PrefixTreeValues:
    """Prefix-to-tree (P2T) statistics of each group: ``V(s) = mean{values_j : o_j has prefix s}`` (spec §10).

    Paper: TEMPO, https://huggingface.co/papers/2509.18314. Exact token-id equality defines the tree, built on the
    valid tokens only (left or right padding). The end of a completion is an explicit child of its last node, so
    "stop here vs continue" is a branch even when the ids carry no EOS token. Vectorised: one ``torch.unique`` per
    depth over the rows still alive, O(Σ|o_i|) overall.
    """
    valid = completion_mask.bool()
    batch_size, seq_len = valid.shape
    device = completion_ids.device
    lengths = valid.sum(dim=1)
    rank = torch.cumsum(valid.long(), dim=1) - 1
    rows = torch.arange(batch_size, device=device)[:, None].expand(batch_size, seq_len)
    max_len = int(lengths.max()) if batch_size else 0
    compact_ids = torch.full((batch_size, max(max_len, 1)), _END_OF_SEQUENCE, dtype=torch.long, device=device)
    compact_ids[rows[valid], rank[valid]] = completion_ids[valid].long()

    values = values.detach()
    node_value = torch.zeros((batch_size, max(max_len, 1)), dtype=values.dtype, device=device)
    parent_value = torch.zeros_like(node_value)
    branch = torch.zeros((batch_size, max(max_len, 1)), dtype=torch.bool, device=device)

    num_groups = _num_groups(group_index)
    counts = torch.bincount(group_index, minlength=num_groups).clamp(min=1).to(values.dtype)
    node = group_index.clone()  # root node of each row's group
    node_val = (_group_sum(values, group_index, num_groups) / counts)[group_index]
    num_nodes = num_groups
    for depth in range(max_len):
        alive = torch.nonzero(lengths >= depth).squeeze(1)  # rows whose prefix of length `depth` exists
        child_token = compact_ids[alive, depth]  # _END_OF_SEQUENCE for rows that stop at this node
        keys, inverse = torch.unique(torch.stack([node[alive], child_token], dim=1), dim=0, return_inverse=True)
        num_children = torch.bincount(keys[:, 0], minlength=num_nodes)
        key_counts = torch.bincount(inverse, minlength=keys.shape[0]).to(values.dtype)
        child_val = values.new_zeros(keys.shape[0]).index_add_(0, inverse, values[alive]) / key_counts

        has_token = lengths[alive] > depth
        token_rows = alive[has_token]
        node_value[token_rows, depth] = child_val[inverse[has_token]]
        parent_value[token_rows, depth] = node_val[token_rows]
        branch[token_rows, depth] = num_children[node[token_rows]] >= 2
        node[token_rows] = inverse[has_token]
        node_val[token_rows] = child_val[inverse[has_token]]
        num_nodes = keys.shape[0]

    def scatter_back(compact: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((batch_size, seq_len), dtype=compact.dtype, device=device)
        out[valid] = compact[rows[valid], rank[valid]]
        return out

    return PrefixTreeValues(scatter_back(node_value), scatter_back(parent_value), scatter_back(branch))


def tempo_advantages(
    advantages: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
    *,
    tempo_lambda: float = 1.0,
) -> torch.Tensor:
    """TEMPO branch-point credit ``A_{i,t} = Â_i + λ·b_{i,t}·(V(o_{i,≤t}) − V(o_{i,<t}))``, (B, T) (spec §10).

    Paper: "Exploiting Tree Structure for Credit Assignment in RL Training of LLMs" (TEMPO),
    https://huggingface.co/papers/2509.18314. ``V(s)`` is the mean GRPO advantage Â of the group's completions
    through prefix s (:func:`prefix_tree_values`); ``b`` gates the TD term to branching nodes, elsewhere the method is
    GRPO. [unverified] combination; knob ``tempo_lambda`` λ, default 1.0. Needs no critic and no extra forward.
    """
    advantages = advantages.detach()
    tree = prefix_tree_values(completion_ids, completion_mask, group_index, advantages)
    td = torch.where(tree.branch, tree.node_value - tree.parent_value, torch.zeros_like(tree.node_value))
    return _broadcast_rows(advantages, completion_mask) + _masked(tempo_lambda * td, completion_mask)


def tvm_value_labels(
    rewards: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
) -> torch.Tensor:
    """TVM token-level value labels ``v(o_{i,≤t}) = #correct through the prefix / #responses through it``, (B, T).

    Paper: "Token-Supervised Value Models" (TVM), https://openreview.net/forum?id=GRbI7kqA6S, spec §10. ``rewards``
    are raw 0/1 outcomes; train a value head on them with BCE ([recon] default) or MSE.
    """
    return prefix_tree_values(completion_ids, completion_mask, group_index, rewards).node_value


def tempo_token_advantages(batch: TokenAdvantageInputs, *, tempo_lambda: float = 1.0) -> torch.Tensor:
    """Registry entry ``"tempo"``: :func:`tempo_advantages` on ``batch.advantages`` and ``batch.completion_ids``.

    Paper: https://huggingface.co/papers/2509.18314. Default λ = 1.0.
    """
    return tempo_advantages(
        batch.advantages, batch.completion_ids, batch.completion_mask, batch.group_index, tempo_lambda=tempo_lambda
    )
