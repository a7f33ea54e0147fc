"""Requests as conversations (issue 28): no image, several images, several turns.

Greedy output equals the target's own ``generate()`` on ``processor.apply_chat_template(messages,
add_generation_prompt=True)``, token for token, for: text only, 2 and 3 images, 2- and 3-turn conversations, with
the drafter kinds that see images (eagle, vlm) and those that do not (text, ngram), batched with single-image rows
and with trees; for each other family (LLaVA-OneVision, Qwen2-VL, Idefics3) a multi-image, a multi-turn and a
text-only case. The image cache works per image. Bad conversations get an ``MMSpecError`` naming the part, before
any vision work. Tiny random models, float32, offline.
"""

from __future__ import annotations

import pytest
from transformers import AutoProcessor

import mmspec
from mmspec.errors import MMSpecError
from tests.tiny import build_tiny_llava, build_tiny_text_drafter, sample_image
from tests.tiny_families import (build_tiny_idefics3, build_tiny_llava_next, build_tiny_qwen_vl, load_pipes,
                                 hf_chat, random_eagle_head, user)

MAX_NEW = 10
# LLaVA's tiny template drops assistant turns; this one renders every turn (so multi-turn prompts differ)
TURNS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }} "
                  "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
                  "{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT :{% endif %}")


def ims():
    return [sample_image(1, 40), sample_image(2, 24), sample_image(3, 48).resize((40, 24))]


def conversations() -> dict:
    a, b, c = ims()
    return {
        "text only": [user("describe the image .")],
        "two images": [user(a, b, "what color is the circle ?")],
        "three images": [user(a, "describe", b, c, "the image .")],
        "two turns": [user(a, "what color is the circle ?"), {"role": "assistant", "content": "red circle"},
                      user("describe the image .")],
        "three turns": [{"role": "system", "content": "describe"}, user(a, "what color is the circle ?"),
                        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                        user(b, "describe the image ."), {"role": "assistant", "content": "blue square"},
                        user("what color is the circle ?")],
    }


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv-llava")
    target = build_tiny_llava(root / "target")
    proc = AutoProcessor.from_pretrained(target)
    proc.chat_template = TURNS_TEMPLATE
    proc.save_pretrained(target)
    vlm = build_tiny_llava(root / "vlm", seed=3, layers=1, vision_from=target)
    vlm_proc = AutoProcessor.from_pretrained(vlm)
    vlm_proc.chat_template = TURNS_TEMPLATE
    vlm_proc.save_pretrained(vlm)
    return load_pipes(target, {"text": build_tiny_text_drafter(root / "text"), "ngram": None, "vlm": vlm,
                               "eagle": random_eagle_head(target, root / "eagle")})


@pytest.fixture(scope="module")
def llava_refs(llava):
    pipe = llava["ngram"]
    refs = {name: hf_chat(pipe, conv, MAX_NEW) for name, conv in conversations().items()}
    assert len({tuple(r) for r in refs.values()}) > 2   # the shapes give different answers
    return refs


@pytest.mark.parametrize("kind", ["text", "ngram", "vlm", "eagle"])
def test_every_shape_equals_generate(llava, llava_refs, kind):
    pipe = llava[kind]
    for name, conv in conversations().items():
        res = pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == llava_refs[name], (kind, name, res.rounds)
        ids = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
        assert res.prompt_ids == ids[0].tolist()


def test_generate_takes_none_and_lists(llava, llava_refs):
    pipe = llava["eagle"]
    a, b, c = ims()
    text = pipe.generate(None, "describe the image .", max_new_tokens=MAX_NEW, num_draft_tokens=3)
    assert text.token_ids == llava_refs["text only"]
    two = pipe.generate([a, b], "what color is the circle ?", max_new_tokens=MAX_NEW)
    assert two.token_ids == llava_refs["two images"]
    # image tokens in the prompt mark where each image goes
    three = pipe.generate([a, b, c], "<image> describe <image> <image> the image .", max_new_tokens=MAX_NEW)
    assert three.token_ids == llava_refs["three images"]
    events = list(pipe.stream(conversations()["two turns"], max_new_tokens=MAX_NEW))
    assert events[-1].done and events[-1].result.token_ids == llava_refs["two turns"]


@pytest.mark.parametrize("kind,tree", [("text", None), ("eagle", None), ("vlm", 6), ("eagle", 6)])
def test_batch_mixes_shapes_with_single_image_rows(llava, llava_refs, kind, tree):
    pipe = llava[kind]
    a, b, _ = ims()
    convs = conversations()
    rows = [(convs["two images"], None), (a, "describe the image ."), (convs["text only"], None),
            ([user(b"not an image", "hi")], None), (convs["three turns"], None), (b, "what color is the circle ?"),
            (convs["three images"], None), (None, "describe the image ."), (convs["two turns"], None)]
    expected = [llava_refs["two images"], hf_chat(pipe, [user(a, "describe the image .")], MAX_NEW),
                llava_refs["text only"], None, llava_refs["three turns"],
                hf_chat(pipe, [user(b, "what color is the circle ?")], MAX_NEW), llava_refs["three images"],
                llava_refs["text only"], llava_refs["two turns"]]
    results = pipe.generate_batch([r[0] for r in rows], [r[1] for r in rows], batch_size=4, max_new_tokens=MAX_NEW,
                                  tree_nodes=tree)
    for i, (res, exp) in enumerate(zip(results, expected)):
        if exp is None:
            assert res.error and "messages[0].content[0]" in res.error and not res.token_ids
        else:
            assert res.error is None and res.token_ids == exp, (i, res.rounds)


def test_submit_takes_a_conversation(llava, llava_refs):
    from mmspec.scheduler import iter_job_events

    pipe = llava["text"]
    job = pipe.submit(conversations()["two images"], max_new_tokens=MAX_NEW)
    events = list(iter_job_events(job))
    assert events[-1].result.token_ids == llava_refs["two images"]


def test_image_cache_works_per_image(llava):
    pipe = llava["ngram"]
    pipe.vision_cache.clear()
    a, b, c = ims()
    first = pipe.chat([user(a, b, "describe the image .")], max_new_tokens=2)
    assert not first.stats.vision_cache_hit
    swapped = pipe.chat([user(b, a, "describe the image .")], max_new_tokens=MAX_NEW)
    assert swapped.stats.vision_cache_hit   # both images were cached one by one
    assert swapped.token_ids == hf_chat(pipe, [user(b, a, "describe the image .")], MAX_NEW)
    assert pipe.generate(b, "describe the image .", max_new_tokens=1).stats.vision_cache_hit
    assert not pipe.chat([user(a, c, "describe the image .")], max_new_tokens=1).stats.vision_cache_hit
    assert pipe.generate(c, "describe the image .", max_new_tokens=1).stats.vision_cache_hit


def bad_conversations():
    a = ims()[0]
    return {
        "empty": ([], "messages", "empty"),
        "not messages": ([{"content": "hi"}], "messages[0].role", "role"),
        "ends on assistant": ([user(a, "hi"), {"role": "assistant", "content": "x"}], "messages[1]", "assistant"),
        "image in assistant turn": ([{"role": "assistant", "content": [{"type": "image", "image": a}]}, user("hi")],
                                    "messages[0].content[0]", "user turns"),
        "undecodable image": ([user(a, b"\x89PNG broken", "hi")], "messages[0].content[1]", "image"),
        "missing file": ([user({"type": "image", "path": "/no/such.png"}, "hi")], "messages[0].content[0]",
                         "not found"),
        "unknown role": ([{"role": "tool", "content": "x"}], "messages[0].role", "role"),
        "unknown part": ([user({"type": "audio", "audio": "x.wav"}, "hi")], "messages[0].content[0]", "type"),
        "video": ([user({"type": "video", "video": [a, a]}, "hi")], "messages[0].content[0]", "video"),
        "empty last turn": ([user()], "messages[0].content", "empty"),
        "remote url": ([user({"type": "image", "url": "https://example.com/x.png"}, "hi")], "messages[0].content[0]",
                       "http"),
    }


@pytest.mark.parametrize("name", list(bad_conversations()))
def test_bad_conversations_are_refused_naming_the_part(llava, name):
    conv, param, words = bad_conversations()[name]
    pipe = llava["ngram"]
    misses = pipe.vision_cache.misses
    with pytest.raises(MMSpecError, match=words) as info:
        pipe.chat(conv, max_new_tokens=2)
    assert info.value.param == param
    assert pipe.vision_cache.misses == misses      # refused before any vision work


def test_too_many_images_and_context_are_refused_up_front(llava):
    pipe = llava["ngram"]
    a = ims()[0]
    misses = pipe.vision_cache.misses
    # 20 images of 17 placeholders each: past the tiny target's 256-token context
    with pytest.raises(MMSpecError) as info:
        pipe.chat([user(*[a] * 20, "hi")], max_new_tokens=2)
    assert info.value.code == "context_length_exceeded"
    pipe.max_images = 2
    try:
        with pytest.raises(MMSpecError) as info:
            pipe.chat([user(a, a, a, "hi")])
        assert info.value.code == "too_many_images"
        with pytest.raises(MMSpecError) as info:
            pipe.generate([a, a, a], "hi")
        assert info.value.code == "too_many_images"
    finally:
        pipe.max_images = None
    with pytest.raises(MMSpecError, match="2 times"):
        pipe.generate([a, a, a], "<image> <image> hi")
    assert pipe.vision_cache.misses == misses
    results = pipe.generate_batch([[user(*[a] * 20, "hi")], a], [None, "hi"], max_new_tokens=2)
    assert "context" in results[0].error and results[1].error is None


def test_vlm_drafter_with_a_shorter_context(llava, tmp_path, monkeypatch):
    """A request that fits the target's context (256) but not a vlm drafter's (48) gets the target's exact answer,
    its row drafting nothing (and the drafter encoding none of its images); a row that outgrows the drafter's
    context drafts until there; batched and with trees too. Never an error for a request the target serves."""
    target = llava["ngram"].target.config._name_or_path
    short = build_tiny_llava(tmp_path / "short", seed=3, layers=1, max_positions=48)   # its own vision tower
    pipe = mmspec.load(target, drafter=str(short), drafter_kind="vlm")
    assert pipe.strategy.context_length == 48 and not pipe.strategy.shared_vision
    a, b, c = ims()
    convs = [[user(a, "describe the image .")],                 # 25 tokens: fits
             [user(a, b, "describe the image .")],              # 42: fits, then outgrows the drafter's context
             [user(a, b, c, "what color is the circle ?")]]     # 61: only the target's context holds it
    lengths = [len(llava["ngram"].chat(conv, max_new_tokens=1).prompt_ids) for conv in convs]
    assert lengths[0] + 20 < 48 < lengths[1] + 20 and lengths[1] < 48 < lengths[2] < 256, lengths
    expected = [hf_chat(pipe, conv, 20) for conv in convs]
    encoded = []
    features = pipe.strategy.adapter.image_features
    monkeypatch.setattr(pipe.strategy.adapter, "image_features", lambda req: encoded.append(len(req.images))
                        or features(req))
    for conv, exp in zip(convs, expected):
        for tree in (None, 6):
            res = pipe.chat(conv, max_new_tokens=20, num_draft_tokens=3, tree_nodes=tree)
            assert res.error is None and res.token_ids == exp, (len(conv[0]["content"]), tree, res.rounds)
            assert (res.stats.drafted_tokens > 0) == (conv is not convs[2]), res.rounds
    assert 3 not in encoded    # the drafter never encoded the long request's images
    results = pipe.generate_batch(convs * 2, batch_size=4, max_new_tokens=20, num_draft_tokens=3)
    assert [r.error for r in results] == [None] * 6 and [r.token_ids for r in results] == expected * 2


# ----- the other families ---------------------------------------------------------------------------------
FAMILIES = {
    "llava_onevision": lambda root, **kw: build_tiny_llava_next(root, onevision=True, **kw),
    "qwen2_vl": lambda root, **kw: build_tiny_qwen_vl(root, version="2", **kw),
    "idefics3": lambda root, **kw: build_tiny_idefics3(root, **kw),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_multi_image_multi_turn_and_text_only(tmp_path, family):
    build = FAMILIES[family]
    target = build(tmp_path / "target", seed=0)
    vlm = build(tmp_path / "vlm", seed=3, layers=1, vision_from=target)
    pipes = load_pipes(target, {"ngram": None, "vlm": vlm})
    a, b, c = ims()
    convs = {"two images": [user(a, b, "what color is the circle ?")],
             "two turns": [user(c, "describe the image ."), {"role": "assistant", "content": "red circle"},
                           user(a, "what color is the circle ?")],
             "text only": [user("describe the image .")]}
    refs = {name: hf_chat(pipes["ngram"], conv, MAX_NEW) for name, conv in convs.items()}
    for kind in ("vlm", "eagle"):
        for name, conv in convs.items():
            res = pipes[kind].chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3)
            assert res.token_ids == refs[name], (family, kind, name, res.rounds)
    # batched with a one-image row, and a tree
    one = hf_chat(pipes["vlm"], [user(a, "describe the image .")], MAX_NEW)
    results = pipes["vlm"].generate_batch([convs["two images"], a, convs["text only"]],
                                          [None, "describe the image .", None], batch_size=3, max_new_tokens=MAX_NEW,
                                          tree_nodes=6)
    assert [r.token_ids for r in results] == [refs["two images"], one, refs["text only"]]
