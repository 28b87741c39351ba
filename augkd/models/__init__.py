"""Networks for augkd: classifiers (teacher/student), generator G, encoder E, AnchorNet A, weight I/O.

Public API: ``build_classifier``, ``CLASSIFIER_NAMES``, ``Generator``, ``Encoder``, ``AnchorNet``,
``load_state``, ``save_state``.
"""
from .anchor import AnchorNet
from .classifiers import CLASSIFIER_NAMES, build_classifier
from .generator import Encoder, Generator
from .io import load_state, save_state

__all__ = ["build_classifier", "CLASSIFIER_NAMES", "Generator", "Encoder", "AnchorNet", "load_state", "save_state"]
