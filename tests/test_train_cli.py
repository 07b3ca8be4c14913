"""`fastlm train`: a few steps of a tiny byte-level GPT on a small file; checkpoints resume bit
for bit (N steps straight == K steps, then --resume for the rest, also after Ctrl-C);
--compare torch; the default data; argument errors."""

import contextlib
import io
import re
import signal

import pytest
import torch
from trainutil import assert_same_training_state, load_checkpoint

from fastlm import cli, train

# A tiny model and run: dropout on, so that resuming must restore torch's random state too.
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--dropout", "0.1", "--eval-every", "3", "--eval-iters", "1",
        "--sample-tokens", "24", "--no-progress", "--device", "cpu"]
STEPS = 6


def _train(capsys, *args, on_step=None):
    parsed = cli.build_parser().parse_args(["train", *args])
    code = train.run(parsed, on_step=on_step)
    return code, capsys.readouterr().out


def _assert_same_state(a, b):
    assert_same_training_state(a, b)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def _sample(out):
    return out.split("--- sample")[1].split("--- end of sample ---")[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_file):
    """STEPS steps in one run: (checkpoint, stdout)."""
    out_dir = str(tmp_path_factory.mktemp("straight"))
    parsed = cli.build_parser().parse_args(["train", "--data", data_file, "--steps", str(STEPS),
                                            "--out", out_dir, *TINY])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert train.run(parsed) == 0
    return load_checkpoint(out_dir), buf.getvalue()


def test_train_runs_evaluates_and_samples(straight):
    ckpt, out = straight
    assert ckpt["step"] == STEPS and ckpt["config"]["vocab_size"] == 256
    assert "model: GPT n_layer=1 n_head=2 n_embd=16 block_size=16 vocab 256" in out
    assert re.search(r"fastlm step 3/6: train loss \(running mean\) [\d.]+, val loss [\d.]+",
                     out)
    assert re.search(r"fastlm step 6/6: train loss \(running mean\) [\d.]+, val loss [\d.]+",
                     out)
    final = re.search(r"fastlm: 6 steps, [\d,]+ tokens/s, last step's loss ([\d.]+), "
                      r"val loss ([\d.]+)", out)
    assert final and 0 < float(final.group(1)) < 6.0  # ln(256) = 5.55 at the start
    assert len(_sample(out)) > 0


def test_resume_continues_exactly(tmp_path, capsys, data_file, straight):
    out_dir = str(tmp_path)
    code, out = _train(capsys, "--data", data_file, "--steps", str(STEPS), "--stop-after", "4",
                       "--out", out_dir, *TINY)
    assert code == 0 and "stopped at step 4/6 (--stop-after 4); continue with --resume" in out
    assert load_checkpoint(out_dir)["step"] == 4
    code, out = _train(capsys, "--data", data_file, "--steps", str(STEPS), "--out", out_dir,
                       "--resume", *TINY)
    assert code == 0 and "at step 4" in out
    _assert_same_state(load_checkpoint(out_dir), straight[0])
    assert _sample(out) == _sample(straight[1])  # same weights and random state at the end


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path, capsys, data_file, straight):
    out_dir = str(tmp_path)

    def interrupt(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the step finishes, then it saves

    before = signal.getsignal(signal.SIGINT)
    code, out = _train(capsys, "--data", data_file, "--steps", str(STEPS), "--out", out_dir,
                       *TINY, on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert code == 130
    assert "stopped at step 2/6: checkpoint saved to" in out and "--- sample" not in out
    assert load_checkpoint(out_dir)["step"] == 2
    code, out = _train(capsys, "--data", data_file, "--steps", str(STEPS), "--out", out_dir,
                       "--resume", *TINY)
    assert code == 0
    _assert_same_state(load_checkpoint(out_dir), straight[0])


def test_compare_torch(capsys, data_file):
    args = [a for a in TINY if a not in ("--dropout", "0.1")]  # dropout bits differ by design
    code, out = _train(capsys, "--data", data_file, "--steps", "4", "--compare", "torch",
                       "--eval-every", "0", "--sample-tokens", "0", *args)
    assert code == 0
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^(fastlm|torch) \(.*?\)\s+[\d,]+\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)}
    assert set(rows) == {"fastlm", "torch"}
    # Same init, same batches, same optimizer math: the losses agree to float32 rounding.
    for a, b in zip(rows["fastlm"], rows["torch"]):
        assert abs(a - b) < 1e-3, rows
    assert re.search(r"fastlm / torch speed: [\d.]+x", out)


def test_default_data_is_the_standard_library():
    raw = train.stdlib_source(max_bytes=20_000)
    assert 0 < len(raw) <= 20_000 and b"def " in raw
    data, source = train.load_bytes(None)
    assert len(data) <= train.STDLIB_MAX_BYTES and "standard library" in source


def test_argument_errors(tmp_path, capsys, data_file, straight):
    with pytest.raises(SystemExit, match="--resume needs --out"):
        _train(capsys, "--data", data_file, "--resume", *TINY)
    with pytest.raises(SystemExit, match="no checkpoint at"):
        _train(capsys, "--data", data_file, "--resume", "--out", str(tmp_path), *TINY)
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 100)
    with pytest.raises(SystemExit, match="too short for --block-size 16"):
        _train(capsys, "--data", str(short), *TINY)
    with pytest.raises(SystemExit, match="cannot read --data"):
        _train(capsys, "--data", str(tmp_path / "missing.txt"), *TINY)
    torch.save(straight[0], tmp_path / train.CHECKPOINT)
    with pytest.raises(SystemExit, match="the checkpoint has n_layer=1 but 2 was given"):
        _train(capsys, "--data", data_file, "--resume", "--out", str(tmp_path),
               *TINY, "--n-layer", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "0"])
    assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data", "--steps", "--batch-size", "--block-size", "--n-layer", "--lr",
                   "--device", "--dtype", "--eval-every", "--out", "--resume", "--compare"):
        assert option in out
