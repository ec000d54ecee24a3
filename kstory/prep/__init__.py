"""The prep stage (see docs/run-directory.md for the files it reads and writes).

``prep()`` cleans an image-caption dataset with a Data-Juicer recipe into
DiffSynth-Studio's training layout; see docs/data-prep.md.
"""

from kstory.prep.pipeline import PrepResult, prep

__all__ = ["PrepResult", "prep"]
