"""Shared fixtures: a tiny synthetic jsonl task and a matching tiny config (fast on a CPU); running Triton kernel
tests under Triton's CPU interpreter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from sadiffuseq.config import load_config

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def write_pairs(path, n: int = 80, seed: int = 0) -> None:
    """A toy seq2seq corpus: the target repeats the source reversed, then a fixed tail."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            src = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            trg = " ".join(reversed(src.split())) + " end"
            f.write(json.dumps({"id": i, "src": src, "trg": trg}) + "\n")


def tiny_overrides(tmp_path, **extra) -> list[str]:
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        write_pairs(pairs)
    items = {
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.d_emb": 16,
        "model.dropout": 0.0,
        "diffusion.steps": 100,
        "data.task": "jsonl",
        "data.train_path": str(pairs),
        "data.seq_len": 32,
        "data.max_src_len": 12,
        "data.vocab_size": 300,
        "data.valid_frac": 0.1,
        "data.test_frac": 0.1,
        "train.out_dir": str(tmp_path / "run"),
        "train.steps": 6,
        "train.batch_size": 8,
        "train.lr": 1e-3,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.save_every": 3,
        "train.eval_batches": 2,
        "train.device": "cpu",
        "sample.steps": 10,
        "sample.batch_size": 4,
    }
    items.update(extra)
    return [f"--{k}={v}" for k, v in items.items()]


@pytest.fixture
def tiny_cfg(tmp_path):
    return load_config(None, tiny_overrides(tmp_path))


def run_under_interpreter(test_file: str, keyword: str) -> None:
    """Run the tests of ``test_file`` selected by ``-k keyword`` in a process of their own under Triton's CPU
    interpreter (``TRITON_INTERPRET=1`` has to be set before Triton is imported); fails if any of them fails or
    is skipped there."""
    pytest.importorskip("triton")
    from sadiffuseq.attention.globals_triton import interpreting

    if interpreting():
        pytest.skip("already under the interpreter")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert run.returncode == 0 and "skipped" not in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
