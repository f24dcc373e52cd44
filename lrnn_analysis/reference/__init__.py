"""Files written by the reference implementation (erichson/LipschitzRNN): its seven models, its
whole-module pickles (read without executing anything), its file names, data conventions and
training histories."""
from .filenames import REFERENCE_MODELS, parse_reference_filename
from .loader import OVERRIDES, ReferenceFileWarning, is_reference_content, load_reference
from .logs import read_reference_log
from .models import MODEL_KEYS, convert_reference_model, identify_model
from .pickles import PickledObject, load_plain_pickle, load_torch_file, reference_stand_ins

__all__ = [
    "MODEL_KEYS",
    "OVERRIDES",
    "REFERENCE_MODELS",
    "PickledObject",
    "ReferenceFileWarning",
    "convert_reference_model",
    "identify_model",
    "is_reference_content",
    "load_plain_pickle",
    "load_reference",
    "load_torch_file",
    "parse_reference_filename",
    "read_reference_log",
    "reference_stand_ins",
]
