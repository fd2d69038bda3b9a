"""Token-id reward functions computed on the ids' device (no tokenizer, no text)."""

from trl_tokenlevel.rewards.token_bleu import BleuStatistics, tensor_bleu_statistics, tensor_sentence_bleu

__all__ = ["BleuStatistics", "tensor_bleu_statistics", "tensor_sentence_bleu"]
