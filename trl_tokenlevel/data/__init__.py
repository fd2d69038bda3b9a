"""Data utilities: per-token columns that survive TRL's tokenization, truncation, padding and shift."""

from .token_columns import (
    TOKEN_BATCH_KEYS,
    TOKEN_COLUMN_FAMILIES,
    TOKEN_COLUMNS,
    DataCollatorForTokenPreference,
    tokenize_preference_dataset,
    validate_token_columns,
)

__all__ = [
    "TOKEN_BATCH_KEYS",
    "TOKEN_COLUMN_FAMILIES",
    "TOKEN_COLUMNS",
    "DataCollatorForTokenPreference",
    "tokenize_preference_dataset",
    "validate_token_columns",
]
