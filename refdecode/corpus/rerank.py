"""Rerank retrieved passages with the target language model itself: no second model, no extra weights.

A passage is scored by how likely the model finds the query right after it (zero-shot question likelihood, "UPR":
Sachan et al. 2022, "Improving Passage Retrieval with Zero-Shot Question Generation"):

    score(passage) = log p(query tokens | "Passage: <plain text of passage>\n\nA question that this passage answers:")

The embedding search proposes `candidates` passages (cheap, approximate); the reranker reads each one whole with
the model that will generate the answer and orders them by that likelihood, fused with the embedding order by
reciprocal rank (a passage must do well under both). It costs one batched forward over the candidates' tokens:
negligible on a GPU, seconds on a 2-core CPU, so it is off unless asked for.

This module knows passages, the model's forward and its tokenizer; it knows nothing about index files, faiss or
decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .embedding import plain_text

__all__ = ["LMReranker", "reciprocal_rank_fusion"]

_PREFIX = "Passage: "
_SUFFIX = "\n\nA question that this passage answers:"
RRF_K = 60  # the constant of Cormack et al. 2009; not tuned here


def reciprocal_rank_fusion(*rankings: Sequence[int], k: int = RRF_K) -> list[int]:
    """Fuse rankings of the same items (each a list of item ids, best first) by sum of 1 / (k + rank).
    Items missing from a ranking get nothing from it; ties keep the first ranking's order. -> ids, best first."""
    score: dict[int, float] = {}
    first: dict[int, int] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            score[item] = score.get(item, 0.0) + 1.0 / (k + rank)
            first.setdefault(item, len(first))
    return sorted(score, key=lambda item: (-score[item], first[item]))


class LMReranker:
    """Scores passages for a query by the causal LM's log-likelihood of the query after each passage.

    Args:
        model: a transformers causal LM (any device; run in inference mode).
        tokenizer: its tokenizer.
        max_passage_tokens: a passage's plain text is cut to this many tokens (from its start).
        batch_size: candidates per forward pass (memory: batch_size x (passage + query) tokens of activations).
    """

    def __init__(self, model, tokenizer, *, max_passage_tokens: int = 320, batch_size: int = 8):
        if max_passage_tokens < 1 or batch_size < 1:
            raise ValueError("max_passage_tokens and batch_size must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_passage_tokens, self.batch_size = max_passage_tokens, batch_size

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _context(self, passage_text: str) -> list[int]:
        """Token ids of the prompt that precedes the query: the passage's plain text cut to max_passage_tokens
        (at a token's start character), wrapped in the prefix and suffix, tokenized as one string."""
        body = plain_text(passage_text)
        enc = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) > self.max_passage_tokens:
            body = body[: enc["offset_mapping"][self.max_passage_tokens][0]].rstrip()
        return self._ids(_PREFIX + body + _SUFFIX)

    def scores(self, query: str, passage_texts: Sequence[str]) -> np.ndarray:
        """log p(query | passage) for each passage text. -> (P,) float64, higher is better."""
        query_ids = self._ids(" " + query.strip())
        if not query_ids:
            raise ValueError("the query is empty")
        contexts = [self._context(t) for t in passage_texts]
        out = np.zeros(len(contexts), dtype=np.float64)
        for a in range(0, len(contexts), self.batch_size):
            out[a : a + self.batch_size] = self._score_batch(contexts[a : a + self.batch_size], query_ids)
        return out

    @torch.inference_mode()
    def _score_batch(self, contexts: list[list[int]], query_ids: list[int]) -> np.ndarray:
        # Left padding puts the query at the same (last) positions in every row, so only those logits are computed.
        q = len(query_ids)
        width = max(len(c) for c in contexts) + q
        device = self.model.device
        ids = torch.zeros(len(contexts), width, dtype=torch.long)  # (B, W)
        mask = torch.zeros(len(contexts), width, dtype=torch.long)  # (B, W)
        for row, context in enumerate(contexts):
            seq = context + query_ids
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, W) 0.. from each row's start
        logits = (
            self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                logits_to_keep=q + 1,
            )
            .logits[:, :-1]
            .float()
        )  # (B, q, V): predict query tokens
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(query_ids, device=logp.device).expand(len(contexts), q)  # (B, q)
        return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1).double().cpu().numpy()

    def rerank(self, query: str, ids: Sequence[int], texts: Sequence[str]) -> list[int]:
        """Order candidate passage ids (given best first by the embedding search) by the fusion of that order and
        the model's likelihood order. -> ids, best first."""
        if len(ids) != len(texts):
            raise ValueError("ids and texts differ in length")
        if not ids:
            return []
        likelihood = self.scores(query, texts)
        by_model = [ids[i] for i in np.argsort(-likelihood, kind="stable")]
        return reciprocal_rank_fusion(list(ids), by_model)
