"""What every command-line tool here promises, in one place: one-line errors, atomic outputs, no lost files.

    UsageError / Parser     bad input -> "stream.py: error: <what is wrong>; <how to fix it>" on stderr,
                            exit code 2, no traceback (argparse's own errors included, on one line)
    run_cli(prog, main)     the same for the errors a tool's main() raises (UsageError, missing file,
                            BadFileError: a checkpoint that is truncated or of another model)
    read_json(path)         a JSON file, or a UsageError naming the file and what is wrong with it
    atomic_path(target)     a unique temporary name next to `target` (same folder, same extension),
                            renamed into place on success, removed on an exception, Ctrl-C or SIGTERM
    atomic_dir(target)      the same for a whole directory; an existing `target` is replaced only if
                            it carries this tool's marker file (a directory it wrote itself)
    save_checkpoint(path)   {"config", "state_dict", "metrics"} written atomically, + a JSON for people
    load_checkpoint(path)   the model back, or an error naming the file and the train.py stage to re-run
    preset(PRESETS, name)   a fresh copy of a named configuration, or an error listing the known names

Why a unique temporary name (tempfile.mkstemp) and not "<target>.tmp": two processes writing the same
target would share the fixed name and corrupt each other's file. Why the rename: a reader (or a
crash) never sees a half-written file. Run `python safeio.py` for a demo.
"""
import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import copy
from dataclasses import asdict, fields, replace

import torch


class UsageError(ValueError):
    """Bad input. The message names the problem and how to fix it, in one line."""


class BadFileError(RuntimeError):
    """A file that exists but cannot be used (truncated checkpoint, wrong model): the message names it."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (argparse prints the whole usage first) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(message):
    return " ".join(str(message).split()) or "bad input"


def fail(prog, message):
    """Print the one-line error and exit 2: for bad input found outside argparse."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(prog, main, *args):
    """main(*args) of a tool; the bad input it reports (UsageError, a missing or unusable file) becomes
    one line and exit code 2. Other exceptions are bugs and keep their traceback."""
    try:
        return main(*args)
    except (UsageError, FileNotFoundError, BadFileError) as e:
        fail(prog, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def read_json(path, what="file"):
    """json.load with the file named in every error (missing, unreadable, not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, expected a JSON file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not a text (JSON) file") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno}); "
                         f"restore it or delete it and re-create it with the tool that wrote it") from None


def check_writable_file(path, what="--out"):
    """Fail before any work if `path` cannot become a file: it is a directory, or its folder is not
    writable. A missing folder is fine (the writers create it)."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory; give a file name such as {os.path.join(path, 'video.mp4')}")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):                       # the nearest existing ancestor must be writable
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UsageError(f"cannot write {path}: {d} is a file, not a folder")
    if not os.access(d, os.W_OK):
        raise UsageError(f"cannot write {path}: folder {d} is not writable")


# ----------------------------------------------------------------------------------------------
# Atomic outputs
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM's default action ends the process at once, skipping every `finally`: raise SystemExit
    instead, so temporary files are removed as on Ctrl-C (KeyboardInterrupt). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):      # someone (an outer atomic_path) already handles it
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target):
    """with atomic_path("out/a.mp4") as tmp: write tmp -> renamed to out/a.mp4 if the block succeeds.

    tmp is "out/.a.mp4.<random>.mp4": unique, in the same folder (the rename stays on one file system,
    hence atomic), ending in the target's extension (imageio and torch.save pick formats from it)."""
    d, name = os.path.split(os.path.abspath(target))
    os.makedirs(d, exist_ok=True)
    with _sigterm_raises():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=d)
        os.close(fd)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes 0600; the result gets the usual mode
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, obj, **kw):
    write_text(path, json.dumps(obj, **kw))


def write_bytes(path, data: bytes):
    """Atomic, and flushed to the disk before the rename (a KD cache shard must survive a power cut)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_dir_target(target, marker, tool, unmarked=()):
    """`target` may be written as a directory by `tool`: missing, empty, or marked as its own. `unmarked`:
    the exact entries of an output the tool wrote before it marked its outputs (also its own)."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"{target} is a file; give a directory path for {tool}'s output")
    entries = set(os.listdir(target)) if os.path.isdir(target) else set()
    if entries and marker not in entries and not (unmarked and entries == set(unmarked)):
        raise UsageError(f"{target} is a non-empty directory that {tool} did not write (no {marker} in it); "
                         f"it is left untouched: give a new or empty directory")


@contextlib.contextmanager
def atomic_dir(target, marker, tool, unmarked=()):
    """with atomic_dir("runs/x/Bundle", ".bundle", "deploy.py") as tmp: fill the directory tmp -> it
    replaces target. An existing target is replaced only if empty or holding `marker` (written here
    into tmp) or exactly the entries `unmarked`; any other directory raises UsageError and stays as it is."""
    target = os.path.abspath(target.rstrip("/"))
    check_dir_target(target, marker, tool, unmarked)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    with _sigterm_raises():
        tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
        try:
            yield tmp
            with open(os.path.join(tmp, marker), "w") as f:
                f.write(f"written by {tool}; {tool} may replace this directory\n")
            os.chmod(tmp, 0o777 & ~_umask())
            check_dir_target(target, marker, tool, unmarked)   # again: someone may have filled it meanwhile
            old = None
            if os.path.isdir(target):                  # ours (marked) or empty: swap, then delete the old one
                old = tempfile.mkdtemp(prefix=f".{name}.old.", dir=parent)
                os.replace(target, old)
            os.replace(tmp, target)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ----------------------------------------------------------------------------------------------
# Presets: every config module's get_config(name) is this lookup
# ----------------------------------------------------------------------------------------------
def preset(presets, name, what, **overrides):
    """A fresh copy of presets[name] (a dataclass) with `overrides` applied. A deep copy, so a caller
    that edits its config (or a list inside it) never edits the preset. An unknown name or field is
    a ValueError that lists what is known."""
    if name not in presets:
        raise ValueError(f"unknown {what} preset {name!r}; known presets: {sorted(presets)}")
    cfg = copy.deepcopy(presets[name])
    unknown = sorted(set(overrides) - {f.name for f in fields(cfg)})
    if unknown:
        raise ValueError(f"unknown {what} config field(s) {unknown}; known fields: "
                         f"{sorted(f.name for f in fields(cfg))}")
    return replace(cfg, **overrides)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one format for every trained module ({"config", "state_dict", "metrics"})
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, model, cfg, metrics=None):
    """Atomic torch.save({"config", "state_dict", "metrics"}) plus a JSON of config + metrics."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = {"config": asdict(cfg), "state_dict": model.state_dict(), "metrics": dict(metrics or {})}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    write_json(os.path.splitext(path)[0] + ".json", {"config": asdict(cfg), "metrics": dict(metrics or {})},
               indent=2, default=str)


def load_checkpoint(path, cfg_cls, model_cls, stage):
    """model_cls(cfg_cls(**config)) with the saved weights, in eval mode. A missing, truncated or
    mismatched file is an error naming it and the train.py stage to re-run."""
    hint = f"re-run the `{stage}` stage of train.py"
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found; {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file
        why = str(e).split("\n")[0][:200]
        raise BadFileError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {why}); {hint}") from e
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise BadFileError(f"checkpoint {path} lacks 'config'/'state_dict'; {hint}")
    try:
        cfg = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in blob["config"].items()})
        model = model_cls(cfg)
        model.load_state_dict(blob["state_dict"])
    except (TypeError, RuntimeError) as e:  # keep the first lines of torch's long report
        why = " ".join(str(e).split("\n")[:3])[:300]
        raise BadFileError(f"checkpoint {path} does not match {model_cls.__name__} ({why} ...); {hint}") from e
    return model.eval()


if __name__ == "__main__":
    d = tempfile.mkdtemp()
    out = os.path.join(d, "a.json")
    write_json(out, {"x": 1})
    try:
        with atomic_path(out) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash half way")
    except RuntimeError:
        pass
    print(sorted(os.listdir(d)), read_json(out))     # ['a.json'] {'x': 1}: no temp left, old content kept
    shutil.rmtree(d)
