"""The GliDe draft: model, checkpoint I/O and the engine-facing :class:`GlideDraft`."""

from .checkpoint import default_draft_path, load_draft, new_draft_config, read_draft_config, save_draft
from .config import DraftConfig, check_fingerprint, target_fingerprint
from .model import GlideDraftModel, block_cross_mask
from .runtime import GlideDraft

__all__ = [
    "DraftConfig", "GlideDraftModel", "GlideDraft", "block_cross_mask", "load_draft", "save_draft",
    "read_draft_config", "new_draft_config", "default_draft_path", "target_fingerprint",
    "check_fingerprint",
]
