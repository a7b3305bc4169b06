"""Data: one in-memory :class:`Episode` form, and readers/writers for robomimic HDF5, the diffusion_policy zarr
replay layout and robosuite's own demo files (imported by replaying states).

Start with :func:`load_dataset` / :func:`save_dataset` / :func:`convert_dataset` (any format, picked from the
file's content or name) and :func:`dataset_info`; the per-format modules are ``robomimic_io``, ``zarr_io``
and ``robosuite_import``. Every failure is a :class:`robofinetune.errors.DatasetError` naming file and field.
"""

from robofinetune.data.episode import Episode
from robofinetune.data.info import dataset_info, format_info
from robofinetune.data.io import convert_dataset, detect_format, load_dataset, save_dataset

__all__ = [
    "Episode",
    "convert_dataset",
    "dataset_info",
    "detect_format",
    "format_info",
    "load_dataset",
    "save_dataset",
]
