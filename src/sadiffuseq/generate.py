"""Generation: run a sampler over many sources in batches and write ``{source, reference, generated}`` jsonl.

Every row is laid out as in training, ``[BOS] src [SEP]`` followed by ``seq_len − len(src) − 2`` positions to
generate; the output is the rounded target up to the first [EOS]/[PAD] (the model decides the length by where
it puts them).

With ``sample.mbr = K > 1`` every source gets K candidates (the batch is sampled K times, the generator advancing,
so each candidate starts from different noise) and the output is chosen by minimum Bayes risk decoding as in
DiffuSeq (Gong et al. 2023; Kumar & Byrne 2004): the candidate with the highest mean sentence-level BLEU against
the other K−1, i.e. the one closest to the consensus. Records then also carry ``candidates``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sadiffuseq.config import Config
from sadiffuseq.data import sources
from sadiffuseq.data.dataset import Row, TokenizedSplit, collate, extract_target
from sadiffuseq.data.tokenizer import decode, encode_batch
from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.diffusion.samplers import round_to_tokens, sample_x0
from sadiffuseq.evaluate import mean_sentence_bleu
from sadiffuseq.utils import atomic_write_text, autocast_dtype


def mbr_select(candidates: list[str]) -> int:
    """Index of the minimum-Bayes-risk candidate: the highest mean sentence BLEU against the other candidates.

    BLEU is the ``sentence_bleu`` metric of :mod:`sadiffuseq.evaluate` (nltk, whitespace tokens, smoothing
    method 4; an empty hypothesis scores 0), with candidate i as the hypothesis and candidate j as the reference.
    Ties go to the lowest index (the sums use :func:`math.fsum`, which does not depend on the order of the terms,
    so equal multisets of pairwise scores give exactly equal totals); a single candidate gives 0.
    """
    if not candidates:
        raise ValueError("mbr_select needs at least one candidate")
    tokens = [c.split() for c in candidates]
    best, best_score = 0, -math.inf
    for i, hyp in enumerate(tokens):
        # Dividing the sum by K-1 would not change the order, so compare the sums.
        score = math.fsum(mean_sentence_bleu([hyp], [ref]) for j, ref in enumerate(tokens) if j != i)
        if score > best_score:
            best, best_score = i, score
    return best


def generate_records(
    model,
    cfg: Config,
    tokenizer,
    source_ids: list[np.ndarray],
    references: list[str],
    device: torch.device,
    progress: bool = True,
) -> list[dict]:
    """Generate one target per source with the sampler settings of ``cfg.sample`` (MBR over ``sample.mbr``)."""
    s = cfg.sample
    diffusion = Diffusion(cfg.diffusion)
    dtype = autocast_dtype(cfg.train.dtype, device)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    model.eval()
    out = []
    batches = range(0, len(source_ids), s.batch_size)
    mbr = f", MBR over {s.mbr}" if s.mbr > 1 else ""
    desc = f"generating ({s.sampler}, {s.steps} steps, {s.spacing} spacing{mbr})"
    for start in tqdm(batches, desc=desc, disable=not progress):
        srcs = source_ids[start : start + s.batch_size]
        batch = collate([Row(src, None) for src in srcs], pad_to=cfg.data.seq_len)
        ids, mask = batch["ids"].to(device), batch["input_mask"].to(device)
        texts: list[list[str]] = [[] for _ in srcs]  # texts[i][k]: candidate k of source i
        for _ in range(s.mbr):
            x0 = sample_x0(
                model, diffusion, ids, mask, s.sampler, s.steps, s.clamp, generator, dtype=dtype, spacing=s.spacing,
                reinject=s.absorb_reinject,
            )
            tokens = round_to_tokens(model, x0, ids, mask).cpu()
            for i, src in enumerate(srcs):
                texts[i].append(decode(tokenizer, extract_target(tokens[i], len(src))))
        for i, src in enumerate(srcs):
            record = {
                "source": decode(tokenizer, src.tolist()),
                "reference": references[start + i],
                "generated": texts[i][mbr_select(texts[i])],
            }
            if s.mbr > 1:
                record["candidates"] = texts[i]
            out.append(record)
    return out


def split_sources(cfg: Config, tokenizer, split: str, limit: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Sources and references of a tokenised split (references as stored: fitted to the row length)."""
    data = TokenizedSplit(cfg.data_dir, split)
    n = len(data) if not limit else min(limit, len(data))
    return [data.source(i) for i in range(n)], [decode(tokenizer, data.target(i).tolist()) for i in range(n)]


def file_sources(cfg: Config, tokenizer, path: str | Path, limit: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Sources and references of a jsonl file with the run's ``src_field``/``trg_field``."""
    examples = list(sources.read_jsonl_pairs(path, cfg.data.src_field, cfg.data.trg_field))
    if limit:
        examples = examples[:limit]
    ids = encode_batch(tokenizer, [e.src for e in examples])
    srcs = [np.asarray(x[: cfg.data.max_src_len], dtype=np.int64) for x in ids]
    return srcs, [e.trg for e in examples]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
