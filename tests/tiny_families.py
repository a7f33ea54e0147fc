"""Tiny models of more VLM families (Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, Idefics3, SmolVLM) built from configs with
random weights, a WordLevel tokenizer and the family's own processor, saved to a folder so tests load them back
through ``mmspec.load`` as a user loads a hub checkpoint. Every target has a padded vocabulary (embedding rows
beyond the tokenizer, like Qwen2-VL-7B's 152064 vs 151936). No downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from mmspec.targets.batch import TargetSession
from mmspec.tiny.common import QWEN_ADDED, QWEN_TEMPLATE, qwen_tokenizer  # noqa: F401 (re-exported for the tests)
from mmspec.tiny.common import word_tokenizer as _word_tokenizer

# ----------------------------------------------------------------------------------------------------- helpers


def _scale_language_model(modules) -> None:
    """Larger weights than the default init: varied, image-dependent greedy output far from ties."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.3)


def _finish(model, tok, folder: Path, processor) -> Path:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def copy_vision(src, dst, prefixes: tuple[str, ...]) -> None:
    """Copy the parameters whose names start with one of ``prefixes`` (vision tower, projector) from src to dst.
    ``src`` is a model or a saved folder."""
    if isinstance(src, (str, Path)):
        from transformers import AutoModelForImageTextToText

        src = AutoModelForImageTextToText.from_pretrained(src)
    sd = src.state_dict()
    with torch.no_grad():
        for name, p in dst.state_dict().items():
            if name.startswith(prefixes):
                p.copy_(sd[name])


# ---------------------------------------------------------------------------------------------- Qwen2(.5)-VL

# the Qwen tokenizer and chat template are mmspec.tiny's (imported above)
def build_tiny_qwen_vl(folder: Path, version: str = "2", vocab_pad: int = 7, seed: int = 0, hidden: int = 48,
                       layers: int = 2, vision_from=None) -> Path:
    """A Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") with M-RoPE, patch 4, merge 2 (8x8 pixels per token)."""
    from transformers import (Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_ADDED}
    heads = 4
    half = hidden // heads // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": section},
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as cls

        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as cls

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    model = cls(config).eval()
    _scale_language_model([model.model.language_model, model.lm_head])
    if vision_from is not None:
        copy_vision(vision_from, model, ("model.visual.",))
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    image_proc = Qwen2VLImageProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    video_proc = Qwen2VLVideoProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                 chat_template=QWEN_TEMPLATE)
    return _finish(model, tok, folder, processor)


def build_tiny_qwen_text_drafter(folder: Path, seed: int = 1, vocab_rows: int | None = None) -> Path:
    """A Qwen2 causal LM with the target's tokenizer (like Qwen2.5-0.5B-Instruct for Qwen2.5-VL-7B)."""
    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    cfg = Qwen2Config(vocab_size=vocab_rows or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ test helpers


def hf_greedy(pipe, image, prompt: str, max_new_tokens: int) -> list[int]:
    """The target's own ``generate(do_sample=False)`` on the processor's output for the chat-formatted prompt."""
    text = pipe.adapter.format_prompt(prompt)
    inputs = pipe.processor(images=image, text=text, return_tensors="pt")
    out = pipe.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def user(*parts) -> dict:
    """A user turn in transformers' chat-message format: a string part is text, a dict a part as it is, anything
    else an image."""
    return {"role": "user", "content": [p if isinstance(p, dict) else
                                        ({"type": "text", "text": p} if isinstance(p, str) else
                                         {"type": "image", "image": p}) for p in parts]}


def hf_chat(pipe, messages, max_new_tokens: int) -> list[int]:
    """The target's own ``generate(do_sample=False)`` on ``processor.apply_chat_template(messages,
    add_generation_prompt=True)``: what a conversation's answer must equal."""
    inputs = pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
    out = pipe.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_logits(pipe, image, prompt: str, new_ids: list[int]):
    """The target's logits (no cache, one forward over prompt + ``new_ids``) for the last len(new_ids)+1 positions."""
    text = pipe.adapter.format_prompt(prompt)
    inputs = dict(pipe.processor(images=image, text=text, return_tensors="pt"))
    n = len(new_ids)
    extra = torch.tensor([new_ids], dtype=torch.long)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra)
            inputs[key] = torch.cat([inputs[key], fill.to(inputs[key].dtype)], dim=1)
    with torch.no_grad():
        logits = pipe.target(**inputs).logits[0, -(n + 1):].float()
    return logits


# --------------------------------------------------------------------------------------- LLaVA-NeXT / OneVision

PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def build_tiny_llava_next(folder: Path, vocab_pad: int = 5, seed: int = 0, hidden: int = 48, layers: int = 2,
                          onevision: bool = False, vision_from=None) -> Path:
    """A LLaVA-NeXT (or LLaVA-OneVision) with 16-pixel tiles on an anyres grid: image-size-dependent token counts."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from tests.tiny import CHAT_TEMPLATE, make_tokenizer

    torch.manual_seed(seed)
    tok = make_tokenizer()
    if onevision:
        tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    if onevision:   # SigLIP tower (no CLS token), all patch features, as llava-onevision-qwen2
        from transformers import SiglipVisionConfig

        vision = SiglipVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2)
    else:
        vision = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    strategy = "full" if onevision else "default"
    text = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    common = dict(vision_config=vision, text_config=text, image_token_id=image_token_id, image_grid_pinpoints=PINPOINTS,
                  vision_feature_select_strategy=strategy, vision_feature_layer=-1)
    if onevision:
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration as cls,
                                  LlavaOnevisionImageProcessor as ip_cls, LlavaOnevisionProcessor as proc_cls)

        config = LlavaOnevisionConfig(**common, vision_aspect_ratio="anyres_max_9",
                                      video_token_id=tok.convert_tokens_to_ids("<video>"))
    else:
        from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration as cls,
                                  LlavaNextImageProcessor as ip_cls, LlavaNextProcessor as proc_cls)

        config = LlavaNextConfig(**common)
    model = cls(config).eval()
    _scale_language_model([model.model.language_model, model.lm_head])
    if vision_from is not None:
        copy_vision(vision_from, model, ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"))
    image_proc = ip_cls(size={"shortest_edge": 16} if not onevision else {"height": 16, "width": 16},
                        crop_size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS)
    kw = dict(image_processor=image_proc, tokenizer=tok, chat_template=CHAT_TEMPLATE,
              vision_feature_select_strategy=strategy, num_image_tokens=16) if onevision else \
        dict(image_processor=image_proc, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
             chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    if onevision:
        from transformers import LlavaOnevisionVideoProcessor

        kw["video_processor"] = LlavaOnevisionVideoProcessor(size={"height": 16, "width": 16})
    processor = proc_cls(**kw)
    return _finish(model, tok, folder, processor)


# ------------------------------------------------------------------------------- checks shared by family tests

PROMPTS = ["what color is the circle ?", "describe the image ."]
KINDS = ["text", "ngram", "none", "vlm", "vlm-own", "eagle"]


def random_eagle_head(target: Path, folder: Path, seed: int = 0) -> Path:
    """An untrained eagle head shaped for ``target`` (random weights: checks losslessness and plumbing)."""
    import mmspec
    from mmspec.drafters.eagle import EagleHead, head_config_for

    torch.manual_seed(seed)
    adapter = mmspec.load(str(target), drafter=None, drafter_kind="none").adapter
    head = EagleHead(head_config_for(adapter))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    head.save_pretrained(folder)
    return folder


def load_pipes(target: Path, drafters: dict[str, Path | None]) -> dict:
    """One pipeline per drafter kind ("vlm-own" = a vlm drafter with its own vision tower); "eagle" gets a
    random head for the target unless one is given."""
    import mmspec

    drafters = dict(drafters)
    if drafters.get("eagle") is None:
        drafters["eagle"] = random_eagle_head(target, Path(target).parent / "eagle")
    return {kind: mmspec.load(str(target), drafter=None if d is None else str(d), drafter_kind=kind.split("-")[0])
            for kind, d in drafters.items()}


def check_padded_vocabularies(pipes) -> None:
    vocab = pipes["none"].adapter.vocab_size
    assert vocab > len(pipes["none"].processor.tokenizer)
    assert pipes["text"].drafter.get_output_embeddings().weight.shape[0] < vocab
    assert pipes["vlm"].drafter.get_output_embeddings().weight.shape[0] < vocab
    assert pipes["vlm-own"].drafter.get_output_embeddings().weight.shape[0] > vocab
    assert pipes["vlm"].strategy.shared_vision and not pipes["vlm-own"].strategy.shared_vision


def check_greedy(pipe, images, k, max_new: int) -> None:
    for i, image in enumerate(images):
        prompt = PROMPTS[i % 2]
        expected = hf_greedy(pipe, image, prompt, max_new)
        res = pipe.generate(image, prompt, max_new_tokens=max_new, num_draft_tokens=k)
        assert res.token_ids == expected, (i, res.rounds)
        assert sum(len(r.emitted) for r in res.rounds) == len(res.token_ids)


def check_batch(pipe, images, k, max_new: int, batch_size: int = 3) -> None:
    """generate_batch over more inputs than ``batch_size`` (rows join mid-flight as others finish, at different
    lengths), different images (sizes, token counts) and prompts, and one unreadable input: every good row
    equals that request's own ``generate()`` at batch 1, token for token; the bad one carries its error."""
    inputs = [(image, PROMPTS[(i + j) % 2]) for i, image in enumerate(images) for j in range(2)][:5]
    inputs.insert(2, (b"not an image", PROMPTS[0]))
    expected = [None if isinstance(im, bytes) else hf_greedy(pipe, im, p, max_new) for im, p in inputs]
    results = pipe.generate_batch([im for im, _ in inputs], [p for _, p in inputs], batch_size=batch_size,
                                  max_new_tokens=max_new, num_draft_tokens=k)
    assert len(results) == len(inputs)
    for i, (res, exp) in enumerate(zip(results, expected)):
        if exp is None:
            assert res.error and "image" in res.error and res.token_ids == []
        else:
            assert res.error is None and res.token_ids == exp, (i, res.rounds)
            assert res.stats.new_tokens == len(exp) and res.stats.target_forwards == len(res.rounds)
    lengths = {len(e) for e in expected if e is not None}
    assert len(lengths) > 1 or max_new in lengths


def run_engine(pipe, jobs, max_batch: int) -> None:
    """Run prepared jobs (``pipe._job``) through one engine of the pipeline until all are done."""
    from mmspec.engine import Engine

    with torch.inference_mode():
        engine = Engine(pipe.adapter, pipe.strategy, max_batch=max_batch, policy=pipe.policy)
        for job in jobs:
            engine.add(job)
        for _ in engine.run():
            pass


def check_trees(pipe, images, max_new: int) -> None:
    """Trees of several sizes and depths, at batch 1 and batched: every output equals generate(). The larger
    tree has no probability floor, so a random drafter's tree stays bushy (branches everywhere). Then a row
    drafting trees in the same batch as one that never drafts (``num_draft_tokens=0``: it feeds nothing)."""
    prompts = [PROMPTS[i % 2] for i in range(len(images))]
    expected = [hf_greedy(pipe, im, p, max_new) for im, p in zip(images, prompts)]
    floor = pipe.strategy.tree_floor
    try:
        for nodes, depth, pipe.strategy.tree_floor in ((4, 2, floor), (12, 5, 0.0)):
            for im, p, exp in zip(images, prompts, expected):
                res = pipe.generate(im, p, max_new_tokens=max_new, tree_nodes=nodes, num_draft_tokens=depth)
                assert res.token_ids == exp, (nodes, res.rounds)
            batched = pipe.generate_batch(images, prompts, batch_size=2, max_new_tokens=max_new, tree_nodes=nodes,
                                          num_draft_tokens=depth)
            assert [r.token_ids for r in batched] == expected
        jobs = [pipe._job(im, p, dict(max_new_tokens=max_new, tree_nodes=12, num_draft_tokens=k))
                for im, p, k in zip(images[:2], prompts[:2], (4, 0))]
        run_engine(pipe, jobs, max_batch=2)
        assert [j.result.token_ids for j in jobs] == expected[:2], [j.result.error for j in jobs]
        assert any(len(r.draft_ids) > 1 for r in jobs[0].result.rounds)
        assert not any(len(r.draft_ids) for r in jobs[1].result.rounds)
    finally:
        pipe.strategy.tree_floor = floor


def check_vlm_tree_node_logits(base, images) -> None:
    """The target drafting trees for itself through the vlm kind: every fed tree node's drafter logits equal
    the target's own uncached forward over the prompt, what was emitted, and that node's path -- so each node
    sees the row's committed sequence and its own ancestors only, at the position of its depth (M-RoPE
    included). Two rows: both drafting, then one drafting while the other drafts nothing (and feeds nothing),
    then the other way round; between rounds an accepted path is committed (the nodes' slots are dropped)."""
    from unittest import mock

    import mmspec
    import mmspec.drafters.model_batch as vlm_module
    from mmspec.config import DecodeConfig
    from mmspec.drafters.base import RowSpec

    folder = base.target.config._name_or_path
    pipe = mmspec.load(folder, drafter=folder, drafter_kind="vlm", vision_cache=base.vision_cache)
    pipe.strategy.tree_floor = 0.0     # bushy trees: many branches whose nodes must not see each other
    adapter, ok = pipe.adapter, ~pipe.strategy.bad_ids
    extra = adapter.tokenizer.convert_tokens_to_ids("red")    # the "target token" after an accepted path
    inputs = [(images[0], PROMPTS[0]), (images[1], PROMPTS[1])]
    emitted = {0: [], 1: []}
    batch = pipe.strategy.batch()
    for r, (image, prompt) in enumerate(inputs):
        req = adapter.prepare(image, adapter.format_prompt(prompt))
        adapter.image_features(req)
        batch.add(r, RowSpec(req, DecodeConfig(tree_nodes=10)))
    grow = vlm_module.grow_tree

    def same(got, r, path):
        ref = hf_logits(pipe, inputs[r][0], inputs[r][1], emitted[r] + path)[-1]
        assert torch.allclose(got[ok], ref[ok], atol=1e-4, rtol=1e-4), (r, path)

    checked = 0
    for ks in ({0: 3, 1: 3}, {0: 3, 1: 0}, {0: 0, 1: 4}):
        calls = []

        def recording(first, expand, *args, **kw):
            def recorded(feeds):
                out = expand(feeds)
                calls.append((feeds, out))
                return out
            calls.append(first)
            return grow(first, recorded, *args, **kw)

        with torch.inference_mode(), mock.patch.object(vlm_module, "grow_tree", recording):
            drafts = batch.propose(ks, {0: 10, 1: 10})
            drafting = [r for r, k in ks.items() if k]
            first, *fed = calls
            assert fed, "the tree grew past its first depth"
            for i, r in enumerate(drafting):
                same(first[i], r, [])
                paths = {}
                for feeds, out in fed:
                    for j, (node, tok, parent, _) in enumerate(feeds[i]):
                        paths[node] = (paths[parent] if parent >= 0 else []) + [tok]
                        same(out[i][j], r, paths[node])
                        checked += 1
        results = {}
        for r in ks:
            path = drafts[r].ids[:1].tolist()       # the first node accepted, then the target's token
            results[r] = (len(path), path + [extra])
            emitted[r] += path + [extra]
        batch.update(results)
    assert checked > 6


def check_session_logits(pipe, image, prompt=PROMPTS[1]) -> None:
    """Session logits over several new positions at once, and again after a rollback, equal HF's uncached forward."""
    adapter = pipe.adapter
    # any continuation works; image placeholders would be read as image slots by an uncached forward
    new = [t for t in hf_greedy(pipe, image, prompt, 12) if t not in adapter.image_token_ids][:6]
    new += [7, 8, 9][: max(0, 3 - len(new))]
    ref = hf_logits(pipe, image, prompt, new)               # [len(new)+1, vocab]
    req = adapter.prepare(image, adapter.format_prompt(prompt))
    adapter.image_features(req)
    with torch.inference_mode():
        sess = TargetSession(adapter, req)
        base = sess.length
        got = sess.forward(torch.tensor([req.prompt_ids[-1]] + new))
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
        sess.rollback(base + 3)                              # reject the tail, verify it again
        again = sess.forward(torch.tensor(new[2:]))
        assert torch.allclose(again, ref[3:], atol=1e-4, rtol=1e-4)
        assert sess.length == base + 1 + len(new)


def check_cache_hit(pipe, kind: str, image) -> None:
    before = len(pipe.vision_cache)
    first = pipe.generate(image, PROMPTS[0], max_new_tokens=4)
    second = pipe.generate(image, PROMPTS[1], max_new_tokens=4)
    assert not first.stats.vision_cache_hit and second.stats.vision_cache_hit
    # a drafter with the target's vision side reuses its features; one with its own caches them under its key
    assert len(pipe.vision_cache) - before == (2 if kind == "vlm-own" else 1)


def check_self_drafting(base, image, max_new: int) -> None:
    """The target drafting for itself through the vlm kind: drafter-side prompt, image and positions are right."""
    import mmspec

    folder = base.target.config._name_or_path
    pipe = mmspec.load(folder, drafter=folder, drafter_kind="vlm", vision_cache=base.vision_cache)
    assert pipe.strategy.shared_vision
    res = pipe.generate(image, PROMPTS[1], max_new_tokens=max_new, num_draft_tokens=4)
    assert res.token_ids == hf_greedy(base, image, PROMPTS[1], max_new)
    # every rejection is at a token the drafter may not propose (padding rows, image placeholders)
    bad = set(torch.nonzero(pipe.strategy.bad_ids).flatten().tolist())
    for r in res.rounds:
        if r.target_token is not None and r.n_accepted < len(r.draft_ids):
            assert r.target_token in bad, res.rounds
    assert res.stats.mean_accepted > 1.5 or res.stats.stop_reason == "eos"


# ------------------------------------------------------------------------------------------ Idefics3 / SmolVLM

IDEFICS_ADDED = (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                 + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
IDEFICS_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER : {% for c in m['content'] %}"
                    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
                    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                    "<end_of_utterance> {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}")


def idefics_tokenizer() -> PreTrainedTokenizerFast:
    return _word_tokenizer(["<unk>", "<s>", "</s>", "<pad>"], IDEFICS_ADDED, unk="<unk>", bos="<s>", eos="</s>",
                           pad="<pad>", template=IDEFICS_TEMPLATE)


def build_tiny_idefics3(folder: Path, smolvlm: bool = False, vocab_pad: int = 5, seed: int = 0, hidden: int = 48,
                        layers: int = 2, vision_from=None) -> Path:
    """An Idefics3 (or SmolVLM): images split into 16-pixel tiles (up to 2x2) plus a global tile, 4 tokens each."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    tok = idefics_tokenizer()
    vision = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    text = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    image_kw = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 16}, do_image_splitting=True)
    common = dict(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                  image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    if smolvlm:
        import importlib.util

        from transformers import (Idefics3ImageProcessor, Idefics3Processor, SmolVLMConfig,
                                  SmolVLMForConditionalGeneration as cls, SmolVLMImageProcessor, SmolVLMProcessor,
                                  SmolVLMVideoProcessor)

        config = SmolVLMConfig(**common)
        if importlib.util.find_spec("num2words") is not None:
            # video frames are one square tile each, the model's 16-pixel image size (the defaults, 364, are the
            # real model's and break the tiny one's generate())
            video = SmolVLMVideoProcessor(size={"longest_edge": 16}, max_image_size={"longest_edge": 16})
            processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**image_kw), tokenizer=tok,
                                         video_processor=video, image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
        else:
            # SmolVLMProcessor needs the optional ``num2words`` package (video timestamps); for images it lays out
            # tiles exactly as Idefics3Processor does, which the model is then saved with.
            processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**image_kw), tokenizer=tok,
                                          image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    else:
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration as cls, Idefics3ImageProcessor,
                                  Idefics3Processor)

        config = Idefics3Config(**common)
        processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**image_kw), tokenizer=tok,
                                      image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    model = cls(config).eval()
    _scale_language_model([model.model.text_model, model.lm_head])
    if vision_from is not None:
        copy_vision(vision_from, model, ("model.vision_model.", "model.connector."))
    return _finish(model, tok, folder, processor)
