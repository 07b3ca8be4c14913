"""`fastlm train`: train a byte-level GPT (vocab 256) on a text file, with nothing to download.

    fastlm train                                 # on the Python standard library's own source
    fastlm train --data input.txt --steps 2000 --out ckpt/
    fastlm train --out ckpt/ --resume            # continue exactly where ckpt/ stopped
    fastlm train --steps 200 --compare torch     # the same run on a torch.nn-built twin

The data is read as bytes; the last 10% is held out for evaluation. Batches are drawn at
random offsets from a generator seeded by --seed. The model is fastlm.models.GPT, the optimizer
fastlm.optim.AdamW (weight decay on matmul weights and embeddings only, gradient clipping fused
into the step), the learning rate a linear warm-up then a cosine decay to a tenth over --steps.

Checkpoints (--out DIR: DIR/ckpt.pt) hold the model, the optimizer, the step, the config and
every random state (torch's, CUDA's, the batch sampler's), written at each evaluation, at the
end and on Ctrl-C; --resume continues bit for bit on the CPU (a run of N steps equals K steps,
then --resume for the rest). The first Ctrl-C finishes the current step, saves and exits; a
second one aborts at once.

--compare torch trains fastlm.models.TorchGPT (torch.nn.LayerNorm,
F.scaled_dot_product_attention, full logits and F.cross_entropy) with torch.optim.AdamW (fused
where available) and torch.nn.utils.clip_grad_norm_, from the same initial weights on the same
batches, and prints both speeds and losses.

Options are defined in fastlm/cli.py (`fastlm train --help`); :func:`main` takes the same
arguments as a list.
"""

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import asdict

import torch

from .models import GPT, GPTConfig, TorchGPT

CHECKPOINT = "ckpt.pt"
STDLIB_MAX_BYTES = 4 << 20  # the default data: at most this much standard-library source
VAL_FRACTION = 0.1
EVAL_SEED = 0x5EED  # the evaluation batches: the same every time, and no draw from --seed's
# Model options and their defaults; None on the command line means "the default, or the
# checkpoint's value with --resume".
MODEL_DEFAULTS = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.0}


# ---------------------------------------------------------------------------------------------
# Data.
def stdlib_source(max_bytes=STDLIB_MAX_BYTES):
    """The .py files under the standard library's directory (os.path.dirname(os.__file__)),
    in sorted path order, concatenated up to max_bytes; site-packages is left out."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    text = f.read(max_bytes - total)
            except OSError:
                continue
            chunks.append(text)
            total += len(text)
            if total >= max_bytes:
                return b"".join(chunks)
    return b"".join(chunks)


def load_bytes(path):
    """The training text as bytes: the file at `path`, or the standard library's source."""
    if path is None:
        return stdlib_source(), f"the Python standard library's source ({os.path.dirname(os.__file__)})"
    try:
        with open(path, "rb") as f:
            return f.read(), path
    except OSError as e:
        raise SystemExit(f"fastlm train: cannot read --data {path}: {e.strerror}") from None


class Batches:
    """Random (x, y) windows of a uint8 token tensor, drawn with a seeded generator whose
    state is part of a checkpoint."""

    def __init__(self, data, block_size, batch_size, seed, device):
        self.data, self.block_size, self.batch_size, self.device = data, block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(block_size + 1)

    def next(self):
        T = self.block_size
        ix = torch.randint(len(self.data) - T, (self.batch_size,), generator=self.generator)
        w = self.data[ix.unsqueeze(1) + self._offsets].long()
        x, y = w[:, :-1], w[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)


def lr_at(step, lr, warmup, total):
    """Linear warm-up over `warmup` steps, then a cosine decay to lr / 10 at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return lr / 10
    ratio = (step - warmup) / max(1, total - warmup)
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - lr / 10)


# ---------------------------------------------------------------------------------------------
# Checkpoints.
def _rng_state(batches):
    state = {"torch": torch.get_rng_state(), "batches": batches.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, batches):
    torch.set_rng_state(state["torch"])
    batches.generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out, model, optimizer, step, batches, config, data_info):
    """Write out/ckpt.pt atomically (a temporary file renamed over the old one)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, CHECKPOINT)
    state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "config": asdict(config), "rng": _rng_state(batches),
             "data": data_info, "fastlm": _version()}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out):
    path = os.path.join(out, CHECKPOINT)
    if not os.path.isfile(path):
        raise SystemExit(f"fastlm train: --resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def _version():
    from . import __version__

    return __version__


def _unwrap(model):
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------
class _StopRequest:
    """The first SIGINT asks the loop to stop after the current step; a second aborts.
    (Only the main thread can install a signal handler; elsewhere Ctrl-C is untouched.)"""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nfastlm train: Ctrl-C: stopping after this step (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _progress(enabled):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"),
                    TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(), disable=not enabled)


@torch.no_grad()
def evaluate(model, data, args, device, autocast):
    """Mean loss over args.eval_iters batches of `data`, the same batches every call."""
    was_training = model.training
    model.eval()
    batches = Batches(data, args.block_size, args.batch_size, EVAL_SEED, device)
    total = 0.0
    for _ in range(args.eval_iters):
        x, y = batches.next()
        with autocast():
            _, loss = model(x, y)
        total += loss.item()
    model.train(was_training)
    return total / args.eval_iters


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop(label, model, optimizer, clip, batches, val_data, args, device, start_step,
               checkpoint=None, on_step=None):
    """Train from start_step to args.steps (or args.stop_after more steps). Returns a dict:
    step reached, whether interrupted, tokens/s (steps after the first of the run), the last
    step's loss, a running mean of the loss and the last evaluation."""
    autocast = _autocast(args, device)
    tokens_per_step = args.batch_size * args.block_size
    end = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    warmup = args.warmup if args.warmup is not None else min(100, max(1, args.steps // 10))
    stats = {"step": start_step, "interrupted": False, "loss": float("nan"),
             "smooth_loss": float("nan"), "val_loss": None, "tokens_per_s": float("nan")}
    timed_steps, timed_s = 0, 0.0
    model.train()
    with _StopRequest() as stop, _progress(not args.no_progress) as bar:
        task = bar.add_task(label, total=args.steps, completed=start_step, loss=float("nan"),
                            tps=0.0)
        step = start_step
        while step < end:
            _sync(device)
            t0 = time.perf_counter()
            lr = lr_at(step, args.lr, warmup, args.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batches.next()
            with autocast():
                _, loss = model(x, y)
            loss.backward()
            if clip is not None:
                clip()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()  # (synchronizes)
            dt = time.perf_counter() - t0
            step += 1
            if step > start_step + 1:  # the first step of a run warms up (and compiles)
                timed_steps += 1
                timed_s += dt
            stats["loss"] = loss_value
            s = stats["smooth_loss"]
            stats["smooth_loss"] = loss_value if math.isnan(s) else 0.9 * s + 0.1 * loss_value
            tps = tokens_per_step * timed_steps / timed_s if timed_s else tokens_per_step / dt
            bar.update(task, completed=step, loss=stats["smooth_loss"], tps=tps)
            stats.update(step=step, tokens_per_s=tps)
            if on_step is not None:
                on_step(step, loss_value)
            last = step == end
            saved = False
            if (args.eval_every and step % args.eval_every == 0) or (last and step == args.steps):
                stats["val_loss"] = evaluate(model, val_data, args, device, autocast)
                print(f"{label} step {step}/{args.steps}: train loss (running mean) "
                      f"{stats['smooth_loss']:.4f}, "
                      f"val loss {stats['val_loss']:.4f}, lr {lr:.2e}, {tps:,.0f} tokens/s",
                      flush=True)
                if checkpoint is not None:
                    checkpoint(step)
                    saved = True
            if (last or stop.requested) and checkpoint is not None and not saved:
                checkpoint(step)
            if stop.requested and not last:
                stats["interrupted"] = True
                break
    return stats


def _autocast(args, device):
    if args.dtype == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _resolve(args):
    """Fill the defaults that depend on the machine or on the checkpoint."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastlm train: --device cuda but no GPU is visible "
                         "(torch.cuda.is_available() is False)")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    args.dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(args.dtype, args.dtype)
    return device


def _model_config(args, ckpt):
    fields = dict(MODEL_DEFAULTS)
    if ckpt is not None:
        saved = ckpt["config"]
        for k in fields:
            given = getattr(args, k)
            if given is not None and given != saved[k]:
                raise SystemExit(f"fastlm train: --resume: the checkpoint has {k}={saved[k]} "
                                 f"but {given} was given")
            fields[k] = saved[k]
    else:
        fields.update({k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    for k, value in fields.items():
        setattr(args, k, value)
    return GPTConfig(vocab_size=256, **fields)


def fused_adamw_kwargs(device_type):
    """{"fused": True} where torch.optim.AdamW has a fused step for device_type, else {}."""
    return {"fused": True} if device_type in ("cuda", "cpu") else {}


def _print_table(rows):
    from .bench.report import format_table

    print(format_table(["model", "tokens/s", "train loss (last step)", "val loss"],
                       [[r[0], f"{r[1]['tokens_per_s']:,.0f}", f"{r[1]['loss']:.4f}",
                         "-" if r[1]["val_loss"] is None else f"{r[1]['val_loss']:.4f}"]
                        for r in rows]))


def run(args, on_step=None):
    """Run `fastlm train` with parsed arguments; returns the exit status (130 when stopped by
    Ctrl-C). `on_step(step, loss)` is called after every step (for tests and tooling)."""
    device = _resolve(args)
    if args.resume and args.out is None:
        raise SystemExit("fastlm train: --resume needs --out DIR (where the checkpoint is)")
    if args.resume and args.compare:
        raise SystemExit("fastlm train: --compare trains both models from the same initial "
                         "weights: it cannot be combined with --resume")
    ckpt = load_checkpoint(args.out) if args.resume else None
    config = _model_config(args, ckpt)
    raw, source = load_bytes(args.data)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_val = int(len(data) * VAL_FRACTION)
    train_data, val_data = data[:len(data) - n_val], data[len(data) - n_val:]
    if min(len(train_data), len(val_data)) <= config.block_size:
        raise SystemExit(f"fastlm train: the data ({len(data):,} bytes from {source}) is too "
                         f"short for --block-size {config.block_size}: each of the train (90%) "
                         f"and validation (10%) splits needs more than block_size bytes")
    data_info = {"source": source, "bytes": len(data), "crc32": zlib.crc32(raw)}
    if ckpt is not None and (ckpt["data"]["bytes"], ckpt["data"]["crc32"]) != (
            data_info["bytes"], data_info["crc32"]):
        raise SystemExit(f"fastlm train: --resume: the checkpoint was trained on other data "
                         f"({ckpt['data']['source']}, {ckpt['data']['bytes']:,} bytes)")

    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    init_state = copy.deepcopy(model.state_dict()) if args.compare else None
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (0.9, 0.95), device.type,
                                           max_grad_norm=args.grad_clip or None)
    batches = Batches(train_data, config.block_size, args.batch_size, args.seed, device)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        _set_rng_state(ckpt["rng"], batches)
        print(f"resumed from {os.path.join(args.out, CHECKPOINT)} at step {start}")
    print(f"data: {len(data):,} bytes from {source} ({len(train_data):,} train, "
          f"{len(val_data):,} validation)")
    print(f"model: GPT n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
          f"block_size={config.block_size} vocab 256, {model.num_params():,} parameters; "
          f"{device}, {args.dtype}; {args.batch_size * config.block_size:,} tokens per step")
    trained = torch.compile(model) if args.compile else model

    def checkpoint(step):
        save_checkpoint(args.out, model, optimizer, step, batches, config, data_info)

    stats = train_loop("fastlm", trained, optimizer, None, batches, val_data, args, device,
                       start, checkpoint if args.out else None, on_step)
    if stats["interrupted"]:
        where = (f"checkpoint saved to {os.path.join(args.out, CHECKPOINT)}; continue with "
                 "--resume" if args.out else "no --out given, so nothing was saved")
        print(f"stopped at step {stats['step']}/{args.steps}: {where}")
        return 130
    if stats["step"] < args.steps:
        print(f"stopped at step {stats['step']}/{args.steps} (--stop-after {args.stop_after})"
              + ("; continue with --resume" if args.out else ""))
    if args.sample_tokens > 0:
        model.eval()
        prompt = torch.tensor([[ord("\n")]], dtype=torch.long, device=device)
        with _autocast(args, device)():
            out = model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=50)
        text = bytes(out[0, 1:].tolist()).decode("utf-8", errors="replace")
        print(f"--- sample ({args.sample_tokens} bytes) ---\n{text}\n--- end of sample ---")
    print(f"fastlm: {stats['step']} steps, {stats['tokens_per_s']:,.0f} tokens/s, last step's "
          f"loss {stats['loss']:.4f}"
          + (f", val loss {stats['val_loss']:.4f}" if stats["val_loss"] is not None else ""))
    if args.compare:
        return _compare(args, config, init_state, train_data, val_data, device, stats)
    return 0


def _compare(args, config, init_state, train_data, val_data, device, fastlm_stats):
    """Train TorchGPT from the same initial weights on the same batches; print both."""
    torch.manual_seed(args.seed)
    model = TorchGPT(config).to(device)
    model.load_state_dict(init_state)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                  betas=(0.9, 0.95), **fused_adamw_kwargs(device.type))
    clip = None
    if args.grad_clip:
        def clip():
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    batches = Batches(train_data, config.block_size, args.batch_size, args.seed, device)
    trained = torch.compile(model) if args.compile else model
    stats = train_loop("torch", trained, optimizer, clip, batches, val_data, args, device, 0)
    print()
    _print_table([("fastlm (fastlm.models.GPT, fastlm.optim.AdamW)", fastlm_stats),
                  ("torch (torch.nn modules, torch.optim.AdamW)", stats)])
    ratio = fastlm_stats["tokens_per_s"] / stats["tokens_per_s"]
    print(f"fastlm / torch speed: {ratio:.2f}x")
    return 130 if stats["interrupted"] else 0


def main(argv=None):
    """`fastlm train` with `argv` (a list of its options); returns the exit status."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
