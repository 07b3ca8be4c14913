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

Distributed (launched by torchrun: WORLD_SIZE, RANK and LOCAL_RANK in the environment):

    torchrun --standalone --nproc_per_node 2 -m fastlm train ...          # DDP
    torchrun --standalone --nproc_per_node 2 -m fastlm train --fsdp ...   # FSDP2

The process group is gloo on the CPU, nccl on CUDA (device cuda:LOCAL_RANK). The model is
wrapped in DistributedDataParallel, or with --fsdp sharded by FSDP2 (fully_shard on each block,
then on the whole model; fastlm.optim.AdamW steps the local shards). Each step's global batch
is the single-process run's (the same seeded draw of --batch-size offsets on every rank, each
rank taking its slice: --batch-size must divide by the world size), so the losses equal a
single-process run's up to float rounding; the loss printed and logged, and the validation loss,
are global means (all-reduced). Dropout draws from a stream per rank. Only rank 0 prints and
writes files; checkpoints hold full (gathered) tensors in the single-process format, so a run
resumes under DDP, FSDP2 or one process alike, exactly when the world size is unchanged (each
rank's random state is saved). Ctrl-C: torchrun forwards SIGINT to every worker; the ranks
agree (an all-reduce each step) on the step after which they all stop and save. --compare is
single-process only.

--out DIR also gets DIR/log.jsonl: one JSON object a step ({"step", "loss", "lr",
"tokens_per_s"}, and "val_loss" where evaluated); --resume drops the lines after the resumed
step and appends.

Options are defined in fastlm/cli.py (`fastlm train --help`); :func:`main` takes the same
arguments as a list.
"""

import contextlib
import copy
import json
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
LOG = "log.jsonl"
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
    state is part of a checkpoint. With world > 1, every rank draws the same batch_size
    offsets (the global batch) and keeps its slice of batch_size // world of them."""

    def __init__(self, data, block_size, batch_size, seed, device, rank=0, world=1):
        self.data, self.block_size, self.batch_size, self.device = data, block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(block_size + 1)
        self._local = slice(rank * (batch_size // world), (rank + 1) * (batch_size // world))

    def next(self):
        T = self.block_size
        ix = torch.randint(len(self.data) - T, (self.batch_size,), generator=self.generator)
        ix = ix[self._local]
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
def _rng_state(batches, dist=None):
    """torch's, CUDA's and the batch sampler's random states; under torchrun also every
    rank's torch (and CUDA device) state, gathered (a collective: every rank calls it)."""
    state = {"torch": torch.get_rng_state(), "batches": batches.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if dist is not None:
        mine = {"torch": torch.get_rng_state()}
        if dist.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(dist.device)
        state["ranks"] = dist.gather_objects(mine)
    return state


def _set_rng_state(state, batches, dist=None, seed=0, step=0):
    torch.set_rng_state(state["torch"])
    batches.generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    ranks = state.get("ranks")
    if dist is None or (dist.world == 1 and ranks is None):
        return True
    if ranks is not None and len(ranks) == dist.world:
        torch.set_rng_state(ranks[dist.rank]["torch"])
        if "cuda" in ranks[dist.rank] and dist.device.type == "cuda":
            torch.cuda.set_rng_state(ranks[dist.rank]["cuda"], dist.device)
        return True
    if dist.rank > 0:  # another world size wrote it: new streams on ranks > 0 (dropout)
        torch.manual_seed(_rank_seed(seed, dist.rank) + 7919 * step)
    return False


def _rank_seed(seed, rank):
    """The seed of rank `rank`'s torch stream (dropout) after the model's initialisation
    (rank > 0; rank 0 goes on with the single-process stream)."""
    return seed + rank


def _full(t):
    """A plain CPU tensor: a DTensor gathered (a collective), a CUDA tensor copied."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def full_state_dicts(model, optimizer):
    """The model's and the optimizer's state_dicts with full CPU tensors, in the single-process
    format (under FSDP2 every DTensor is gathered: all ranks must call this, in step)."""
    model_sd = {k: _full(v) for k, v in _unwrap(model).state_dict().items()}
    opt_sd = optimizer.state_dict()
    opt_sd = {"state": {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()}
                        for i, st in opt_sd["state"].items()},
              "param_groups": opt_sd["param_groups"]}
    return model_sd, opt_sd


def shard_optimizer_state(opt_sd, optimizer):
    """A full (single-process format) optimizer state_dict with the moments of DTensor params
    turned into DTensors placed like their params (FSDP2), ready for load_state_dict."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, st in opt_sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
                    and v.dim() > 0 else v for k, v in st.items()}
    return {"state": state, "param_groups": opt_sd["param_groups"]}


def save_checkpoint(out, model, optimizer, step, batches, config, data_info, dist=None):
    """Write out/ckpt.pt atomically (a temporary file renamed over the old one). Under
    torchrun every rank calls it (the state is gathered) and rank 0 writes."""
    if dist is None:
        model_sd, opt_sd = _unwrap(model).state_dict(), optimizer.state_dict()
    elif dist.fsdp:
        model_sd, opt_sd = full_state_dicts(model, optimizer)
    else:  # DDP: every rank holds the same full state
        model_sd, opt_sd = _unwrap(model).state_dict(), optimizer.state_dict()
    rng = _rng_state(batches, dist)
    path = os.path.join(out, CHECKPOINT)
    if dist is not None and dist.rank != 0:
        return path
    os.makedirs(out, exist_ok=True)
    state = {"model": model_sd, "optimizer": opt_sd,
             "step": step, "config": asdict(config), "rng": rng,
             "data": data_info, "fastlm": _version()}
    if dist is not None:
        state["world_size"] = dist.world
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
    """The GPT inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" \
        else model


# ---------------------------------------------------------------------------------------------
# torchrun.
class Distributed:
    """This process's place in a torchrun launch: rank, world size, device, DDP or FSDP2."""

    def __init__(self, rank, world, local_rank, device, fsdp):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.fsdp = device, fsdp
        self.owner = True  # this run started the process group (and destroys it at the end)

    def all_reduce_sum(self, values):
        """The sums over the ranks of a list of floats (one all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj):
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model):
        """DistributedDataParallel(model), or FSDP2: fully_shard on each block, then on the
        whole model (which is changed in place and returned)."""
        if not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)


def launched_by_torchrun(environ=None):
    """Whether torchrun (or torch.distributed.run) started this process."""
    environ = os.environ if environ is None else environ
    return all(k in environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def init_distributed(args):
    """Under torchrun: check the options, pick the device (cuda:LOCAL_RANK or cpu), init the
    process group (nccl or gloo) and return a Distributed; else None (after checking that
    --fsdp was not asked for without torchrun)."""
    if not launched_by_torchrun():
        if args.fsdp:
            raise SystemExit("fastlm train: --fsdp shards the model over processes: launch "
                             "with torchrun (torchrun --nproc_per_node N -m fastlm train "
                             "--fsdp ...)")
        return None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.compare:
        raise SystemExit("fastlm train: --compare runs in one process: launch it without "
                         "torchrun")
    if args.batch_size % world:
        raise SystemExit(f"fastlm train: --batch-size {args.batch_size} must be a multiple of "
                         f"the number of processes ({world}): each takes an equal slice of "
                         "the global batch")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is not None:
            raise SystemExit(f"fastlm train: --device {args.device}: under torchrun each "
                             "process uses cuda:LOCAL_RANK; pass --device cuda")
        if not torch.cuda.is_available():
            raise SystemExit("fastlm train: --device cuda but no GPU is visible "
                             "(torch.cuda.is_available() is False)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"fastlm train: --device {args.device}: torchrun runs support cpu "
                         "(gloo) and cuda (nccl)")
    args.device = str(device)
    import torch.distributed as dist

    owner = not dist.is_initialized()  # (a caller may have started the group already)
    if owner:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    out = Distributed(rank, world, local_rank, device, args.fsdp)
    out.owner = owner
    return out


# ---------------------------------------------------------------------------------------------
class _StopRequest:
    """The first SIGINT asks the loop to stop after the current step; a second aborts.
    (Only the main thread can install a signal handler; elsewhere Ctrl-C is untouched.)"""

    def __init__(self, verbose=True):
        self.requested = False
        self.verbose = verbose
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print("\nfastlm train: Ctrl-C: stopping after this step (Ctrl-C again to abort "
                  "now)", file=sys.stderr, flush=True)

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
def evaluate(model, data, args, device, autocast, dist=None):
    """Mean loss over args.eval_iters batches of `data`, the same batches every call (under
    torchrun: each rank's slices of the global batches, the mean all-reduced)."""
    was_training = model.training
    model.eval()
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    batches = Batches(data, args.block_size, args.batch_size, EVAL_SEED, device, rank, world)
    total = 0.0
    for _ in range(args.eval_iters):
        x, y = batches.next()
        with autocast():
            _, loss = model(x, y)
        total += loss.item()
    model.train(was_training)
    if dist is not None:
        total = dist.all_reduce_sum([total])[0] / world
    return total / args.eval_iters


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop(label, model, optimizer, clip, batches, val_data, args, device, start_step,
               checkpoint=None, on_step=None, dist=None, log=None):
    """Train from start_step to args.steps (or args.stop_after more steps). Returns a dict:
    step reached, whether interrupted, tokens/s (steps after the first of the run), the last
    step's loss, a running mean of the loss and the last evaluation. Under torchrun (dist)
    the loss is the global mean and the ranks agree on stopping (one all-reduce a step).
    log(record) gets a dict a step."""
    autocast = _autocast(args, device)
    tokens_per_step = args.batch_size * args.block_size
    end = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    warmup = args.warmup if args.warmup is not None else min(100, max(1, args.steps // 10))
    stats = {"step": start_step, "interrupted": False, "loss": float("nan"),
             "smooth_loss": float("nan"), "val_loss": None, "tokens_per_s": float("nan")}
    timed_steps, timed_s = 0, 0.0
    model.train()
    rank0 = dist is None or dist.rank == 0
    with _StopRequest(rank0) as stop, _progress(rank0 and not args.no_progress) as bar:
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
            if dist is None:
                loss_value = loss.item()  # (synchronizes)
                stopping = stop.requested
            else:  # the global mean loss, and whether any rank got a Ctrl-C
                total, stops = dist.all_reduce_sum([loss.item(), float(stop.requested)])
                loss_value, stopping = total / dist.world, stops > 0
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
            record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tps}
            last = step == end
            evaluated = False
            if (args.eval_every and step % args.eval_every == 0) or (last and step == args.steps):
                stats["val_loss"] = evaluate(model, val_data, args, device, autocast, dist)
                record["val_loss"] = stats["val_loss"]
                evaluated = True
                print(f"{label} step {step}/{args.steps}: train loss (running mean) "
                      f"{stats['smooth_loss']:.4f}, "
                      f"val loss {stats['val_loss']:.4f}, lr {lr:.2e}, {tps:,.0f} tokens/s",
                      flush=True)
            if log is not None:  # (before the checkpoint: a logged step may be resumed)
                log(record)
            if dist is None:  # (a Ctrl-C during the evaluation counts for this step)
                stopping = stop.requested
            if (evaluated or last or stopping) and checkpoint is not None:
                checkpoint(step)
            if stopping and not last:
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
    Ctrl-C). `on_step(step, loss)` is called after every step (for tests and tooling). Under
    torchrun this process joins the process group (destroyed at the end); ranks other than 0
    print nothing."""
    if not hasattr(args, "fsdp"):
        args.fsdp = False
    dist = init_distributed(args)
    if dist is None:
        return _run(args, on_step, None)
    import torch.distributed

    try:
        if dist.rank == 0:
            status = _run(args, on_step, dist)
        else:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                status = _run(args, on_step, dist)
        # Leave together: rank 0 may still be sampling or saving when another rank is done,
        # and gloo aborts a process ("terminate called without an active exception") whose
        # peer is still using the group while it tears its own down.
        torch.distributed.barrier()
        return status
    finally:
        if dist.owner:
            torch.distributed.destroy_process_group()


def _open_log(out, start):
    """DIR/log.jsonl: the lines of steps <= start kept (all of them when start is 0: a new
    run starts an empty log); returns log(record), which appends one line."""
    path = os.path.join(out, LOG)
    os.makedirs(out, exist_ok=True)
    kept = []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line.rstrip("\n") + "\n")
                except (ValueError, KeyError, TypeError):
                    break  # a line cut short by a kill: drop it and what follows
    with open(path, "w") as f:
        f.writelines(kept)

    def log(record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    return log


def _run(args, on_step, dist):
    rank0 = dist is None or dist.rank == 0
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
    if ckpt is not None:  # before DDP (which broadcasts it) or FSDP2 (which shards it)
        model.load_state_dict(ckpt["model"])
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    wrapped = model if dist is None else dist.wrap(model)  # FSDP2 shards `model` in place
    if rank > 0:  # dropout: a stream per rank (rank 0 goes on with the single-process one)
        torch.manual_seed(_rank_seed(args.seed, rank))
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (0.9, 0.95), device.type,
                                           max_grad_norm=args.grad_clip or None)
    batches = Batches(train_data, config.block_size, args.batch_size, args.seed, device, rank,
                      world)
    start = 0
    if ckpt is not None:
        opt_sd = ckpt["optimizer"]
        if dist is not None and dist.fsdp:
            opt_sd = shard_optimizer_state(opt_sd, optimizer)
        optimizer.load_state_dict(opt_sd)
        start = ckpt["step"]
        exact = _set_rng_state(ckpt["rng"], batches, dist, args.seed, start)
        print(f"resumed from {os.path.join(args.out, CHECKPOINT)} at step {start}"
              + ("" if exact else f" (written by {ckpt.get('world_size', 1)} process(es), "
                 f"not {world}: dropout's random streams start afresh)"))
    print(f"data: {len(data):,} bytes from {source} ({len(train_data):,} train, "
          f"{len(val_data):,} validation)")
    where = f"{device}, {args.dtype}" if dist is None else (
        f"{world} processes ({'FSDP2' if dist.fsdp else 'DDP'}, "
        f"{'nccl' if device.type == 'cuda' else 'gloo'}), {device.type}, {args.dtype}")
    print(f"model: GPT n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
          f"block_size={config.block_size} vocab 256, {model.num_params():,} parameters; "
          f"{where}; {args.batch_size * config.block_size:,} tokens per step")
    trained = torch.compile(wrapped) if args.compile else wrapped

    def checkpoint(step):
        save_checkpoint(args.out, model, optimizer, step, batches, config, data_info, dist)

    log = _open_log(args.out, start) if args.out and rank0 else None
    stats = train_loop("fastlm", trained, optimizer, None, batches, val_data, args, device,
                       start, checkpoint if args.out else None, on_step, dist, log)
    if stats["interrupted"]:
        where = (f"checkpoint saved to {os.path.join(args.out, CHECKPOINT)}; continue with "
                 "--resume" if args.out else "no --out given, so nothing was saved")
        print(f"stopped at step {stats['step']}/{args.steps}: {where}")
        return 130
    if stats["step"] < args.steps:
        print(f"stopped at step {stats['step']}/{args.steps} (--stop-after {args.stop_after})"
              + ("; continue with --resume" if args.out else ""))
    if args.sample_tokens > 0:
        sampler = model
        if dist is not None and dist.fsdp:  # gather the shards; rank 0 samples from a copy
            full_sd = {k: _full(v) for k, v in model.state_dict().items()}
            if rank0:
                with torch.random.fork_rng(devices=[]):
                    sampler = GPT(config)
                sampler.load_state_dict(full_sd)
                sampler.to(device)
        if rank0:
            sampler.eval()
            prompt = torch.tensor([[ord("\n")]], dtype=torch.long, device=device)
            with _autocast(args, device)():
                out = sampler.generate(prompt, args.sample_tokens, temperature=0.8, top_k=50)
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
