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
    import mmspec.bench as bench

    images = tmp_path / "images"
    images.mkdir()
    sample_image(0).save(images / "0.png")
    real = bench.Bench.run_one

    def corrupt(self, mode, inp, record):
        real(self, mode, inp, record)
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
