"""The benchmark harness on a tiny configuration: JSON structure, lossless flags, markdown and plot.
No timing assertions: speed is measured by ``mmspec bench``, never asserted in tests."""

from __future__ import annotations

import json

from mmspec.cli import main
from tests.tiny import sample_image


def test_bench_on_tiny_models(tiny_target, tiny_drafter, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        sample_image(i).save(images / f"{i}.png")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", "--target", str(tiny_target), "--drafter", str(tiny_drafter), "--images", str(images),
               "--n", "2", "--repeats", "1", "--warmup", "1", "--max-new-tokens", "12",
               "--caption-prompt", "describe the image .", "--question-prompt", "what color is the circle ?",
               "--batch-size", "1,3", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"machine", "config", "modes", "by_prompt_type"} <= set(report)
    assert report["machine"]["cpu_count"] >= 1 and report["config"]["n_inputs"] == 4
    modes = {m["mode"]: m for m in report["modes"]}
    assert {"hf-greedy", "hf-prompt-lookup", "hf-assisted", "mmspec-text", "mmspec-ngram", "mmspec-none"} <= set(modes)
    for name, m in modes.items():
        assert {"mode", "tokens_per_s", "speedup_vs_hf_greedy", "mean_accepted", "acceptance_rate", "lossless",
                "acceptance_by_position", "ttft_cold_s", "ttft_warm_s", "peak_memory_mb", "error"} <= set(m)
        if name.startswith("mmspec-"):
            assert m["error"] is None and m["lossless"] is True and m["runs"] == 4
            assert m["mean_accepted"] >= 1.0 and m["ttft_cold_s"] > 0
    assert modes["hf-greedy"]["speedup_vs_hf_greedy"] == 1.0
    assert set(report["by_prompt_type"]) == {"caption", "question"}
    assert "| mmspec-text |" in capsys.readouterr().out
    assert png.stat().st_size > 1000
    # throughput at each batch size: hf-greedy's batched generate and every mmspec mode, rows checked per input
    assert set(report["batched"]) == {"1", "3"}
    for B, rows in report["batched"].items():
        by_mode = {r["mode"]: r for r in rows}
        assert {"hf-greedy", "mmspec-text", "mmspec-text-tree", "mmspec-ngram", "mmspec-none"} <= set(by_mode)
        assert by_mode["hf-greedy"]["speedup_vs_hf_greedy"] == 1.0
        for name, r in by_mode.items():
            if name.startswith("mmspec-"):
                assert r["error"] is None and r["lossless"] is True and r["mean_accepted"] >= 1.0, (B, r)


def test_bench_flags_a_lossy_mode(tiny_target, tiny_drafter, tmp_path, monkeypatch):
    """A mode whose output differs from hf-greedy is reported as not lossless (and the exit status says so)."""
    import mmspec.bench.modes as bench

    images = tmp_path / "images"
    images.mkdir()
    sample_image(0).save(images / "0.png")
    real = bench.Bench.run_one

    def corrupt(self, mode, inp, record, rep=0):
        real(self, mode, inp, record, rep)
        if mode == "mmspec-ngram" and self.results[mode].calls:
            self.results[mode].calls[-1].ids = self.results[mode].calls[-1].ids + [0]

    monkeypatch.setattr(bench.Bench, "run_one", corrupt)
    out = tmp_path / "b.json"
    rc = main(["bench", "--target", str(tiny_target), "--drafter", str(tiny_drafter), "--images", str(images),
               "--n", "1", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "8", "--prompt-types", "caption",
               "--caption-prompt", "describe the image .", "--modes", "mmspec-ngram,mmspec-none", "--json", str(out)])
    modes = {m["mode"]: m for m in json.loads(out.read_text())["modes"]}
    assert rc == 1
    assert modes["mmspec-ngram"]["lossless"] is False and modes["mmspec-ngram"]["mismatched_inputs"]
    assert modes["mmspec-none"]["lossless"] is True


def test_bench_speed_is_tokens_over_seconds_of_each_pass():
    """A mode's tokens/s over a set is each pass's tokens over its seconds, median over passes; the median of the
    per-call rates is reported beside it (on a half-short, half-long set it sits between the clusters)."""
    from mmspec.bench.modes import Bench, Call, Input, ModeResult
    from mmspec.bench.report import summary

    inputs = [Input(None, "q", "question", "a:q"), Input(None, "c", "caption", "a:c")]
    b = Bench.__new__(Bench)
    b.modes, b.temperature = ["hf-greedy", "mmspec-x"], 0.0
    b.results = {m: ModeResult(m) for m in b.modes}
    # (mode, pass) -> (question seconds, caption seconds); 2 tokens per answer, 20 per caption
    walls = {("hf-greedy", 0): (0.04, 0.25), ("hf-greedy", 1): (0.05, 0.30),
             ("mmspec-x", 0): (0.04, 0.10), ("mmspec-x", 1): (0.06, 0.10)}
    for (mode, rep), (wq, wc) in walls.items():
        b.results[mode].calls += [Call("a:q", "question", wq, [1, 2], rep=rep, forwards=2),
                                  Call("a:c", "caption", wc, list(range(20)), rep=rep, forwards=3)]
    rows = {r["mode"]: r for r in summary(b, inputs)}
    hf = (22 / 0.29 + 22 / 0.35) / 2
    ours = (22 / 0.14 + 22 / 0.16) / 2
    assert abs(rows["hf-greedy"]["tokens_per_s"] - hf) < 0.01 and abs(rows["mmspec-x"]["tokens_per_s"] - ours) < 0.01
    assert abs(rows["mmspec-x"]["speedup_vs_hf_greedy"] - ours / hf) < 1e-3
    # per-call rates: hf 50, 40, 80, 66.7 -> median 58.3; ours 50, 33.3, 200, 200 -> median 125
    assert abs(rows["mmspec-x"]["median_call_tokens_per_s"] - 125.0) < 0.01
    assert abs(rows["mmspec-x"]["median_call_speedup"] - 125.0 / ((50 + 200 / 3) / 2)) < 1e-3
    assert rows["mmspec-x"]["lossless"] is True and rows["mmspec-x"]["mean_accepted"] == round(44 / 10, 3)
    only_q = {r["mode"]: r for r in summary(b, inputs[:1])}
    assert abs(only_q["mmspec-x"]["tokens_per_s"] - (2 / 0.04 + 2 / 0.06) / 2) < 0.01


def test_bench_never_overwrites_a_file_it_did_not_write(tiny_target, tmp_path):
    """--json/--plot naming a file of the user's is refused before any work, and the file is left as it was."""
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}\n')
    png = tmp_path / "photo.png"
    png.write_bytes(b"not a png at all")
    for flag, path in (("--json", mine), ("--plot", png)):
        before = path.read_bytes()
        rc = main(["bench", "--target", str(tiny_target), "--images", str(tmp_path), "--n", "1", flag, str(path)])
        assert rc == 2 and path.read_bytes() == before


def test_train_drafter_refuses_a_folder_of_other_files(tiny_target, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("do not touch")
    rc = main(["train-drafter", "--kind", "eagle", "--target", str(tiny_target), "--data", str(tmp_path),
               "--out", str(folder)])
    assert rc == 2 and sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def test_verify_cost_times_one_rounds_forwards(tiny_target, tmp_path, capsys):
    """``--verify-cost``: per batch size a row per node count (step, chain, tree and their ratios, ms per row), the
    layerskip draft step's ratio, machine and config; its JSON is a bench report a later run may overwrite."""
    from mmspec.outputs import check_own_file

    out = tmp_path / "cost.json"
    rc = main(["bench", "--target", str(tiny_target), "--drafter", "none", "--drafter-kind", "layerskip",
               "--verify-cost", "1,4", "--repeats", "2", "--warmup", "1", "--batch-size", "1,2", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"machine", "config", "prompt_tokens", "tree_parents", "verify_cost", "layerskip"} <= set(report)
    assert report["config"]["nodes"] == [1, 4] and report["config"]["repeats"] == 2
    assert report["machine"]["cpu_count"] >= 1 and report["prompt_tokens"] > 1
    assert len(report["tree_parents"]["4"]) == 4 and report["tree_parents"]["4"] != [-1, 0, 1, 2]   # a real tree
    assert set(report["verify_cost"]) == {"1", "2"}
    for rows in report["verify_cost"].values():
        assert [r["nodes"] for r in rows] == [1, 4]
        for r in rows:
            assert min(r["step_ms"], r["chain_ms"], r["tree_ms"], r["chain_per_step"], r["tree_per_step"]) > 0
    ls = report["layerskip"]
    assert ls["skip"] and ls["layers"] == 2 and set(ls["by_batch"]) == {"1", "2"}
    assert all(d["draft_step_ms"] > 0 and d["draft_per_step"] > 0 for d in ls["by_batch"].values())
    printed = capsys.readouterr().out
    assert "| n | step (ms) | chain n (ms) | tree n (ms) | chain / step | tree / step |" in printed
    assert "layerskip draft step" in printed and "machine:" in printed
    check_own_file(out, "--json", "bench-json")   # recognised as mmspec's own


def test_verify_cost_tree_verify_gives_each_nodes_path_logits(tiny_target):
    """The mode's tree verify (the engine's own, rows of a batch) scores every node as the target scores the node's
    path fed as a plain sequence, and its rollback leaves the caches as they were (the same verify again agrees)."""
    import torch

    import mmspec
    from mmspec.bench.modes import Input
    from mmspec.bench.verify_cost import Rounds, tree_draft
    from mmspec.targets.batch import TargetSession
    from mmspec.trees import verify_parents

    pipe = mmspec.load(str(tiny_target), drafter=None, drafter_kind="none")
    inp = Input(sample_image(0), "describe the image .", "caption", "0")
    rounds = Rounds(pipe, inp, 2)
    draft = tree_draft(9)
    parents = verify_parents(draft.parents)
    assert parents != list(range(-1, 8))      # side branches, not a chain
    with torch.inference_mode():
        logits, seconds = rounds.verify(draft)
        again, _ = rounds.verify(draft)
        row = rounds.rows[1]
        request = pipe._job(inp.image, inp.prompt, {}).request
        pipe.adapter.image_features(request)
        session = TargetSession(pipe.adapter, request)
        start = len(request.prompt_ids) - 1   # the cache before the pending token
        ids = [rounds.engine.active[row].pending] + draft.ids.tolist()
        for node in range(len(parents)):
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            reference = session.forward(torch.tensor([ids[i] for i in reversed(path)]))[-1]
            session.rollback(start)
            torch.testing.assert_close(logits[row][node], reference, atol=1e-4, rtol=1e-4)
    assert seconds > 0
    for r in rounds.rows:
        torch.testing.assert_close(again[r], logits[r])


def test_verify_cost_refuses_bad_node_counts(capsys):
    """NODES is a comma list of positive integers; given bare it is the default list."""
    import pytest

    from mmspec.cli import build_parser

    for bad in ("0", "-2", "2.5", "four", "1,,x", ""):
        with pytest.raises(SystemExit) as e:
            main(["bench", f"--verify-cost={bad}"])
        assert e.value.code == 2
        assert "--verify-cost" in capsys.readouterr().err
    argv = ["bench", "--verify-cost", "--batch-size", "1,16"]
    args = build_parser(argv).parse_args(argv)
    assert args.verify_cost == [1, 2, 4, 8, 16, 32] and args.batch_size == [1, 16]


def test_verify_cost_on_a_shaped_target_times_the_layerskip_draft_step(tmp_path, monkeypatch):
    """``--shaped SIZE --drafter-kind layerskip --verify-cost``: the shaped target with its default skip set; a kind
    that needs trained weights is refused there."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # the shaped model's folder goes with the test
    out = tmp_path / "shaped.json"
    rc = main(["bench", "--shaped", "smoke", "--drafter-kind", "layerskip", "--verify-cost", "3", "--repeats", "1",
               "--warmup", "0", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["shaped"] == "smoke" and report["config"]["drafter_kind"] == "layerskip"
    assert report["layerskip"]["source"] == "untuned" and report["layerskip"]["by_batch"]["1"]["draft_step_ms"] > 0
    assert main(["bench", "--shaped", "smoke", "--drafter-kind", "eagle", "--verify-cost"]) == 2
