"""Helpers shared by the family fixtures: they live in the package (``mmspec.tiny.common``, used by the tiny
builders ``mmspec bench --target tiny:<model_type>`` runs) and are re-exported here for the test-side builders."""

from mmspec.tiny.common import (CORPUS, QWEN_ADDED, QWEN_SPECIALS, QWEN_TEMPLATE, WORDS,  # noqa: F401
                                bpe_tokenizer, finish, qwen_tokenizer, scale_linear, silence, word_tokenizer)
