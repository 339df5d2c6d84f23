"""Files that a kill or a full disk never leaves half-written: atomic writes, safe loading with errors that name
the file and the fix, the weights digest that keys caches, and the lock that gives a run folder one writer."""
import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import socket

FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no space left, a file-size limit (ulimit -f), a disk quota
REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
SHORT_WRITE = ("unexpected pos", "file write failed", "os error 28", "os error 27", "os error 122")  # torch.save and
# safetensors report a short write with these words, not as an OSError


def write_error(path, e):
    """The `error:` line for a failed write under path, or None when e is no failed write."""
    if isinstance(e, OSError) and e.errno in REFUSED:
        return (f"cannot write {e.filename or path} ({e.strerror}); pass an --out and a --data.data_dir that are "
                "folders you can write to")
    if (isinstance(e, OSError) and e.errno in FULL) or any(w in str(e) for w in SHORT_WRITE):
        return (f"could not write {path}: the disk is full or a file-size limit (ulimit -f) was hit "
                f"({str(e).splitlines()[0][:160]}). Free space (df -h) or raise the limit, then rerun the same "
                "command: finished work is kept (Stage II continues with --resume when a checkpoint exists)")
    return None


@contextlib.contextmanager
def writing(path, remove=None):
    """Writes to path inside: a full disk, a file-size limit or a folder that cannot be written stops the run with
    one `error:` line naming path (removing the half-written `remove` first), not a traceback."""
    try:
        yield
    except Exception as e:
        msg = write_error(path, e)
        if msg is None:
            raise
        if remove:
            shutil.rmtree(remove, ignore_errors=True)
        raise SystemExit(f"error: {msg}") from e


def atomic_write(path, write):
    """write(tmp_path) then rename over path: a kill leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_LOCKS = {}  # run folder -> its open lock file: this process holds the folder


def lock_file(path, what, fix):
    """An open file at path, locked (flock) for the life of this process with the pid written in; a second
    process stops at once, naming the holder, `what` it holds and the fix. The kernel drops the lock of a
    process that ended or was killed, so a stale lock file is simply taken over."""
    while True:
        with writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().split() or ["?"]
            f.close()
            raise SystemExit(f"error: {what} is in use by another process (pid {' on '.join(holder)}, see "
                             f"{path}); {fix}") from None
        try:  # the holder before us may have removed the file as it ended: lock the one on disk
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    with writing(path):
        f.truncate(0)
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
    return f


def unlock_file(f):
    """Remove a lock_file and release it: what ends well leaves no lock behind."""
    try:
        os.remove(f.name)
    except FileNotFoundError:
        pass
    f.close()


def lock_run(out):
    """One run per folder: out is created and its run.lock held (lock_file) for the life of this process."""
    if os.path.realpath(out) in _LOCKS:  # this process holds it already (main called twice)
        return
    f = lock_file(os.path.join(out, "run.lock"), out, "wait for it to end, or pass another --out")
    _LOCKS[os.path.realpath(out)] = f


def unlock_run(out):
    f = _LOCKS.pop(os.path.realpath(out), None)
    if f:
        unlock_file(f)


@atexit.register
def _unlock_all():
    """A run that stops on an error leaves no lock file either (a killed one does: the next takes it over)."""
    for out in list(_LOCKS):
        unlock_run(out)


def save_bytes(path, raw):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(raw)
    atomic_write(path, write)


def load_json(path, fix):
    """The JSON in path; a corrupt file stops the run with its name and the fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise SystemExit(f"error: {path} is corrupt ({e}); {fix}") from None


def save_json(path, obj):
    save_bytes(path, json.dumps(obj, indent=2).encode())


def save_torch(path, obj):
    import torch  # here: the rest of this module serves torch-free callers (data.py)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path, what, fix):
    """torch.load with weights_only=True (a crafted file cannot run code), and an error that names the
    file, what it should be and the fix."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; it should hold {what}. {fix}")
    try:
        import torch
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # lazy: reading the config is cheap
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # garbage bytes, not a refused object (torch: "unsupported GLOBAL ...")
            raise SystemExit(f"error: {path} is not a valid {what} (it does not unpickle). {fix}") from None
        # a refused object: do not pass on torch's advice to retry with weights_only=False
        raise SystemExit(f"error: {path} is not a valid {what}: it holds Python objects other than tensors and plain "
                         f"values, which could run code when loaded, so it was refused. {fix}") from None
    except Exception as e:  # truncated zip, garbage bytes: all the same to the user
        raise SystemExit(f"error: {path} is not a valid {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                         f"{fix}") from None


def weights_digest(module):
    """A short hash of a module's parameters and buffers: caches keyed on it cannot outlive the weights."""
    import torch
    h = hashlib.blake2b(digest_size=8)
    for name, t in module.state_dict().items():
        t = t.detach().float() if t.is_floating_point() else t.detach()  # bf16 weights == their fp32 masters
        h.update(name.encode())
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lock_holder(path):
    """'pid host' of the live process holding the lock file path (lock_file's, e.g. lock_run's run.lock), or None
    when none does: the kernel drops the lock of a process that ended, so a left-over file means nothing."""
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released with the file, at once
        except BlockingIOError:
            return " on ".join(f.read().split()) or "?"
    return None


def check_out_file(flag, path):
    """The `error:` line for an output file path that cannot be written (empty, a folder, in a folder that does not
    exist or is not writable), or None: checked before any work, so no result is lost at the end."""
    if not path or path.endswith(os.sep) or os.path.isdir(path):
        return f"{flag} {path!r} is {'empty' if not path else 'a folder'}; pass a file name, e.g. {flag} out.json"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        return f"{flag} {path}: the folder {folder} {what}; create it or pass another {flag}"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{flag} {path}: {path if os.path.exists(path) else folder} is not writable; pass another {flag}"
    return None
