"""The EAGLE draft under tensor / expert parallelism: rank 0 runs the draft, the other ranks lend their vocab shards.

Why this split (and not every rank mirroring every draft forward): the draft's own layers (fc, MLA attention, dense
MLP, norm) have no collective in them: they are replicated math over replicated inputs. What is collective under
TP is only what the draft borrows from the target: the vocab-parallel embedding (an all-reduce over the ranks'
rows) and the vocab-parallel lm_head (an all-gather of the ranks' logit columns). So rank 0 holds the draft and its
latent caches and runs its layers alone, and for the two borrowed pieces it tells the other ranks what to embed or
score first, one typed message each:

- "draft_embed": the draft's input token ids (one int64 broadcast); every rank runs its ``embed_tokens`` (the
  all-reduce pairs up). Image rows are merged into the result on rank 0 only, after the collective.
- "draft_logits": the draft's hidden rows (one broadcast in the model's dtype); every rank runs ``compute_logits``
  (the all-gather pairs up).

Mirroring the draft on every rank instead would need each follower to keep rank 0's hidden states (the target's
rows of the last step, the draft's between chain steps), its row selections and the shifted image rows in step
with rank 0 message by message, for the same result: more protocol and more state, no less latency (the followers
would compute the same rows in parallel; here they wait for the next message). The followers hold no draft and no
draft cache (the cache size agreed at startup is the smallest any rank can hold, so rank 0's extra draft layers
are counted), yet the startup agreement still covers the draft: every rank must be started for the same draft
files (by content: ``draft_fingerprint``) and the same number of speculative tokens.

When the vocabulary is not split (expert parallel alone) the embedding and lm_head are whole on rank 0 and no
message is sent: the draft is then entirely rank 0's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from small4.config import EngineConfig
from small4.engine.model_runner import ModelRunner
from small4.parallel.channel import send_json
from small4.parallel.state import Dist

_CONFIG_FILES = ("config.json", "params.json")  # the HF layout's, else the released one's (as spec/loading.py reads)


@dataclass(frozen=True)
class DraftExpectation:
    """The draft a rank was started for (its own command line: a following node's ``small4 serve``): the draft's
    directory (None: none) and the drafts per step. Ranks started without one take rank 0's."""

    path: str | None
    num_tokens: int

    @classmethod
    def of(cls, engine_cfg: EngineConfig) -> DraftExpectation:
        """What ``engine_cfg`` speculates with; a draft with 0 tokens is not loaded (``ModelRunner._load_draft``),
        so it counts as none."""
        k = engine_cfg.num_speculative_tokens or 0
        return cls(engine_cfg.speculative_model if k else None, k)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def draft_fingerprint(expect: DraftExpectation) -> dict:
    """What every rank must agree on about the draft: the sha256 of its config file and of each weights file, as
    this rank sees them (not the path: nodes may hold the same files elsewhere), and the drafts per step. A missing
    directory is recorded as such, so that rank is named in the refusal rather than failing alone."""
    if expect.path is None:
        return {"files": None, "num_speculative_tokens": 0}
    root = Path(expect.path)
    config = next((root / name for name in _CONFIG_FILES if (root / name).is_file()), None)
    if config is None:
        return {"files": {"missing": str(root)}, "num_speculative_tokens": expect.num_tokens}
    files = {config.name: _sha256(config)}
    files |= {p.name: _sha256(p) for p in sorted(root.glob("*.safetensors*"))}
    return {"files": files, "num_speculative_tokens": expect.num_tokens}


def send_draft_embed(d: Dist, ids: torch.Tensor) -> None:
    """Rank 0, before embedding the draft's input tokens: the other ranks embed the same ids with their rows."""
    send_json(d, {"op": "draft_embed", "tokens": int(ids.numel())})
    dist.broadcast(ids.to(torch.int64).contiguous(), src=0, group=d.group)


def run_draft_embed(d: Dist, runner: ModelRunner, header: dict) -> None:
    """A follower's side of "draft_embed": its share of the vocab-parallel embedding's all-reduce."""
    ids = torch.empty(header["tokens"], dtype=torch.int64, device=d.device)
    dist.broadcast(ids, src=0, group=d.group)
    runner.model.embed_tokens(ids)


def send_draft_logits(d: Dist, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rank 0, before scoring the draft's hidden rows: the other ranks score the same rows with their columns.
    Returns the rows as sent (in ``dtype``, the model's, which the followers allocate), for rank 0 to score too,
    so every rank multiplies the same values."""
    send_json(d, {"op": "draft_logits", "rows": int(hidden.shape[0])})
    hidden = hidden.to(dtype).contiguous()
    dist.broadcast(hidden, src=0, group=d.group)
    return hidden


def run_draft_logits(d: Dist, runner: ModelRunner, header: dict) -> None:
    """A follower's side of "draft_logits": its share of the vocab-parallel lm_head's all-gather."""
    hidden = torch.empty(header["rows"], runner.config.text.hidden_size, dtype=runner.dtype, device=d.device)
    dist.broadcast(hidden, src=0, group=d.group)
    runner.model.compute_logits(hidden)
