"""Errors a user can cause end as one `error:` line that names the problem and the fix, never a traceback
(RPOREC_DEBUG=1 adds it)."""
import contextlib
import os
import sys
import traceback

import torch

from plumbing.files import write_error


def fail(msg):
    """Stop with a one-line error for the user (no traceback): what is wrong and the fix."""
    raise SystemExit(f"error: {msg}")


@contextlib.contextmanager
def plain_errors():
    """ValueError and OSError raised inside become one `error:` line: the data readers raise them for bad tables
    and failed downloads, with the file and the fix in the message."""
    try:
        yield
    except (ValueError, OSError) as e:
        msg = write_error(e.filename or "a file", e) if isinstance(e, OSError) and e.errno else None
        raise SystemExit(f"error: {msg or e}") from e


DEBUG = os.environ.get("RPOREC_DEBUG", "") not in ("", "0")  # RPOREC_DEBUG=1: tracebacks behind the error lines


def run_main(main, argv):
    """main(argv), with every error a user can cause as one `error:` line and no traceback (RPOREC_DEBUG=1 adds
    the traceback): the checks' own lines, a CUDA out-of-memory error, a failed write anywhere, Ctrl-C."""
    try:
        try:
            return main(argv)
        except torch.cuda.OutOfMemoryError as e:
            raise SystemExit(f"error: CUDA out of memory ({e}).\nFinished work is kept (reasoning cache, rechead.pt, "
                             "ckpt/): lower --gen_batch, --grpo.micro_batch or --grpo.logit_chunk, or turn on "
                             "--grpo.grad_checkpointing, then rerun (Stage II with --resume).") from e
        except KeyboardInterrupt as e:
            print("error: interrupted. Finished work is kept (reasoning cache, rechead.pt, ckpt/): rerun the same "
                  "command to go on (Stage II with --resume)", file=sys.stderr)
            raise SystemExit(130) from e
        except OSError as e:
            msg = write_error(e.filename or "a file", e)
            if msg is None:
                raise
            raise SystemExit(f"error: {msg}") from e
    except SystemExit as e:
        if DEBUG and e.code not in (0, None):
            traceback.print_exception(e.__cause__ or e.__context__ or e)
        raise
