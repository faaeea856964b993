"""sadiffuseq: diffusion language models for long documents (DiffuSeq, SA-DiffuSeq, MoE-DiffuSeq)."""

__version__ = "0.1.0"

from sadiffuseq.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
