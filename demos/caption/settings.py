"""The command's settings: defaults, and every flag value checked before the first input is looked at, so a
value wrong for every input stops the run instead of giving each input an error line (which a rerun would then
skip as done). Errors about an engine setting name it as its flag: ``MMSpecError.param`` -> ``FLAGS``."""

from __future__ import annotations

from demos.caption.inputs import Task
from demos.caption.target import model_device
from mmspec.config import MAX_DRAFT_TOKENS, MAX_TREE_NODES
from mmspec.errors import MMSpecError

DEFAULT_BATCH_SIZE = 16   # = mmspec.Pipeline.default_batch_size (not imported: --help loads no torch)

# DecodeConfig's settings (``MMSpecError.param``) -> (this command's flag, the values that flag takes)
FLAGS = {
    "max_new_tokens": ("--max-new-tokens", "at least 1"),
    "num_draft_tokens": ("--num-draft-tokens", f"an integer in [0, {MAX_DRAFT_TOKENS}] (leave it out for adaptive)"),
    "tree_nodes": ("--tree-nodes", f"an integer in [1, {MAX_TREE_NODES}] (leave it out for a chain)"),
}


def batch_size_of(args) -> int:
    return int(getattr(args, "batch_size", None) or DEFAULT_BATCH_SIZE)


def flag_error(e: MMSpecError, args) -> MMSpecError:
    """``e`` said in this command's terms: the setting it names, as its flag, with the values the flag takes."""
    if e.param not in FLAGS:
        return e
    flag, values = FLAGS[e.param]
    return MMSpecError(f"{flag} must be {values}, got {getattr(args, e.param)!r}", code=e.code, param=e.param)


def check_flags(args) -> None:
    """Every flag value, before the first input is looked at."""
    import math

    from mmspec.config import DecodeConfig

    try:
        DecodeConfig(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
                     tree_nodes=args.tree_nodes)
    except MMSpecError as e:
        raise flag_error(e, args) from None
    if not isinstance(args.prompt, str) or not args.prompt.strip():
        raise MMSpecError("--prompt is empty")
    if args.limit is not None and args.limit < 1:
        raise MMSpecError(f"--limit must be at least 1, got {args.limit}")
    batch = getattr(args, "batch_size", DEFAULT_BATCH_SIZE)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise MMSpecError(f"--batch-size must be a positive whole number, got {batch!r}")
    if args.workers < 1:
        raise MMSpecError(f"--workers must be at least 1, got {args.workers}")
    if not (math.isfinite(args.num_cpus_per_worker) and args.num_cpus_per_worker > 0):
        raise MMSpecError(f"--num-cpus-per-worker must be > 0, got {args.num_cpus_per_worker}")
    if not (math.isfinite(args.num_gpus_per_worker) and args.num_gpus_per_worker >= 0):
        raise MMSpecError(f"--num-gpus-per-worker must be >= 0, got {args.num_gpus_per_worker}")
    from mmspec.pipeline import check_device, check_model_path, load_dtype

    if getattr(args, "preset", None):
        from mmspec.presets import resolve_preset

        resolve_preset(args.preset)
    load_dtype(getattr(args, "dtype", None), model_device(args), getattr(args, "preset", None))  # dtype, preset
    if args.backend == "local" and getattr(args, "device_map", None) is None:
        check_device(args.device)  # (Ray workers may have devices the driver lacks)
    if getattr(args, "target", None) is not None:
        check_model_path("target", args.target)
    drafter = getattr(args, "drafter", None)
    if drafter is not None and str(drafter).lower() not in ("default", "none"):
        check_model_path("drafter", drafter)


def check_prompts(pipe, tasks: list[Task], tree_nodes: int | None = None) -> None:
    """Each distinct prompt through the target's chat template once, before the first caption: a prompt that
    cannot work (two image tokens, no chat template) is refused instead of failing on every input; so is
    ``--tree-nodes`` with a drafter that drafts chains only."""
    from mmspec.drafters import tree_kinds

    pipe.adapter.check_generation_config()
    if tree_nodes is not None and not pipe.strategy.grows_trees:
        raise MMSpecError(f"drafter kind {pipe.strategy.kind!r} does not draft trees; --tree-nodes works with "
                          f"{tree_kinds()} (or leave --tree-nodes out for a chain)",
                          code="invalid_value", param="tree_nodes")
    for prompt in dict.fromkeys(t.prompt for t in tasks):
        try:
            pipe.adapter.format_prompt(prompt)
        except MMSpecError as e:
            raise MMSpecError(f"the prompt {prompt!r} cannot be used: {e}") from None
