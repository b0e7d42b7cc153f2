"""Reading torch files without running code.

``torch.load(weights_only=True)`` rebuilds only tensors and plain Python values (dicts, lists, tuples,
strings, numbers, None); a file that names any other Python object (a class to build, a function to call:
how a pickle runs code) is refused before anything of it executes. Every checkpoint, tokenizer and
export of the suite is read here; only OpenAI's DALL-E encoder, a pickled module by nature, is unpickled
elsewhere (``ssl_bench.dalle``, behind its explicit ``dalle:PATH`` option).
"""
from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ssl_bench.errors import UserError

def unsafe_globals(path: str | Path) -> list[str]:
    """The Python objects (module.name) a torch file would import to load, found by reading its opcodes
    (nothing is executed); [] when it cannot be read that way."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - garbled files are reported by the load itself
        return []


def load_torch_file(path: str | Path, what: str, fix: str, allow: Sequence = (), unsafe_hint: str = ""):
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors.

    ``what`` names the file in messages ("checkpoint", "tokenizer file"), ``fix`` says what to do about a
    file that is corrupt or not of that kind. ``allow`` lists extra objects the file may name (entries of
    ``torch.serialization.safe_globals``), for a narrow legacy format only; ``unsafe_hint`` ends the message
    that refuses a file naming other objects.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it in one line
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = unsafe_globals(path) or re.findall(r"Unsupported global: GLOBAL (\S+)", str(exc))[:1]
        if not names:  # not a pickle that names objects: garbage, truncated, or an opcode weights_only rejects
            raise UserError(f"{what} {path} is corrupt, or in an older pickle format that cannot be read without running it "
                            f"(UnpicklingError); {fix}") from None
        raise UnsafeFileError(
            f"{what} {path} refused: loading it would unpickle Python objects ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}), which can run code; only tensors and plain values are read{unsafe_hint}",
            names,
        ) from None
    except Exception as exc:  # torch raises many types for truncated/garbled files
        raise UserError(f"{what} {path} is corrupt or unreadable ({exc.__class__.__name__}); {fix}") from None


class UnsafeFileError(UserError):
    """A file that needs arbitrary unpickling; ``names`` are the objects it would import."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names
