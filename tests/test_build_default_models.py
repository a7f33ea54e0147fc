"""Building blocks of the three-stage training of the bundled target (fast: random weights, no training)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random

import pytest
import torch

from demos import build_default_models as b
from demos.build import common, drafter_stage, export
from demos.build import evaluate as ev
from demos.build import target_stage as ts
from demos.build import vision_stage as vs
from vision import scenes


@pytest.fixture(scope="module")
def setup():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    processor = common.build_processor()
    model = LlavaForConditionalGeneration(common.target_config(processor.tokenizer)).eval()
    return model, processor


def test_cell_labels_match_the_scene():
    for seed in range(1000, 1020):
        lab = vs.cell_labels(seed)
        objs = {o.cell: o for o in scenes.scene_for_seed(seed).objects}
        assert lab[:, 3].tolist() == list(range(9))
        for c in range(9):
            if c in objs:
                o = objs[c]
                assert scenes.SHAPES[lab[c, 0] - 1] == o.shape
                assert list(scenes.COLORS)[lab[c, 1] - 1] == o.color
                assert list(scenes.SIZES)[lab[c, 2] - 1] == o.size
            else:
                assert lab[c, :3].tolist() == [0, 0, 0]


def test_code_targets_sum_one_code_per_head():
    codes = vs.cell_codes(16)
    lab = torch.tensor([[[2, 3, 1, 4]]])
    off = [0, vs.CELL_HEADS[0], sum(vs.CELL_HEADS[:2]), sum(vs.CELL_HEADS[:3])]
    want = codes[2 + off[0]] + codes[3 + off[1]] + codes[1 + off[2]] + codes[4 + off[3]]
    assert torch.allclose(vs.code_targets(codes, lab)[0, 0], want)


def test_scale_tower_output_scales_features_exactly(setup):
    model, processor = setup
    tower = model.model.vision_tower
    pix = vs.heldout_pixels(processor, range(3))
    with torch.no_grad():
        before = vs.image_features(tower, pix)
    saved = {k: v.clone() for k, v in tower.state_dict().items()}
    try:
        vs.scale_tower_output(tower, 8.0)
        with torch.no_grad():
            after = vs.image_features(tower, pix)
        assert torch.allclose(after, 8 * before, rtol=1e-4, atol=1e-4)
    finally:
        tower.load_state_dict(saved)


def test_answer_loss_with_cached_features_equals_llava_loss(setup):
    model, processor = setup
    seeds = list(range(1000, 1004))
    pix = vs.heldout_pixels(processor, seeds)
    pool = {"seeds": seeds, "pixels": pix}
    ids, mask, labels, j = common.sample_batch(pool, common.PromptCache(processor), random.Random(0), 6)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix[j], labels=labels).loss
        feats = vs.image_features(model.model.vision_tower, pix)
        ours = ts.answer_loss(model, ids, mask, labels, feats[j])
    assert torch.allclose(ref, ours, atol=1e-5)


def test_train_target_refuses_without_a_vision_tower(tmp_path):
    with pytest.raises(SystemExit, match="train-vision"):
        b.main(["--workdir", str(tmp_path), "train-target", "--steps", "1"])


def test_tune_questions_refuses_without_a_stage2_checkpoint_before_any_work(tmp_path):
    (tmp_path / "vision_tower.pt").write_bytes(b"")  # present; never read when the check fails first
    with pytest.raises(SystemExit, match="train-target"):
        b.main(["--workdir", str(tmp_path), "tune-questions", "--steps", "1"])
    assert not list(tmp_path.glob("pool_*.pt"))  # failed before rendering the pool


def test_per_example_loss_weighs_every_answer_equally(setup):
    model, processor = setup
    seeds = list(range(1000, 1004))
    pix = vs.heldout_pixels(processor, seeds)
    ids, mask, labels, j = common.sample_batch({"seeds": seeds, "pixels": pix}, common.PromptCache(processor),
                                          random.Random(0), 6)
    with torch.no_grad():
        feats = vs.image_features(model.model.vision_tower, pix)[j]
        each = torch.stack([ts.answer_loss(model, ids[i:i + 1], mask[i:i + 1], labels[i:i + 1], feats[i:i + 1])
                            for i in range(len(ids))])
        batch = ts.answer_loss(model, ids, mask, labels, feats, per_example=True)
    assert torch.allclose(batch, each.mean(), atol=1e-5)


def test_length_chunks_give_the_whole_batchs_loss(setup):
    """Training splits each batch by length; weighted as in the loop, the chunks' losses are the batch's."""
    model, processor = setup
    seeds = list(range(1000, 1010))
    pix = vs.heldout_pixels(processor, seeds)
    batch = common.sample_batch({"seeds": seeds, "pixels": pix}, common.PromptCache(processor), random.Random(3), 16)
    ids, mask, labels, j = batch
    with torch.no_grad():
        feats = vs.image_features(model.model.vision_tower, pix)
        for per_example in (False, True):
            chunks = ts.length_chunks(*batch, per_example=per_example)
            assert len(chunks) == 2 and sum(len(c[0]) for c in chunks) == len(ids)
            assert max(c[0].shape[1] for c in chunks) == int(mask.sum(1).max()) > min(c[0].shape[1] for c in chunks)
            whole = ts.answer_loss(model, ids, mask, labels, feats[j], per_example=per_example)
            parts = sum(share * ts.answer_loss(model, c_ids, c_mask, c_labels, feats[c_j], per_example=per_example)
                        for c_ids, c_mask, c_labels, c_j, share in chunks)
            assert torch.allclose(whole, parts, atol=1e-5)


def test_all_runs_every_stage_with_its_parser_defaults(monkeypatch, tmp_path):
    import mmspec.cli

    calls = []
    for module, name in ((vs, "cmd_train_vision"), (ts, "cmd_train_target"), (export, "cmd_export"),
                         (drafter_stage, "cmd_distill"), (export, "cmd_images"), (ev, "cmd_eval")):
        monkeypatch.setattr(module, name, lambda a: calls.append(a))
    monkeypatch.setattr(mmspec.cli, "main", lambda argv: calls.append(argv) or 0)
    b.main(["--workdir", str(tmp_path), "--seed", "3", "--threads", "1", "all", "--target-minutes", "7",
            "--tune-minutes", "9", "--resume"])
    *stages, bench = calls
    assert [a.cmd for a in stages] == ["train-vision", "train-target", "tune-questions", "export", "distill-drafter",
                                       "export", "distill-visual", "export", "distill-eagle", "export", "images", "eval"]
    assert all(a.workdir == str(tmp_path) and a.seed == 3 and a.threads == 1 for a in stages)
    vision, target, tune = stages[:3]
    assert vision.steps == 400 and vision.resume and target.resume and tune.resume
    assert (target.max_minutes, target.pointer_weight, target.lr) == (7, 0.0, 1.5e-3)
    assert (tune.max_minutes, tune.pointer_weight, tune.lr) == (9, 4.0, 1.2e-3)
    assert (tune.prev_pointer, tune.lookup_lr_mult, target.prev_pointer, target.lookup_lr_mult) == (True, 5, False, 1)
    assert (target.kind_weights, tune.kind_weights) == (common.KIND_WEIGHTS, common.QUESTION_WEIGHTS)
    # the target is exported before the drafters learn from it, the text drafter before the visual one starts from it
    assert [stages[i].what for i in (3, 5, 7, 9)] == ["target", "drafter", "visual-drafter", "eagle3-drafter"]
    assert [stages[i].kind for i in (4, 6, 8)] == ["text", "visual", "eagle"]
    assert (stages[11].method, stages[11].n, stages[11].acceptance) == ("forced", 200, 50)
    # speed: the engine's own benchmark, last
    assert bench[:1] == ["bench"]
    args = mmspec.cli.build_parser(bench).parse_args(bench)
    assert (args.threads, args.json, args.n) == (1, f"{tmp_path}/bench.json", 12)
    calls.clear()
    b.main(["--workdir", str(tmp_path), "all", "--tune-minutes", "0"])
    assert "tune-questions" not in [a.cmd for a in calls[:-1]] and not calls[0].resume


def test_distill_stages_run_mmspec_train_drafter_with_the_recorded_settings(monkeypatch, tmp_path):
    import json

    import mmspec.cli

    seen = []
    monkeypatch.setattr(mmspec.cli, "main", lambda argv: seen.append(argv) or 0)
    b.main(["--workdir", str(tmp_path), "--seed", "5", "distill-drafter"])
    b.main(["--workdir", str(tmp_path), "distill-visual", "--train-drafter-flags=--resume --loss tvd"])
    b.main(["--workdir", str(tmp_path), "distill-eagle", "--out", str(tmp_path / "e"), "--steps", "7"])
    text, visual, eagle = (mmspec.cli.build_parser(argv).parse_args(argv) for argv in seen)
    assert [a.command for a in (text, visual, eagle)] == ["train-drafter"] * 3
    assert (text.kind, text.out, text.scenes, text.heldout, text.steps, text.batch_size, text.lr,
            text.max_new_tokens, text.seed) == ("text", str(tmp_path / "text-drafter"), 60, 100, 400, 64, 3e-3, 48, 5)
    # the target answers with the weightless n-gram drafter: nothing depends on the drafters being rebuilt
    assert all((a.drafter, a.drafter_kind, a.target) == ("none", "ngram", None) for a in (text, visual, eagle))
    # the text drafter starts fresh, in the shipped text drafter's shape
    assert text.init_drafter == str(tmp_path / "text-drafter-init")
    fresh = json.loads((tmp_path / "text-drafter-init" / "config.json").read_text())
    shipped = json.loads((scenes.ROOT / "assets" / "models" / "text-drafter" / "config.json").read_text())
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "vocab_size", "tie_word_embeddings", "eos_token_id", "pad_token_id")
    assert {k: fresh[k] for k in shape} == {k: shipped[k] for k in shape}
    # the visual one from train-drafter's default (the bundled text drafter), with the card's flags
    assert (visual.kind, visual.out, visual.scenes, visual.heldout, visual.steps, visual.batch_size,
            visual.num_visual_tokens, visual.max_new_tokens, visual.init_drafter) == (
        "visual", str(tmp_path / "visual-drafter"), 250, 100, 400, 16, 4, 48, None)
    assert visual.resume and visual.loss == "tvd"
    assert (eagle.kind, eagle.out, eagle.steps) == ("eagle", str(tmp_path / "e"), 7)
    monkeypatch.setattr(mmspec.cli, "main", lambda argv: 2)
    with pytest.raises(SystemExit, match="train-drafter --kind eagle failed"):
        b.main(["--workdir", str(tmp_path), "distill-eagle"])


def test_export_copies_the_trained_drafters_without_their_data(monkeypatch, tmp_path):
    work, models = tmp_path / "work", tmp_path / "models"
    files = {"text-drafter": ["config.json", "model.safetensors", "tokenizer.json", "train_report.json"],
             "eagle-drafter": ["eagle_config.json", "model.safetensors", "train_report.json"]}
    for folder, names in files.items():
        (work / folder / "distill" / "text").mkdir(parents=True)
        for name in names + ["checkpoint.pt", ".mmspec-output"]:
            (work / folder / name).write_text(folder + name)
    monkeypatch.setattr(export, "MODELS", models)
    b.main(["--workdir", str(work), "export", "--what", "eagle-drafter"])
    assert sorted(p.name for p in models.iterdir()) == ["eagle-drafter"]
    b.main(["--workdir", str(work), "export"])  # no target_fp32 in the workdir: only the drafters
    assert sorted(p.name for p in models.iterdir()) == ["eagle-drafter", "text-drafter"]
    for folder, names in files.items():
        assert sorted(p.name for p in (models / folder).iterdir()) == sorted(names)
        assert (models / folder / "model.safetensors").read_text() == folder + "model.safetensors"


def test_eval_measures_acceptance_through_the_engine(capsys):
    b.main(["--threads", "1", "eval", "--n", "1", "--method", "forced", "--acceptance", "1"])
    out = capsys.readouterr().out
    assert "held-out scenes 0..0 (5 prompts)" in out and "text drafter" in out
    rows = [line for line in out.splitlines() if "tokens per target forward" in line]
    assert [r.split()[0] for r in rows] == ["caption", "questions"]
    assert all(r.endswith("outputs differing from the target 0") for r in rows)


def test_kind_weights_flag_parses_and_rejects_bad_input(capsys):
    args = b.build_parser().parse_args(["tune-questions", "--kind-weights", "yesno=0.5, position=.25"])
    assert args.kind_weights == {"yesno": 0.5, "position": 0.25}
    for bad, why in (("colour=1", "unknown prompt kind 'colour'"), ("yesno", "not KIND=WEIGHT"),
                     ("yesno=-1", "negative weight"), ("yesno=0", "must not all be 0")):
        with pytest.raises(SystemExit):
            b.build_parser().parse_args(["train-target", "--kind-weights", bad])
        assert why in capsys.readouterr().err
    for bad in ("0", "-2", "fast"):
        with pytest.raises(SystemExit):
            b.build_parser().parse_args(["tune-questions", "--lookup-lr-mult", bad])
        assert "--lookup-lr-mult" in capsys.readouterr().err


def test_pointer_targets_point_at_the_named_objects_cell(setup):
    model, processor = setup
    tok = processor.tokenizer
    seeds = list(range(1000, 1060))
    pool = {"seeds": seeds, "pixels": torch.zeros(len(seeds))}
    ids, mask, labels, j = common.sample_batch(pool, common.PromptCache(processor), random.Random(0), 120,
                                          kind_weights=common.QUESTION_WEIGHTS)
    rows = [seeds[i] for i in j.tolist()]
    ptr = ts.pointer_targets(ids, labels, rows, tok, model.config.image_token_id)
    assert len(ptr["noun"]) > 30 and ptr["prev"] == []
    # --prev-pointer: the same targets, plus each colour-naming question's noun -> the colour word before it
    with_prev = ts.pointer_targets(ids, labels, rows, tok, model.config.image_token_id, prev=True)
    assert {k: v for k, v in with_prev.items() if k != "prev"} == {k: v for k, v in ptr.items() if k != "prev"}
    named = {(r, p) for r, p, _ in ptr["noun"]
             if tok.convert_ids_to_tokens(int(ids[r, p - 1])) in scenes.COLORS}
    assert named and {(r, p) for r, p, _ in with_prev["prev"]} == named
    assert all(k == p - 1 for _, p, k in with_prev["prev"])
    image_pos = (ids[0] == model.config.image_token_id).nonzero().flatten().tolist()
    no_rows = set()
    for r, p, k in ptr["noun"]:
        words = tok.convert_ids_to_tokens(ids[r, :p + 1].tolist())
        objects = scenes.scene_for_seed(rows[r]).objects
        if k == 0:  # "Is there a blue star?" with no blue star: BOS
            assert words[-3:-2] == ["a"] and not [o for o in objects if (o.color, o.shape) == tuple(words[-2:])]
            no_rows.add(r)
            continue
        cell = image_pos.index(k)
        [obj] = [o for o in objects if o.cell == cell]
        assert obj.shape == words[-1]
        if words[-2] in scenes.COLORS:  # "Where is the red square?", "Is there a red square?"
            assert obj.color == words[-2]
    # every answer word of those questions (not the EOS) is predicted at a pointed position
    nouns = {r: k for r, _, k in ptr["noun"]}
    for r, q, k in ptr["answer"]:
        assert k == nouns[r] and labels[r, q + 1] not in (-100, tok.eos_token_id)
    n_answer_words = sum(int((labels[r] != -100).sum()) - 1 for r in nouns)
    assert len(ptr["answer"]) == n_answer_words
    # colour and position questions always name one object, "no" questions point at BOS; captions and counts
    # get no pointer
    assert no_rows
    for r in range(len(ids)):
        answer = tok.decode(ids[r][labels[r] != -100], skip_special_tokens=True).strip()
        if r in no_rows:
            assert answer == "no"
        elif r in nouns:
            assert answer in scenes.COLORS or answer in scenes.POSITIONS or answer == "yes"
        else:
            assert answer not in scenes.COLORS and answer not in scenes.POSITIONS and answer != "no"


def test_pointer_loss_is_small_only_when_the_head_looks_there():
    att = [torch.full((1, 4, 5, 5), 0.01) for _ in range(9)]
    targets = {"noun": [(0, 4, 2)], "answer": [(0, 3, 2)], "prev": [(0, 2, 2)]}
    far = ts.pointer_loss(att, targets)
    for name, (layer, head) in ts.POINTER_HEADS.items():
        q = targets[name][0][1]
        att[layer][0, head, q, 2] = 0.99
    near = ts.pointer_loss(att, targets)
    assert near < 0.02 < far


def test_noun_head_looks_sorts_the_attention_by_what_is_there(setup):
    _, processor = setup
    exs = [e for e in common.heldout_examples(12) if e.kind in ("position", "yesno")]
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    layer, head = ts.POINTER_HEADS["noun"]

    class LooksAtTheFirstCell:  # every query puts all its weight on the image token of grid cell 0
        config = type("C", (), {"image_token_id": image_token_id})

        def __call__(self, input_ids, **_):
            att = torch.zeros(len(input_ids), 4, input_ids.shape[1], input_ids.shape[1])
            for r in range(len(input_ids)):
                att[r, head, :, (input_ids[r] == image_token_id).nonzero()[0, 0]] = 1.0
            return type("O", (), {"attentions": [att] * (layer + 1)})

    want = {}
    for e in exs:
        color, shape = e.prompt.rstrip("?").split()[-2:]
        [o] = [o for o in e.scene.objects if o.cell == 0] or [None]
        place = ("empty cell" if o is None else "both match" if (o.color, o.shape) == (color, shape) else
                 "same shape" if o.shape == shape else "same colour" if o.color == color else "other object")
        group = "position" if e.kind == "position" else f"yesno-{e.answer}"
        want.setdefault(group, []).append(place)
    looks = ev.noun_head_looks(LooksAtTheFirstCell(), processor, exs, batch_size=5)
    assert set(looks) == set(want)
    for group, places in want.items():
        for place in ev.LOOK_PLACES:
            assert looks[group][place] == pytest.approx(places.count(place) / len(places))


def test_noun_head_looks_accounts_for_all_the_attention(setup):
    from transformers import LlavaForConditionalGeneration

    model, processor = setup
    eager = LlavaForConditionalGeneration._from_config(model.config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    looks = ev.noun_head_looks(eager, processor, common.heldout_examples(6))
    assert looks and all(sum(w.values()) == pytest.approx(1.0, abs=1e-4) for w in looks.values())


def test_param_groups_speed_up_only_the_pointer_heads_layers(setup):
    model, _ = setup
    model.model.vision_tower.requires_grad_(False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    [one] = ts.param_groups(model)
    assert {id(p) for p in one["params"]} == trainable and one["lr_mult"] == 1.0
    rest, fast = ts.param_groups(model, 5.0)
    assert (rest["lr_mult"], fast["lr_mult"]) == (1.0, 5.0)
    assert {id(p) for p in rest["params"]} | {id(p) for p in fast["params"]} == trainable
    names = {id(p): n for n, p in model.named_parameters()}
    layers = {layer for layer, _ in ts.POINTER_HEADS.values()}
    assert sorted(names[id(p)] for p in fast["params"]) == sorted(
        f"model.language_model.layers.{layer}.self_attn.{m}_proj.weight" for layer in layers for m in "qkvo")
    model.model.vision_tower.requires_grad_(True)


def model_card_commands() -> list[list[str]]:
    """Every `$M ...` and `mmspec ...` line of the model card's bash blocks, as argv (variables expanded):
    the builder's without its ``python -m demos.build_default_models``, mmspec's with its program name."""
    import re
    import shlex

    card = (scenes.ROOT / "assets" / "models" / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", card, flags=re.S):
        env: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            expanded = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line)
            assignment = re.fullmatch(r'(\w+)="(.*)"', expanded)
            if assignment:
                env[assignment.group(1)] = assignment.group(2)
            elif line.startswith("$M "):
                argv = shlex.split(expanded)
                assert argv[:3] == ["python", "-m", "demos.build_default_models"], line
                commands.append(argv[3:])
            elif line.startswith("mmspec "):
                commands.append(shlex.split(expanded))
    return commands


def test_model_card_rebuild_commands_parse_with_todays_flags():
    """The card's exact rebuild commands (the shipped recipe and the previous checkpoint's) stay runnable."""
    import mmspec.cli

    commands = model_card_commands()
    assert len(commands) >= 15
    stage3, stages = [], []
    for argv in commands:
        if argv[0] == "mmspec":  # SystemExit (a failure) on a flag that no longer exists
            args = mmspec.cli.build_parser(argv[1:]).parse_args(argv[1:])
            stages.append(args.command)
            continue
        args = b.build_parser().parse_args(argv)
        stages.append(args.cmd)
        if args.cmd == "tune-questions":
            stage3.append(args)
    # every model is rebuilt by a command, the drafters by the builder's stages that run train-drafter
    assert {"train-vision", "train-target", "tune-questions", "export", "distill-drafter", "distill-visual",
            "distill-eagle", "eval", "bench"} <= set(stages)
    shipped = stage3[0]  # the shipped recipe comes first: today's stage-3 defaults, a fixed step count
    assert (shipped.steps, shipped.max_minutes, shipped.pointer_weight, shipped.lookup_lr_mult) == (1860, 0, 4.0, 5.0)
    assert shipped.kind_weights == common.QUESTION_WEIGHTS and shipped.prev_pointer
    previous = stage3[1:]  # the old checkpoint's commands pin the flags that were the defaults then
    assert previous and all(a.pointer_weight == 1 and a.lookup_lr_mult == 1 and not a.prev_pointer for a in previous)
