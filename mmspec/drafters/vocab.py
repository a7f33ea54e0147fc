"""Tokenizer compatibility between a drafter and its target, decided by the tokenizers' content.

Embedding sizes say nothing: llava-1.5 pads its vocabulary to 32064 rows while its Vicuna drafters have
32000. What matters is that every token the drafter can produce means the same thing to the target.
"""

from __future__ import annotations

import torch

from mmspec.errors import MMSpecError


def check_same_tokenizer(target_tok, drafter_tok, extra_target_ids: frozenset[int] = frozenset()) -> None:
    """Raise ``MMSpecError`` naming the first differing tokens unless the drafter's vocabulary is the target's.

    The target may have tokens the drafter lacks only if they are added/special tokens (image placeholders,
    padding): the drafter can never propose those, which is safe.
    """
    t_vocab: dict[str, int] = target_tok.get_vocab()
    d_vocab: dict[str, int] = drafter_tok.get_vocab()
    t_by_id = {i: s for s, i in t_vocab.items()}
    diffs = []
    for token, i in sorted(d_vocab.items(), key=lambda kv: kv[1]):
        if t_vocab.get(token) != i:
            diffs.append(f"id {i}: drafter {token!r} vs target {t_by_id.get(i, '<none>')!r}")
            if len(diffs) == 3:
                break
    if not diffs:
        special = set(getattr(target_tok, "added_tokens_encoder", {}).values()) | set(extra_target_ids)
        missing = [(i, s) for s, i in t_vocab.items() if s not in d_vocab and i not in special]
        if missing:
            i, s = min(missing)
            diffs.append(f"id {i}: target {s!r} is missing from the drafter's tokenizer")
    if diffs:
        raise MMSpecError("the drafter's tokenizer differs from the target's, so its tokens would mean other "
                          "words; first differences: " + "; ".join(diffs)
                          + ". Use a drafter trained with the target's tokenizer.")


def undraftable_ids(drafter_vocab_rows: int, target_vocab_rows: int, drafter_tok,
                    banned: frozenset[int]) -> torch.Tensor:
    """Boolean [drafter_vocab_rows]: ids the drafter must never propose.

    Padding rows beyond the drafter's tokenizer, rows the target's logits do not have, and ``banned`` ids
    (image placeholders) get draft probability 0.
    """
    mask = torch.zeros(drafter_vocab_rows, dtype=torch.bool)
    n_tokens = len(drafter_tok)
    mask[n_tokens:] = True
    mask[target_vocab_rows:] = True
    for i in banned:
        if i < drafter_vocab_rows:
            mask[i] = True
    return mask
