"""Every subcommand as a function (one module each): pretrain, linear-eval, finetune, knn, cluster,
rankme, export; the CLI parses, calls one of them and prints its result.

Each ``run_*`` resolves the checkpoint (:func:`load_backbone`), the config (a preset, by default
the command's preset for the checkpoint's image size, with ``key=value`` overrides; the
architecture always comes from the checkpoint), the data and the run folder, does the work with
progress on stderr, and returns the JSON-ready result dict the CLI prints.
"""

from .cluster import run_cluster
from .export import run_export
from .finetune import run_finetune
from .knn import run_knn
from .linear_eval import linear_probe, run_linear_eval
from .loading import backbone_fingerprint, load_backbone, read_classifier
from .rankme import run_rankme

__all__ = [
    "backbone_fingerprint",
    "linear_probe",
    "load_backbone",
    "read_classifier",
    "run_cluster",
    "run_export",
    "run_finetune",
    "run_knn",
    "run_linear_eval",
    "run_rankme",
]
