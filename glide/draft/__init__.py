"""The GliDe draft: model, checkpoint I/O and the engine-facing :class:`GlideDraft`."""

from .cape import PAPER_BINS, CapeDraft
from .checkpoint import cut_head, default_draft_path, load_draft, new_draft_config, read_draft_config, save_draft
from .config import DraftConfig, check_fingerprint, target_fingerprint
from .model import GlideDraftModel, block_cross_mask
from .runtime import GlideDraft

__all__ = [
    "DraftConfig", "GlideDraftModel", "GlideDraft", "CapeDraft", "PAPER_BINS", "block_cross_mask", "load_draft", "save_draft",
    "read_draft_config", "new_draft_config", "default_draft_path", "target_fingerprint",
    "check_fingerprint", "cut_head",
]
