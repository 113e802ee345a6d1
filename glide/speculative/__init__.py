"""The speculative-decoding core: trees, verification, drafts and the decode loop."""

from .drafts import (
    Draft,
    DraftContext,
    ModelDraft,
    OracleDraft,
    PromptLookupDraft,
    RandomTreeDraft,
    WrongDraft,
)
from .engine import SequenceOutput, generate_ids
from .tree import Proposal, Tree, ancestor_mask, build_tree, depths, empty_proposal
from .verify import Verdict, process_logits, sample, verify_greedy, verify_sampling, walk

__all__ = [
    "Draft", "DraftContext", "ModelDraft", "OracleDraft", "PromptLookupDraft", "RandomTreeDraft",
    "WrongDraft", "SequenceOutput", "generate_ids", "Proposal", "Tree", "ancestor_mask",
    "build_tree", "depths", "empty_proposal", "Verdict", "process_logits", "sample",
    "verify_greedy", "verify_sampling", "walk",
]
