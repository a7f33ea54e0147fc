"""Awkward but ordinary input from a new user (issue 16): mmspec never destroys a file it did not write, refuses
bad flags and paths before any work with exit status 2, stops cleanly on failed writes and closed pipes, and
answers API misuse with its own error. Each case asserts the user's file is byte-for-byte unchanged."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mmspec
from demos import caption
from mmspec.cli import main as cli_main
from tests.tiny import sample_image

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 8
PROMPT = "describe the image ."


@pytest.fixture
def model_flags(tiny_target, tiny_drafter):
    return ["--target", str(tiny_target), "--drafter", str(tiny_drafter), "--max-new-tokens", str(MAX_NEW),
            "--prompt", PROMPT, "--quiet"]


@pytest.fixture
def folder(tmp_path):
    """``tmp_path/imgs`` with three small images."""
    f = tmp_path / "imgs"
    f.mkdir()
    for i in range(3):
        sample_image(300 + i).save(f / f"{i}.png")
    return f


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def refused(capsys, argv, *needles) -> str:
    """Run ``mmspec caption argv``; it must exit 2 with an mmspec error (no traceback) naming ``needles``."""
    capsys.readouterr()
    assert cli_main(["caption", *argv]) == 2
    err = capsys.readouterr().err
    assert "mmspec caption: error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def own_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    recs = [json.loads(line) for line in data.splitlines()]
    assert all(caption._is_own(r) for r in recs)
    return recs


# ----------------------------------------------------------------------------------------------------------
# --out: only our own files, or new ones
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [
    b"id,name\n1,alice\n2,bob\n",                                                # a CSV
    b'{"id": 1, "text": "my notes"}\n{"id": 2, "text": "more"}\n',              # a JSONL of the user's own
    b'{"path": "a.png", "prompt": "hi"}\n',                                      # an input list
    b'{"id": 1}\n' + json.dumps({f: None for f in caption.FIELDS} | {"path": "a", "prompt": "b"}).encode() + b"\n",
    b"just some text without a newline",                                         # no complete line
    b"\n\n",                                                                      # blank lines
    bytes(range(256)) * 8,                                                        # binary
], ids=["csv", "foreign-jsonl", "input-list", "foreign-first-line", "no-newline", "blank", "binary"])
def test_out_that_is_not_a_caption_file_is_refused_unchanged(tmp_path, folder, model_flags, capsys, content):
    out = tmp_path / "mine.jsonl"
    out.write_bytes(content)
    refused(capsys, [str(folder), "--out", str(out), *model_flags], "not a caption file written by mmspec caption",
            "left untouched")
    assert out.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["imgs", "mine.jsonl"]  # no temp or probe file left behind


def test_out_written_in_another_format_version_is_refused(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    content = (json.dumps({"mmspec": "caption/9", "path": "a.png", "prompt": PROMPT}) + "\n").encode()
    out.write_bytes(content)
    refused(capsys, [str(folder), "--out", str(out), *model_flags], "caption/9")
    assert out.read_bytes() == content


def test_foreign_lines_inside_our_file_are_kept_and_not_trusted(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    # the user appends a line of their own that names an input of the next run, in our fields but unmarked
    # (no caption field: not ours), and a valid JSON line of another shape
    fake = {"path": str(folder / "1.png"), "prompt": PROMPT, "note": "not a caption"}
    before = out.read_bytes() + (json.dumps(fake) + "\n").encode() + b'[1, 2, 3]\n'
    out.write_bytes(before)
    capsys.readouterr()
    flags = [f for f in model_flags if f != "--quiet"]
    assert cli_main(["caption", str(folder), "--out", str(out), *flags]) == 0
    assert "ignoring 2 line(s) not written by mmspec caption (line 2, 3)" in capsys.readouterr().err
    after = out.read_bytes()
    assert after.startswith(before)  # nothing the user had is rewritten
    recs = caption.read_records(str(out))
    assert sorted(Path(r["path"]).name for r in recs) == ["0.png", "1.png", "2.png"]
    assert all(r["caption"] is not None for r in recs)  # 1.png was captioned: the foreign line was not trusted


def test_an_unfinished_last_line_that_is_not_ours_is_refused(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    before = out.read_bytes() + b"user text without newline"
    out.write_bytes(before)
    refused(capsys, [str(folder), "--out", str(out), *model_flags], "unfinished line", "did not write")
    assert out.read_bytes() == before


def test_our_cut_line_alone_in_the_file_is_repaired(tmp_path, folder, model_flags):
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    line = out.read_bytes()
    out.write_bytes(line[: len(line) // 2])  # the first write of a run, cut by a crash
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    assert [r["caption"] for r in own_lines(out)] == [json.loads(line)["caption"]]


def test_a_file_of_the_previous_release_is_resumed(tmp_path, folder, model_flags, tiny_target):
    """Lines written before the "mmspec" marker (every field, a target) are ours: kept and skipped as done."""
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    rec = json.loads(out.read_bytes())
    legacy = {k: v for k, v in rec.items() if k != "mmspec"}
    assert list(legacy)[0] == "path"  # the previous release's line shape
    old = (json.dumps(legacy, ensure_ascii=False) + "\n").encode()
    out.write_bytes(old)
    assert cli_main(["caption", str(folder), "--out", str(out), *model_flags]) == 0
    data = out.read_bytes()
    assert data.startswith(old)
    recs = own_lines(out)
    assert len(recs) == 3 and "mmspec" not in recs[0] and all(r["mmspec"] == caption.FORMAT for r in recs[1:])
    assert recs[0]["caption"] == legacy["caption"]  # not redone


# ----------------------------------------------------------------------------------------------------------
# same path twice, outputs that are inputs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_out_equal_to_an_input_list_is_refused(tmp_path, folder, model_flags, capsys, suffix):
    lst = tmp_path / f"list{suffix}"
    if suffix == ".jsonl":
        lst.write_text("".join(json.dumps({"path": str(p)}) + "\n" for p in sorted(folder.glob("*.png"))))
    else:
        lst.write_text("".join(f"{p}\n" for p in sorted(folder.glob("*.png"))))
    before = lst.read_bytes()
    refused(capsys, [str(lst), "--out", str(lst), *model_flags], "is also an input")
    assert lst.read_bytes() == before
    # the same file through another spelling, and through a hard link
    refused(capsys, [str(lst), "--out", str(tmp_path / "." / lst.name), *model_flags], "is also an input")
    os.link(lst, tmp_path / "link.jsonl")
    refused(capsys, [str(lst), "--out", str(tmp_path / "link.jsonl"), *model_flags], "is also an input")
    assert lst.read_bytes() == before


def test_out_equal_to_an_image_input_is_refused(tmp_path, folder, model_flags, capsys):
    img = folder / "0.png"
    before = img.read_bytes()
    refused(capsys, [str(img), "--out", str(img), *model_flags], "is also an input")
    assert img.read_bytes() == before


def test_csv_equal_to_out_is_refused_and_nothing_is_written(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    refused(capsys, [str(folder), "--out", str(out), "--csv", str(out), *model_flags], "--csv and --out are the same")
    assert not out.exists()
    assert cli_main(["caption", str(folder), "--out", str(out), *model_flags]) == 0
    before = out.read_bytes()
    refused(capsys, [str(folder), "--out", str(out), "--csv", str(out), *model_flags], "same file")
    assert out.read_bytes() == before


def test_csv_that_is_not_ours_is_refused_ours_is_replaced(tmp_path, folder, model_flags, capsys):
    out, csv_path = tmp_path / "c.jsonl", tmp_path / "c.csv"
    users = b"name,score\nalice,3\n"
    csv_path.write_bytes(users)
    refused(capsys, [str(folder), "--out", str(out), "--csv", str(csv_path), *model_flags],
            "not a CSV written by mmspec caption")
    assert csv_path.read_bytes() == users and not out.exists()
    csv_path.unlink()
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), "--csv", str(csv_path), *model_flags]) == 0
    first = csv_path.read_bytes()
    assert first.startswith(",".join(caption.FIELDS).encode())
    assert cli_main(["caption", str(folder), "--out", str(out), "--csv", str(csv_path), *model_flags]) == 0
    assert csv_path.read_bytes() != first and csv_path.read_bytes().count(b".png") == 3  # ours: replaced


# ----------------------------------------------------------------------------------------------------------
# folders, special files, unwritable places
# ----------------------------------------------------------------------------------------------------------
def test_out_or_csv_a_folder_is_refused(tmp_path, folder, model_flags, capsys):
    refused(capsys, [str(folder / "0.png"), "--out", str(tmp_path), *model_flags], "is a folder")
    out = tmp_path / "c.jsonl"
    refused(capsys, [str(folder / "0.png"), "--out", str(out), "--csv", str(tmp_path), *model_flags], "is a folder")
    assert not out.exists()


def test_csv_in_a_missing_folder_is_refused_before_any_work(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    refused(capsys, [str(folder), "--out", str(out), "--csv", str(tmp_path / "nowhere" / "c.csv"), *model_flags],
            "does not exist", "create it first")
    assert not out.exists()
    # next to --out, whose folder the run creates, it is fine
    new = tmp_path / "new"
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(new / "c.jsonl"), "--csv", str(new / "c.csv"),
                     *model_flags]) == 0
    assert (new / "c.csv").read_text().count("\n") == 2


def test_out_below_a_file_is_refused(tmp_path, folder, model_flags, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"mine\n")
    refused(capsys, [str(folder / "0.png"), "--out", str(notes / "c.jsonl"), *model_flags], "not a folder")
    assert notes.read_bytes() == b"mine\n"


@pytest.mark.parametrize("device", ["/dev/full", "/dev/null"])
def test_out_a_device_is_refused_at_once(folder, model_flags, capsys, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    start = time.monotonic()
    refused(capsys, [str(folder), "--out", device, *model_flags], "character device", "regular file", "resume")
    assert time.monotonic() - start < 60  # (not a timing check: /dev/full used to grow the process without end)


def test_out_a_fifo_is_refused_without_hanging(tmp_path, folder, model_flags, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(capsys, [str(folder), "--out", str(fifo), *model_flags], "a pipe", "regular file")


def test_out_dev_stdout_piped_is_refused(folder, tiny_target, tiny_drafter):
    """``--out /dev/stdout | head`` used to hang reading its own pipe."""
    cmd = [sys.executable, "-m", "mmspec.cli", "caption", str(folder), "--out", "/dev/stdout", "--target",
           str(tiny_target), "--drafter", str(tiny_drafter), "--quiet"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert res.returncode == 2, res.stderr.decode()
    err = res.stderr.decode()
    assert "regular file" in err and "Traceback" not in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a folder nobody can create files in)")
def test_unwritable_places_are_refused_up_front(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    refused(capsys, [str(folder), "--out", str(out), "--csv", "/proc/mmspec-test.csv", *model_flags],
            "cannot create files in /proc")
    assert not out.exists()
    refused(capsys, [str(folder), "--out", "/proc/mmspec-test.jsonl", *model_flags], "/proc/mmspec-test.jsonl")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_out_is_refused_unchanged(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    before = out.read_bytes()
    out.chmod(stat.S_IRUSR)
    try:
        refused(capsys, [str(folder), "--out", str(out), *model_flags], "not writable")
    finally:
        out.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert out.read_bytes() == before


# ----------------------------------------------------------------------------------------------------------
# flags checked before the first input
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--num-draft-tokens", "1000"], "--num-draft-tokens"),
    (["--num-draft-tokens", "-1"], "--num-draft-tokens"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--limit", "0"], "--limit"),
    (["--workers", "0"], "--workers"),
    (["--num-cpus-per-worker", "0"], "--num-cpus-per-worker"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--device", "nonsense"], "unknown device"),
    (["--target", "/nonexistent/model"], "does not exist"),
    (["--drafter", "/nonexistent/drafter"], "does not exist"),
    (["--preset", "no-such-pair"], "unknown preset"),
    (["--prompt", "<image> and <image>: describe"], "image token"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_bad_flag_value_writes_nothing(tmp_path, folder, model_flags, capsys, flags, needle):
    out = tmp_path / "c.jsonl"
    refused(capsys, [str(folder), "--out", str(out), *model_flags, *flags], needle)
    assert not out.exists()
    # an existing file is left as it was, and a rerun with good values captions every input
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    before = out.read_bytes()
    refused(capsys, [str(folder), "--out", str(out), *model_flags, *flags], needle)
    assert out.read_bytes() == before
    assert cli_main(["caption", str(folder), "--out", str(out), *model_flags]) == 0
    assert len(own_lines(out)) == 3 and all(r["error"] is None for r in own_lines(out))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu(tmp_path, folder, model_flags, capsys):
    out = tmp_path / "c.jsonl"
    refused(capsys, [str(folder), "--out", str(out), *model_flags, "--device", "cuda"], "no CUDA", "cpu")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# writes that fail: disk full, a closed pipe
# ----------------------------------------------------------------------------------------------------------
def test_disk_full_stops_with_complete_lines_and_resumes(tmp_path, folder, model_flags):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size, as a full disk does: the run stops with exit 2
    and a clear message, the file ends with complete lines, and a rerun finishes the batch."""
    import resource

    out = tmp_path / "c.jsonl"
    assert cli_main(["caption", str(folder / "0.png"), "--out", str(out), *model_flags]) == 0
    size = out.stat().st_size
    limit = size + size * 3 // 2  # room for one more line, not two
    cmd = [sys.executable, "-m", "demos.caption", str(folder), "--out", str(out), *model_flags]

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, timeout=300, preexec_fn=cap)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert "cannot write to" in err and "rerun the same command" in err and "Traceback" not in err, err
    recs = own_lines(out)  # complete lines only: the failed write was taken back
    assert len(recs) == 2 and out.stat().st_size <= limit
    assert cli_main(["caption", str(folder), "--out", str(out), *model_flags]) == 0
    assert sorted(Path(r["path"]).name for r in own_lines(out)) == ["0.png", "1.png", "2.png"]


def test_a_failed_write_takes_back_its_partial_line(tmp_path, monkeypatch):
    out = tmp_path / "c.jsonl"
    with caption.CaptionLog(out) as log:
        log.append({"path": "a.png", "prompt": "p", "caption": "x", "error": None})
        before = out.read_bytes()
        real_write = os.write

        def half_then_full(fd, data):
            if fd == log.fd:
                if len(data) > 4:
                    return real_write(fd, bytes(data[:4]))
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(caption.os, "write", half_then_full)
        with pytest.raises(caption.WriteFailed, match="No space left on device"):
            log.append({"path": "b.png", "prompt": "p", "caption": "y", "error": None})
        monkeypatch.undo()
    assert out.read_bytes() == before


def test_closed_stdout_pipe_stops_cleanly_and_resumes(tmp_path, tiny_target, tiny_drafter):
    """``mmspec caption ... --compare | head -1``: the run stops with a one-line message and exit status 2 once
    its reader is gone; the lines written stay whole and a rerun finishes."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(6):
        sample_image(320 + i).save(folder / f"{i}.png")
    out = tmp_path / "c.jsonl"
    code = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import demos.caption as c\nf = c.caption_one\n"
            "def slow(*a, **k):\n    r = f(*a, **k)\n    time.sleep(0.3)\n    return r\n"
            "c.caption_one = slow\nsys.exit(c.main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", code, str(folder), "--out", str(out), "--compare", "--target", str(tiny_target),
           "--drafter", str(tiny_drafter), "--max-new-tokens", str(MAX_NEW)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()  # one per-image report, then the reader goes away
        assert first, proc.stderr.read().decode()[-2000:]
        proc.stdout.close()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 2, err[-2000:]
    assert "broken pipe" in err and "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    n = len(own_lines(out))
    assert 1 <= n < 6
    assert cli_main(["caption", str(folder), "--out", str(out), "--quiet", "--target", str(tiny_target),
                     "--drafter", str(tiny_drafter), "--max-new-tokens", str(MAX_NEW)]) == 0
    assert len(own_lines(out)) == 6


# ----------------------------------------------------------------------------------------------------------
# start-up and Ctrl-C
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["caption"], ["demo"], ["bench"], ["train-drafter"], ["serve"]])
def test_help_imports_nothing_heavy(command):
    code = ("import sys\nfrom mmspec.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'gradio', 'ray') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code, *command, "--help"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert "usage: mmspec" in res.stdout
    assert "HEAVY []" in res.stderr, res.stderr


def test_ctrl_c_during_start_up_exits_130_quietly():
    # argument parsing made slow, so that the SIGINT lands inside it
    # (SIGINT back to Python's default: a runner started in the background may hand its children SIGINT ignored)
    code = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import mmspec.cli as c\nslow = c.build_parser\n"
            "def build(*a, **k):\n    print('ready', flush=True)\n    time.sleep(30)\n    return slow(*a, **k)\n"
            "c.build_parser = build\nsys.exit(c.main(['caption', '--help']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err


def test_ctrl_c_mid_batch_exits_130_quietly_and_resumes(tmp_path, tiny_target, tiny_drafter):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        sample_image(340 + i).save(folder / f"{i}.png")
    out = tmp_path / "c.jsonl"
    flags = ["--target", str(tiny_target), "--drafter", str(tiny_drafter), "--max-new-tokens", str(MAX_NEW),
             "--quiet"]
    code = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import demos.caption as c\nf = c.caption_one\n"
            "def slow(*a, **k):\n    r = f(*a, **k)\n    time.sleep(0.3)\n    return r\n"
            "c.caption_one = slow\nsys.exit(c.main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), "--out", str(out), *flags], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (
                out.exists() and out.read_bytes().count(b"\n") >= 2):
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err and "rerun the same command" in err, err
    assert 2 <= len(own_lines(out)) < 8
    assert cli_main(["caption", str(folder), "--out", str(out), *flags]) == 0
    assert len(own_lines(out)) == 8


# ----------------------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_target, tiny_drafter):
    return mmspec.load(str(tiny_target), drafter=str(tiny_drafter))


def test_image_token_in_the_prompt_is_honoured(pipe):
    token = pipe.processor.image_token
    plain = pipe.adapter.format_prompt(PROMPT)
    for prompt in (f"{token} {PROMPT}", f"{token}\n{PROMPT}", f"  {token}{PROMPT}"):
        text = pipe.adapter.format_prompt(prompt)
        assert text.count(token) == 1 and text == plain  # where the template puts an image, and only one
    img = sample_image(7)
    assert (pipe.generate(img, f"{token}\n{PROMPT}", max_new_tokens=MAX_NEW).token_ids
            == pipe.generate(img, PROMPT, max_new_tokens=MAX_NEW).token_ids)
    with pytest.raises(mmspec.MMSpecError, match="image token .* 2 times"):
        pipe.generate(img, f"{token} {token} {PROMPT}")


def test_seed_out_of_range(pipe):
    img = sample_image(8)
    for seed in (2**64, 2**70, -1):
        with pytest.raises(mmspec.MMSpecError, match=r"seed must be in \[0, 2\*\*64\)"):
            pipe.generate(img, PROMPT, temperature=1.0, seed=seed, max_new_tokens=2)
    res = pipe.generate(img, PROMPT, temperature=1.0, seed=2**64 - 1, max_new_tokens=2)
    assert 1 <= len(res.token_ids) <= 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_load_on_cuda_without_a_gpu():
    with pytest.raises(mmspec.MMSpecError, match="no CUDA GPU|no CUDA support"):
        mmspec.load(device="cuda")


def test_load_bad_devices_and_paths(tmp_path):
    with pytest.raises(mmspec.MMSpecError, match="unknown device"):
        mmspec.load(device="gpu")
    with pytest.raises(mmspec.MMSpecError, match="'/nonexistent' does not exist"):
        mmspec.load(target="/nonexistent")
    with pytest.raises(mmspec.MMSpecError, match="does not exist"):
        mmspec.load(target=tmp_path / "missing")
    with pytest.raises(mmspec.MMSpecError, match="does not exist"):
        mmspec.load(drafter="./no-such-drafter")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(mmspec.MMSpecError, match="is a file"):
        mmspec.load(target=str(tmp_path / "weights.bin"))


def test_hub_ids_still_go_to_the_hub(monkeypatch):
    """``org/name`` is not mistaken for a missing folder; offline, the error says it was taken as a hub id."""
    from mmspec.pipeline import check_model_path

    for hub_id in ("llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "gpt2"):
        check_model_path("target", hub_id)  # no error
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mmspec.MMSpecError, match="taken as a hub id") as e:
        mmspec.load(target="nobody-here/no-such-model")
    assert "does not exist" not in str(e.value)
