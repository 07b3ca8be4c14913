"""How long a benchmark run will take: the seconds each measurement took in earlier runs on
this machine (kept in ~/.cache/fastlm/bench_history.json, per device type, profile, op and
implementation), else the durations shipped with fastlm (measured on a reference machine),
else a rough guess per measurement."""

import json
import os

_FILE = "bench_history.json"
# Seconds per measurement when nothing better is known (the first measurement of a compiled
# implementation also pays for the compilation).
GUESS = {"cpu": 4.0, "cuda": 1.5}
COMPILE_GUESS = {"cpu": 60.0, "cuda": 45.0}


def _path():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastlm", _FILE)


def _shipped():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def _load(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def estimate(todo, device_type, profile):
    """(seconds, where the estimate comes from) for the measurements `todo` [(op, impl)]."""
    if not todo:
        return 0.0, "nothing to run"
    sources = [("earlier runs here", _load(_path())), ("a reference run", _load(_shipped()))]
    total, known, seen_compiled = 0.0, {name: 0 for name, _ in sources}, set()
    for op, impl in todo:
        for name, data in sources:
            entry = data.get(device_type, {}).get(profile, {}).get(f"{op}/{impl}")
            if entry:
                total += entry["mean_s"] + (entry.get("first_extra_s", 0.0)
                                            if (op, impl) not in seen_compiled else 0.0)
                known[name] += 1
                break
        else:
            total += GUESS.get(device_type, 4.0)
            if "compile" in impl and (op, impl) not in seen_compiled:
                total += COMPILE_GUESS.get(device_type, 60.0)
        seen_compiled.add((op, impl))
    guessed = len(todo) - sum(known.values())
    parts = [f"{n} from {name}" for name, n in known.items() if n]
    if guessed:
        parts.append(f"{guessed} guessed")
    return total, "; ".join(parts)


def record(durations, device_type, profile):
    """Remember {"op/impl": [seconds per measurement]} of this run (best effort)."""
    if not durations:
        return
    path = _path()
    data = _load(path)
    slot = data.setdefault(device_type, {}).setdefault(profile, {})
    for key, secs in durations.items():
        rest = secs[1:] or secs
        mean = sum(rest) / len(rest)
        slot[key] = {"mean_s": round(mean, 3), "first_extra_s": round(max(0.0, secs[0] - mean), 3)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def format_seconds(seconds):
    """"45 s", "3.2 min"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
