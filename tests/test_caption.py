"""Batch captioning (demos/caption/): one line per input, bad files recorded not fatal, resumable after a
SIGKILL, a cut last line repaired, captions equal to ``pipe.generate``. Tiny models, offline."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

import mmspec
from demos import caption
from mmspec.cli import build_parser
from mmspec.cli import main as cli_main
from tests.tiny import sample_image

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 12
PROMPT = "describe the image ."


@pytest.fixture(scope="module")
def pipe(tiny_target, tiny_drafter):
    return mmspec.load(str(tiny_target), drafter=str(tiny_drafter))


@pytest.fixture
def model_flags(tiny_target, tiny_drafter):
    return ["--target", str(tiny_target), "--drafter", str(tiny_drafter), "--max-new-tokens", str(MAX_NEW),
            "--prompt", PROMPT]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _giant_png() -> bytes:
    """A valid PNG whose header claims 100000 x 100000 pixels (10 gigapixels): must be refused before decoding."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def make_mixed_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """Good images of every mode the loader accepts, and every kind of bad file; returns (readable, bad)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    readable = []

    def save(name, img, fmt, **kw):
        path = folder / name
        img.save(path, fmt, **kw)
        readable.append(path)

    save("rgb_0.png", sample_image(0), "PNG")
    save("sub/rgb_1.png", sample_image(1), "PNG")
    save("gray.png", sample_image(2).convert("L"), "PNG")
    save("palette.png", sample_image(3).convert("P"), "PNG")
    rgba = sample_image(4).convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba, "PNG")
    save("cmyk.jpg", sample_image(5).convert("CMYK"), "JPEG")
    save("sixteen.png", Image.new("I;16", (40, 30), 4000), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    save("rotated.jpg", sample_image(6, size=48).crop((0, 0, 48, 24)), "JPEG", exif=exif.tobytes())

    bad = {"zero.png": b"", "text.png": b"this is a text file, not a picture\n",
           "truncated.png": _png(sample_image(7))[:80], "giant.png": _giant_png()}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image extension: skipped by the folder walk\n")
    return readable, [folder / n for n in bad]


def read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the file must end with a complete line"
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert all(caption._is_own(r) for r in records), "every line is a caption record of ours"
    return records


def image_folder(tmp_path: Path, first_seed: int, n: int) -> Path:
    """``tmp_path/imgs`` holding ``0.png .. {n-1}.png``: sample images of seeds ``first_seed ..``."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(n):
        sample_image(first_seed + i).save(folder / f"{i}.png")
    return folder


def by_path(records: list[dict]) -> dict[str, dict]:
    return {os.path.abspath(r["path"]): r for r in records}


def test_mixed_folder_one_line_per_input_errors_recorded_captions_equal_generate(tmp_path, pipe, model_flags):
    readable, bad = make_mixed_folder(tmp_path / "images")
    out, csv_path = tmp_path / "captions.jsonl", tmp_path / "captions.csv"
    rc = cli_main(["caption", str(tmp_path / "images"), "--out", str(out), "--csv", str(csv_path), "--quiet",
                   *model_flags])
    assert rc == 1  # some inputs failed
    records = read_lines(out)
    assert len(records) == len(readable) + len(bad)
    got = by_path(records)
    assert set(got) == {os.path.abspath(p) for p in readable + bad}
    for rec in records:
        assert set(caption.FIELDS) <= set(rec)
        assert rec["prompt"] == PROMPT
    for p in bad:
        rec = got[str(p)]
        assert rec["error"] and rec["caption"] is None, rec
    assert "empty" in got[str(bad[0])]["error"]
    assert "not an image" in got[str(bad[1])]["error"]
    assert "corrupt or truncated" in got[str(bad[2])]["error"]
    assert "too large" in got[str(bad[3])]["error"] or "limit is" in got[str(bad[3])]["error"]
    for p in readable:
        rec = got[str(p)]
        assert rec["error"] is None, rec
        expected = pipe.generate(str(p), PROMPT, max_new_tokens=MAX_NEW)
        assert rec["caption"] == expected.text
        assert rec["tokens"] == len(expected.token_ids) == expected.stats.new_tokens
        # (how many drafts are accepted depends on the draft lengths the engine picks from measured costs, so
        # it is checked against the line's own counts, not against another run)
        assert rec["mean_accepted"] == pytest.approx(rec["tokens"] / rec["target_forwards"], abs=1e-3)
        assert 0.0 <= rec["acceptance_rate"] <= 1.0 and rec["time_s"] > 0

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {r["path"] for r in rows} == {r["path"] for r in records}
    assert all(r["caption"] == got[os.path.abspath(r["path"])]["caption"] or r["error"] for r in rows)

    # a rerun finds everything done: nothing appended, still exit status 1 (the failures are still there)
    before = out.read_bytes()
    assert cli_main(["caption", str(tmp_path / "images"), "--out", str(out), "--quiet", *model_flags]) == 1
    assert out.read_bytes() == before


def test_image_over_the_pixel_limit_gets_an_error_line(tmp_path, monkeypatch, model_flags):
    import vision.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 2000)
    folder = tmp_path / "imgs"
    folder.mkdir()
    sample_image(30, size=40).save(folder / "fits.png")    # 1600 pixels
    sample_image(31, size=48).save(folder / "big.png")     # 2304 pixels
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 1
    got = {Path(r["path"]).name: r for r in read_lines(out)}
    assert "limit is" in got["big.png"]["error"] and got["fits.png"]["error"] is None


def test_all_good_exits_zero_and_limit(tmp_path, model_flags):
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(3):
        sample_image(20 + i).save(folder / f"{i}.png")
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--limit", "2", "--quiet", *model_flags]) == 0
    # (lines come in the order rows finish, so they are compared as sets)
    assert sorted(Path(r["path"]).name for r in read_lines(out)) == ["0.png", "1.png"]
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 0
    assert sorted(Path(r["path"]).name for r in read_lines(out)) == ["0.png", "1.png", "2.png"]


def _slow_cmd(out: Path, folder: Path, model_flags: list[str], rounds_log: Path, *extra: str) -> list[str]:
    """``python -m demos.caption`` with every round of a batched engine made slower (so signals land while rows
    are in flight) and the number of rows of each round appended to ``rounds_log``."""
    # (SIGINT back to Python's default: a runner started in the background may hand its children SIGINT ignored)
    code = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import mmspec.engine as e\nstep = e.Engine.step\n"
            "def slow(self):\n    events = step(self)\n    if self.max_batch > 1 and events:\n"
            f"        with open({str(rounds_log)!r}, 'a') as f:\n            f.write(f'{{len(events)}}\\n')\n"
            "    time.sleep(0.05)\n    return events\n"
            "e.Engine.step = slow\nimport demos.caption as c\nsys.exit(c.main(sys.argv[1:]))\n")
    return [sys.executable, "-c", code, str(folder), "--out", str(out), "--quiet", *model_flags, *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _stop_after(cmd: list[str], out: Path, lines: int, sig: int) -> tuple[int, str]:
    """Run ``cmd`` until ``out`` holds ``lines`` lines, then send ``sig``; (exit status, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"finished before the signal: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


def test_sigkill_and_ctrl_c_mid_batch_then_resume_give_exactly_one_line_per_input(tmp_path, pipe, model_flags):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(12):
        paths.append(folder / f"img_{i:02d}.png")
        sample_image(40 + i).save(paths[-1])
    out, rounds_log = tmp_path / "captions.jsonl", tmp_path / "rounds.txt"

    # 1. SIGKILL while a batch of 4 is in flight
    rc, err = _stop_after(_slow_cmd(out, folder, model_flags, rounds_log, "--batch-size", "4"), out, 3, signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-2000:]
    rows = [int(n) for n in rounds_log.read_text().split()]
    assert max(rows) > 1 and max(rows) <= 4, rows  # rows were decoded together, never more than --batch-size
    partial = out.read_bytes()
    n_killed = partial.count(b"\n")
    assert partial.endswith(b"\n") and 3 <= n_killed < len(paths)

    # 2. Ctrl-C in the next run (another batch size): exit 130, one line on stderr, the lines written kept
    rc, err = _stop_after(_slow_cmd(out, folder, model_flags, rounds_log, "--batch-size", "3"), out, n_killed + 2,
                          signal.SIGINT)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    interrupted = out.read_bytes()
    assert interrupted.startswith(partial) and interrupted.endswith(b"\n")
    assert n_killed + 2 <= interrupted.count(b"\n") < len(paths)

    # 3. resume (the plain module entry point this time): the rest is done, nothing twice, nothing corrupt
    res = subprocess.run([sys.executable, "-m", "demos.caption", str(folder), "--out", str(out), "--quiet",
                          "--batch-size", "5", *model_flags], cwd=ROOT, env=_env(), capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert out.read_bytes().startswith(interrupted)  # what was done before is kept as it was
    records = read_lines(out)
    assert len(records) == len(paths)
    assert sorted(os.path.abspath(r["path"]) for r in records) == sorted(str(p) for p in paths)
    for rec in records:
        assert rec["error"] is None
        assert rec["caption"] == pipe.generate(rec["path"], PROMPT, max_new_tokens=MAX_NEW).text


@pytest.fixture
def rows_per_round(monkeypatch):
    """The number of rows of every round run by a batched engine (max_batch > 1) in this process."""
    from mmspec.engine import Engine

    seen: list[int] = []
    step = Engine.step

    def counting(self):
        events = step(self)
        if self.max_batch > 1 and events:
            seen.append(len(events))
        return events

    monkeypatch.setattr(Engine, "step", counting)
    return seen


def test_bad_files_inside_a_batch_get_error_lines_and_the_rest_finish(tmp_path, pipe, model_flags, rows_per_round):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = []
    for i in range(7):  # bad files between good ones, all in one batch of 5 and its refills
        if i % 3 == 1:
            (folder / f"{i}.png").write_bytes(b"" if i == 1 else b"not a picture at all")
        else:
            sample_image(200 + i).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", "--batch-size", "5", *model_flags]) == 1
    got = {Path(r["path"]).name: r for r in read_lines(out)}
    assert sorted(got) == sorted(names) and len(read_lines(out)) == len(names)
    assert "empty" in got["1.png"]["error"] and "not an image" in got["4.png"]["error"]
    for name in names:
        if name not in ("1.png", "4.png"):
            assert got[name]["error"] is None
            assert got[name]["caption"] == pipe.generate(str(folder / name), PROMPT, max_new_tokens=MAX_NEW).text
    assert max(rows_per_round) > 1 and max(rows_per_round) <= 5


def test_a_row_that_fails_inside_the_batch_is_captioned_again_alone(tmp_path, pipe, model_flags, monkeypatch,
                                                                    capsys):
    from mmspec.engine import Engine

    folder = image_folder(tmp_path, 210, 4)
    opened = Engine._open
    calls = []

    def flaky(self, job):  # the batched engine fails on the second row it opens; batch 1 never does
        if self.max_batch > 1:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated failure inside the batch")
        return opened(self, job)

    monkeypatch.setattr(Engine, "_open", flaky)
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--batch-size", "4", *model_flags]) == 0
    assert "1 input(s) failed inside a batch and were captioned again alone" in capsys.readouterr().out
    records = read_lines(out)
    assert len(records) == 4 and all(r["error"] is None for r in records)
    for rec in records:
        assert rec["caption"] == pipe.generate(rec["path"], PROMPT, max_new_tokens=MAX_NEW).text


@pytest.mark.parametrize("value, message", [("0", "--batch-size must be a positive whole number, got 0"),
                                            ("-2", "--batch-size must be a positive whole number, got -2")])
def test_batch_size_is_checked_before_any_work(tmp_path, model_flags, capsys, value, message):
    folder = image_folder(tmp_path, 220, 1)
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--batch-size", value, *model_flags]) == 2
    err = capsys.readouterr().err
    assert f"mmspec caption: error: {message}" in err and "Traceback" not in err
    assert not out.exists()
    for bad in ("two", "1.5"):  # not a whole number: argparse refuses it, exit status 2
        with pytest.raises(SystemExit) as e:
            cli_main(["caption", str(folder), "--out", str(out), "--batch-size", bad, *model_flags])
        assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
    assert not out.exists()


def test_default_batch_size_is_the_pipelines(capsys):
    from mmspec.pipeline import Pipeline

    args = build_parser().parse_args(["caption", "x.png", "--out", "c.jsonl"])
    assert args.batch_size == caption.DEFAULT_BATCH_SIZE == Pipeline.default_batch_size == 16
    with pytest.raises(SystemExit):
        cli_main(["caption", "--help"])
    assert "default 16" in " ".join(capsys.readouterr().out.split())


def test_cut_last_line_is_removed_and_that_input_redone(tmp_path, model_flags):
    folder = image_folder(tmp_path, 60, 3)
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    # a crash in the middle of writing the third line: half of it, no newline
    out.write_bytes(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 0
    new = out.read_bytes().splitlines(keepends=True)
    assert new[:2] == lines[:2]  # the complete lines are untouched
    assert len(new) == 3 and json.loads(new[2])["path"] == json.loads(lines[2])["path"]
    assert json.loads(new[2])["caption"] == json.loads(lines[2])["caption"]

    # a complete line that is not one of ours (one write never leaves a line that ends in a newline but is cut)
    # is kept as it is and not trusted; the input it does not stand for is captioned
    foreign = b'{"path": "x", "cap\n'
    out.write_bytes(lines[0] + lines[1] + foreign)
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 0
    data = out.read_bytes()
    assert data.startswith(lines[0] + lines[1] + foreign)
    records = caption.read_records(str(out))
    assert sorted(Path(r["path"]).name for r in records) == ["0.png", "1.png", "2.png"]


def test_errors_are_kept_unless_retry_errors(tmp_path, model_flags):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sample_image(70).save(folder / "good.png")
    (folder / "later.png").write_bytes(b"")
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 1
    sample_image(71).save(folder / "later.png")  # the file gets fixed
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 1
    assert len(read_lines(out)) == 2  # error kept: it counts as done
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", "--retry-errors", *model_flags]) == 0
    records = read_lines(out)
    assert len(records) == 2 and all(r["error"] is None for r in records)  # the error line was replaced


def test_a_file_written_by_another_target_is_refused_then_redone(tmp_path, model_flags, tiny_target, capsys):
    import argparse
    import shutil

    from safetensors.torch import load_file, save_file

    folder = image_folder(tmp_path, 80, 2)
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *model_flags]) == 0
    first = read_lines(out)
    assert {r["target"] for r in first} == {caption.target_identity(argparse.Namespace(target=str(tiny_target)))}

    # the same target retrained: same folder layout, other weights
    other = tmp_path / "retrained"
    shutil.copytree(tiny_target, other)
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    flags = [f if f != str(tiny_target) else str(other) for f in model_flags]
    sample_image(82).save(folder / "2.png")
    before = out.read_bytes()
    capsys.readouterr()
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert "another target" in err and "--redo-other-target" in err
    assert out.read_bytes() == before  # refused: nothing written, nothing lost

    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", "--redo-other-target", *flags]) == 0
    records = read_lines(out)
    new_id = caption.target_identity(argparse.Namespace(target=str(other)))
    assert len(records) == 3 and {r["target"] for r in records} == {new_id} and new_id != first[0]["target"]
    pipe_other = mmspec.load(str(other), drafter=None)  # any drafter: the output is the target's
    for r in records:
        assert r["caption"] == pipe_other.generate(r["path"], PROMPT, max_new_tokens=MAX_NEW).text
    # the same target again: everything is done, nothing is redone
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", *flags]) == 0
    assert read_lines(out) == records


def test_inputs_globs_lists_dedup_and_missing(tmp_path, model_flags):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        sample_image(80 + i).save(folder / f"{i}.png")
    (tmp_path / "list.txt").write_text("# a comment\nimgs/0.png\n\nimgs/1.png\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "imgs/2.png", "prompt": "what color is the circle ?"})
                                         + "\n" + json.dumps({"path": str(folder / "0.png")}) + "\n")
    tasks = caption.expand_inputs([str(folder / "*.png"), str(tmp_path / "list.txt"), str(tmp_path / "list.jsonl"),
                                   str(folder / "0.png"), str(tmp_path / "missing.png")], PROMPT)
    keys = [(Path(t.path).name, t.prompt) for t in tasks]
    assert keys == [("0.png", PROMPT), ("1.png", PROMPT), ("2.png", PROMPT),
                    ("2.png", "what color is the circle ?"), ("missing.png", PROMPT)]
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder / "*.png"), str(tmp_path / "list.jsonl"), str(tmp_path / "missing.png"),
                     "--out", str(out), "--quiet", *model_flags]) == 1
    records = read_lines(out)
    assert len(records) == 5
    missing = [r for r in records if Path(r["path"]).name == "missing.png"]
    assert len(missing) == 1 and "not found" in missing[0]["error"]
    with pytest.raises(mmspec.MMSpecError, match="line 1"):
        (tmp_path / "broken.jsonl").write_text("{not json\n")
        caption.expand_inputs([str(tmp_path / "broken.jsonl")])


def test_a_jsonl_line_may_give_several_images(tmp_path, model_flags, pipe):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        sample_image(60 + i).save(folder / f"{i}.png")
    lines = [{"images": ["imgs/0.png", "imgs/1.png"], "prompt": "what color is the circle ?"},
             {"images": ["imgs/2.png", "imgs/0.png", "imgs/1.png"]}, {"path": "imgs/2.png"},
             {"images": ["imgs/0.png", "imgs/nope.png"]}]
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tasks = caption.expand_inputs([str(tmp_path / "multi.jsonl")], PROMPT)
    assert [len(t.images) for t in tasks] == [2, 3, 0, 2]
    assert tasks[0].image == [str(folder / "0.png"), str(folder / "1.png")] and tasks[2].image == str(folder / "2.png")
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(tmp_path / "multi.jsonl"), "--out", str(out), "--quiet", *model_flags]) == 1
    records = {r["path"]: r for r in read_lines(out)}
    assert len(records) == 4
    for task in tasks[:3]:
        rec = records[task.path]
        assert rec["error"] is None
        assert rec["caption"] == pipe.generate(task.image, task.prompt, max_new_tokens=MAX_NEW).text
    assert "not found" in records[tasks[3].path]["error"]
    # resuming skips what is done: nothing new is written
    assert cli_main(["caption", str(tmp_path / "multi.jsonl"), "--out", str(out), "--quiet", *model_flags]) in (0, 1)
    assert len(read_lines(out)) == 4
    with pytest.raises(mmspec.MMSpecError, match="images"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"images": []}) + "\n")
        caption.expand_inputs([str(tmp_path / "bad.jsonl")])


def test_one_writer_at_a_time(tmp_path):
    out = tmp_path / "c.jsonl"
    with caption.CaptionLog(out):
        with pytest.raises(mmspec.MMSpecError, match="another"):
            caption.CaptionLog(out)
    caption.CaptionLog(out).close()  # released on close


def test_compare_reports_speedup_and_identical_output(tmp_path, model_flags, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        sample_image(90 + i).save(folder / f"{i}.png")
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(out), "--compare", *model_flags]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "0.png" in printed and "accepted" in printed
    for rec in read_lines(out):
        assert rec["plain_matches"] is True
        assert rec["plain_time_s"] > 0 and rec["speedup"] > 0


def test_help_lists_the_flags(capsys):
    # (``python -m demos.caption`` itself runs in the SIGKILL test, to resume the batch)
    with pytest.raises(SystemExit) as e:
        cli_main(["caption", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--csv", "--compare", "--limit", "--retry-errors", "--batch-size", "--backend", "--workers",
                 "--num-gpus-per-worker", "--ray-address", "--target", "--drafter-kind"):
        assert flag in out


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _ray_available(), reason="ray[data] is not installed (pip install 'mmspec[ray]')")
def test_ray_backend_same_captions_as_local(tmp_path, model_flags):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        sample_image(100 + i).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"garbage")
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert cli_main(["caption", str(folder), "--out", str(local), "--quiet", *model_flags]) == 1
    # two done before: the Ray run must skip them and write only the other three
    remote.write_bytes(b"".join(local.read_bytes().splitlines(keepends=True)[:2]))
    rc = cli_main(["caption", str(folder), "--out", str(remote), "--quiet", "--backend", "ray", "--workers", "2",
                   "--batch-size", "2", *model_flags])  # each worker decodes its batches with generate_batch
    assert rc == 1
    got, want = read_lines(remote), read_lines(local)
    assert len(got) == len(want) == 5
    assert got[:2] == want[:2]  # the lines done before are kept as they were, not redone
    assert {r["path"]: (r["caption"], r["error"] is None) for r in got} == \
           {r["path"]: (r["caption"], r["error"] is None) for r in want}


def test_target_identity_records_a_non_float32_dtype(tiny_target):
    """Captions from float16 and float32 runs of one target may differ, so a file is resumed only in the same
    dtype; float32 (the CPU default) keeps the bare name@hash of files written before the dtype was recorded."""
    import argparse

    def ident(**kw):
        return caption.target_identity(argparse.Namespace(target=str(tiny_target), **kw))

    bare = ident()
    assert "@" in bare and "/" not in bare.rsplit("@", 1)[1]
    assert ident(dtype="float32") == ident(dtype=None, device="cpu") == bare
    assert ident(dtype="float16") == bare + "/float16" != ident(dtype="bfloat16")
    assert ident(device="cuda") == bare + "/float16"           # mmspec.load's default off the CPU
    assert ident(backend="ray", num_gpus_per_worker=1) == bare + "/float16"  # Ray workers run on the GPU
    assert ident(backend="local", num_gpus_per_worker=1) == bare             # the local backend ignores it
    assert ident(preset="qwen2.5-vl-7b", device="cuda") == bare + "/bfloat16"  # the preset's dtype off the CPU
    assert ident(preset="qwen2.5-vl-7b", device="cpu") == bare
    with pytest.raises(mmspec.MMSpecError, match="unknown dtype"):
        ident(dtype="float8")


def test_tree_nodes_flag(tiny_target, tiny_drafter, tmp_path):
    """--tree-nodes drafts trees (same captions as generate), and is refused up front where the drafter drafts
    chains only, or out of range, with nothing written."""
    import mmspec
    from mmspec.cli import main

    images = tmp_path / "imgs"
    images.mkdir()
    for s in range(3):
        sample_image(s).save(images / f"{s}.png")
    out = tmp_path / "c.jsonl"
    common = ["caption", str(images), "--target", str(tiny_target), "--prompt", "describe the image .",
              "--max-new-tokens", "12", "--batch-size", "2"]
    assert main(common + ["--drafter", str(tiny_drafter), "--drafter-kind", "text", "--tree-nodes", "6",
                          "--out", str(out)]) == 0
    pipe = mmspec.load(str(tiny_target), drafter=None, drafter_kind="none")
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    for rec in lines:
        assert rec["caption"] == pipe.generate(rec["path"], "describe the image .", max_new_tokens=12).text
    for bad, message in ((["--drafter", "none", "--drafter-kind", "ngram", "--tree-nodes", "6"], "does not draft"),
                         (["--drafter", str(tiny_drafter), "--tree-nodes", "0"], "--tree-nodes must be")):
        other = tmp_path / f"bad{len(bad)}.jsonl"
        assert main(common + bad + ["--out", str(other)]) == 2
        assert not other.exists()
